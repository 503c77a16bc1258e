"""Label-free C-Net training (paper 000 sec. 5.1) with a frozen R-Net.

Every batch holds ``cnet.identities_per_batch`` identities of ``cnet.images_per_identity``
images each (the grouped batches of :class:`~facerecon.training.trainer.BatchPlan`). The frozen
R-Net (evaluation mode, no gradients) predicts every image's coefficients and the two feature
maps C-Net reads; C-Net gives per-coefficient confidences; eq. 7 aggregates the identity (and,
optionally, albedo) coefficients over each identity's images; every image is then rendered with
the aggregate and its own expression, albedo, light and pose, and the loss is eq. 8, the mean
over the images of the hybrid loss (the fit's :meth:`FaceFitter.losses`, with the multi-image
stage's weights). Gradients reach C-Net only through the aggregate.

The step loop, batches, augmentation, resume, metrics and atomic checkpoints are those of
:class:`~facerecon.training.trainer.Trainer`; checkpoints (``kind = "cnet"``) also hold the
R-Net's weights, architecture and face-model id, so one file is all ``facerecon aggregate
--cnet`` needs (layout in docs/training.md). One process only (no DistributedDataParallel).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from facerecon.errors import InputError, user_file
from facerecon.losses.perceptual import PerceptualLoss
from facerecon.networks.cnet import (CHECKPOINT_KIND, aggregated_sizes, cnet_for, concat_coefficients,
    grouped_aggregate, rnet_with_features, split_coefficients)
from facerecon.networks.iresnet import load_iresnet
from facerecon.networks.rnet import RNet, rnet_from_checkpoint
from facerecon.training.config import TrainConfig
from facerecon.training.trainer import BatchPlan, FaceSet, TrainSummary, Trainer, render_preview, write_preview


def with_aggregate(params: dict[str, torch.Tensor], confidences: torch.Tensor, sizes: dict[str, int],
                   group_size: int) -> dict[str, torch.Tensor]:
    """Parameters x^_j of eq. 8: each image's aggregated coefficients replaced by its group's
    eq. 7 aggregate, everything else its own.

    Args:
        params: {name: (G * N, ...)} R-Net predictions, the N images of a group consecutive.
        confidences: (G * N, K) C-Net output in the layout of ``sizes`` (name -> coefficient count).
        group_size: N.
    """
    aggregate = grouped_aggregate(concat_coefficients(params, sizes), confidences, group_size)
    return {**params, **split_coefficients(aggregate, sizes)}


def identity_tuples(faces: FaceSet, views: int) -> np.ndarray:
    """Deterministic (T, views) face indices: every identity group cut into consecutive tuples of
    ``views`` faces in stored order (leftovers and ungrouped faces unused); for validation."""
    names = faces.groups or [None] * len(faces)
    table: dict[str, int] = {}
    codes = np.array([-1 if g is None else table.setdefault(g, len(table)) for g in names], np.int64)
    order = np.lexsort((np.arange(len(codes)), codes))  # by group, stored order within
    sorted_codes = codes[order]
    starts = np.flatnonzero(np.r_[True, sorted_codes[1:] != sorted_codes[:-1]]) if len(codes) else np.zeros(0, int)
    sizes = np.diff(np.r_[starts, len(codes)])
    rank = np.arange(len(codes)) - np.repeat(starts, sizes)
    keep = (sorted_codes >= 0) & (rank < np.repeat(sizes // views * views, sizes))
    return order[keep].reshape(-1, views)


class CNetTrainer(Trainer):
    """C-Net training: the :class:`Trainer` step loop with a frozen R-Net and eq. 8."""

    checkpoint_kind = CHECKPOINT_KIND
    views_key = "cnet.images_per_identity"

    def __init__(self, config: TrainConfig, device: torch.device):
        if config.cnet is None:
            raise InputError("CNetTrainer needs [cnet] enabled = true")
        self.settings = config.cnet
        perceptual = None
        if self.settings.recognition_weights is not None:
            with user_file(self.settings.recognition_weights):
                perceptual = PerceptualLoss(load_iresnet(self.settings.recognition_weights, device))
        self._setup_common(config, device, None, perceptual=perceptual)
        self.scaler = torch.amp.GradScaler(device.type) if self.amp_dtype == torch.float16 else None
        self.rnet: RNet | None = None
        self.rnet_source = str(self.settings.rnet_checkpoint)
        # the R-Net comes from cnet.rnet_checkpoint; a resumed run takes it from its own
        # checkpoint instead (see _start), so the file may be gone by then
        if self.settings.rnet_checkpoint.is_file():
            self._build(self._read_rnet(self.settings.rnet_checkpoint))

    # -------------------------------------------------------------- networks
    def _read_rnet(self, path: Path) -> dict:
        try:
            state = torch.load(path, map_location=self.device, weights_only=False)
        except Exception as exc:  # noqa: BLE001 - torch raises many kinds for a bad file
            raise InputError(f"cnet.rnet_checkpoint: cannot read {path}: {exc}") from None
        if not isinstance(state, dict) or "network" not in state or "architecture" not in state:
            raise InputError(f"cnet.rnet_checkpoint: {path} is not a `facerecon train` R-Net checkpoint")
        if state.get("model_id") != self.face_model.model_id:
            raise InputError(f"cnet.rnet_checkpoint: {path} was trained with face model {state.get('model_id')!r}, "
                             f"not {self.face_model.model_id!r}")
        return state

    def _build(self, rnet_state: dict) -> None:
        """Frozen R-Net from a checkpoint's ``network``/``architecture``, a fresh C-Net and its optimiser."""
        self.rnet = rnet_from_checkpoint(rnet_state, self.tensors)
        self.rnet.eval().requires_grad_(False)
        self.sizes = aggregated_sizes(self.tensors, self.settings.aggregated)
        torch.manual_seed(self.config.seed)
        self.cnet = cnet_for(self.rnet, sum(self.sizes.values())).to(self.device)
        if self.channels_last:
            self.rnet = self.rnet.to(memory_format=torch.channels_last)
            self.cnet = self.cnet.to(memory_format=torch.channels_last)
        self.optimizer = torch.optim.Adam(self.cnet.parameters(), lr=self.config.learning_rate)
        # the trained network, for the base class's loop
        self.network = self.model = self.cnet

    def train_mode(self) -> None:
        self.cnet.train()
        self.rnet.eval()  # frozen: batch-norm statistics must not move either

    @property
    def views(self) -> int:
        return self.settings.images_per_identity

    # -------------------------------------------------------------- checkpoints
    def network_state(self) -> dict:
        # the frozen R-Net exactly as an R-Net checkpoint stores it, then the C-Net
        return {"network": self.rnet.state_dict(), "architecture": self.rnet.backbone.architecture,
                "sizes": self.rnet.sizes, "rnet_source": self.rnet_source,
                **({"correctives": self.rnet.correctives.layout} if self.rnet.correctives is not None else {}),
                "cnet": self.cnet.state_dict(), "cnet_layout": {**self.cnet.layout, "aggregated": list(self.sizes)}}

    def restore_networks(self, state: dict, path: Path) -> None:
        aggregated = tuple(state["cnet_layout"]["aggregated"])
        if aggregated != self.settings.aggregated:
            raise InputError(f"checkpoint {path} aggregates {'+'.join(aggregated)}; the configuration "
                             f"{'+'.join(self.settings.aggregated)} (cnet.aggregate_albedo changed)")
        self._build(state)
        self.rnet_source = state.get("rnet_source", self.rnet_source)
        self.cnet.load_state_dict(state["cnet"])

    def _start(self, resume: bool, summary: TrainSummary) -> None:
        latest = self.config.output / "checkpoints" / "latest.pt"
        if resume and latest.is_file():
            self.restore(latest)
            summary.notes.append(f"resumed at step {self.step} (R-Net from that checkpoint)")
        elif self.rnet is None:
            raise InputError(f"cnet.rnet_checkpoint: {self.settings.rnet_checkpoint} does not exist")

    def start_notes(self, plan: BatchPlan) -> list[str]:
        return [f"C-Net over a frozen R-Net ({self.rnet_source}); aggregating {'+'.join(self.sizes)} "
                f"({sum(self.sizes.values())} confidences) over {self.views} images per identity",
                f"{plan.groups} identities with >= {self.views} images ({plan.tuples} tuples per epoch); "
                f"{plan.unused} faces in smaller or no groups are not trained on"]

    # -------------------------------------------------------------- steps
    def _autocast(self):
        if self.amp_dtype is None:
            return torch.autocast(self.device.type, enabled=False)
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def predict_with_confidences(self, crops: torch.Tensor) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """R-Net parameters {name: (B, ...)} (no gradient) and C-Net confidences (B, K), float32."""
        images = crops.permute(0, 3, 1, 2)
        if self.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        with self._autocast():
            with torch.no_grad():
                params, first, pooled = rnet_with_features(self.rnet, images)
            confidences = self.cnet(first, pooled)
        return {k: v.float() for k, v in params.items()}, confidences.float()

    def eq8_terms(self, batch) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """Hybrid-loss terms (B,) of every image rendered with its group's aggregate, and the
        confidences (B, K)."""
        params, confidences = self.predict_with_confidences(batch.crops)
        with self._float32():
            aggregated = with_aggregate(params, confidences, self.sizes, self.views)
            return self.loss.losses(aggregated, batch, self.config.render_size), confidences

    def training_loss(self, batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        terms, confidences = self.eq8_terms(batch)
        loss = terms["total"].mean()  # eq. 8: 1/M sum_j L(x^_j), also averaged over the identities
        values = {k: v.detach().mean() for k, v in terms.items() if k != "total"}
        values["confidence_mean"] = confidences.detach().mean()
        values["confidence_std"] = confidences.detach().std()
        return loss, values

    @torch.no_grad()
    def validate(self, faces: FaceSet) -> float | None:
        """Mean eq. 8 loss over the validation identities (None when no identity there has
        ``images_per_identity`` images)."""
        tuples = identity_tuples(faces, self.views)
        if not len(tuples):
            return None
        self.cnet.eval()
        totals = []
        step = self.settings.identities_per_batch
        for start in range(0, len(tuples), step):
            index = tuples[start:start + step].reshape(-1)
            totals.append(self.eq8_terms(faces.targets(index, self.device))[0]["total"])
        self.train_mode()
        return float(torch.cat(totals).mean())

    @torch.no_grad()
    def preview(self, faces: FaceSet, path: Path, count: int = 4) -> None:
        """One identity's images: input | R-Net's own face | with the aggregated identity | overlay."""
        tuples = identity_tuples(faces, self.views)
        if not len(tuples):
            return
        self.cnet.eval()
        targets = faces.targets(tuples[0], self.device)
        params, confidences = self.predict_with_confidences(targets.crops)
        with self._float32():
            own, _ = render_preview(self.tensors, params, targets.crops)
            aggregated, overlay = render_preview(self.tensors, with_aggregate(params, confidences, self.sizes,
                                                                              self.views), targets.crops)
        write_preview(path, [targets.crops, own, aggregated, overlay])
        self.train_mode()
