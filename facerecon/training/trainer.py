"""Self-supervised R-Net training with the hybrid loss of paper 000 (the fit's loss terms),
plus the multi-view geometry consistency terms of paper 001 when the data have identity groups.

Data are aligned crops with landmarks and skin attention from detections files. Batches follow
a per-epoch permutation seeded by (seed, epoch), so a run resumed from a checkpoint sees the
same batches as an uninterrupted one. With ``data.group_by`` set, a batch is made of groups of
``data.views_per_identity`` views of one identity (consecutive in the batch), and the pixel,
depth and epipolar consistency terms (:mod:`facerecon.losses.multiview`) are added to the loss.
The network may run under autocast (``optim.amp``) in channels_last; rendering and losses stay
float32. Under ``torchrun`` (:mod:`facerecon.training.distributed`) every process trains on its
share of each global batch with DistributedDataParallel and rank 0 alone writes files.
Checkpoints (network, optimiser, step, config, face-model id, code version) are written
atomically; metrics go to ``metrics.jsonl``; previews (input | render | overlay) to ``previews/``.
C-Net training (paper 000 sec. 5, :mod:`facerecon.training.cnet_training`) reuses this loop.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import time
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np
import torch

from facerecon import __version__
from facerecon.errors import InputError, user_file
from facerecon.export.meshio import write_png
from facerecon.facemodel.embedding import face_oval_indices
from facerecon.facemodel.resolve import resolve_face_model
from facerecon.facemodel.tensors import FaceModelTensors
from facerecon.fitting.camera import camera_rotation, crop_intrinsics, model_to_camera
from facerecon.fitting.optimize import SHADING_PRESETS, FaceFitter, FaceTargets
from facerecon.io.atomic import atomic_path
from facerecon.io.store import read_index
from facerecon.losses import multiview
from facerecon.networks.resnet import load_backbone_weights
from facerecon.networks.rnet import RNet
from facerecon.render.rasterize import Fragments
from facerecon.render.renderer import MeshRenderer
from facerecon.stages import detect as detect_stage
from facerecon.training import distributed
from facerecon.training.augment import augment, dense_mirror_map
from facerecon.training.config import TrainConfig
from facerecon.training.distributed import DistContext


@dataclass
class FaceSet:
    """Training faces as stacked arrays (N, ...), their image keys and identity groups
    (``groups[i]`` names face i's identity, None when it belongs to no group)."""

    keys: list[str]
    crops: np.ndarray
    landmarks68: np.ndarray
    dense: np.ndarray
    attention: np.ndarray
    groups: list[str | None] | None = None

    def __len__(self) -> int:
        return len(self.keys)

    def targets(self, index: np.ndarray, device) -> FaceTargets:
        return FaceTargets(torch.from_numpy(self.crops[index]).float().div(255), torch.from_numpy(self.landmarks68[index]),
                           torch.from_numpy(self.dense[index]), torch.from_numpy(self.attention[index]).float().div(255)
                           ).to(device)

    def subset(self, mask: np.ndarray) -> "FaceSet":
        groups = None if self.groups is None else [g for g, m in zip(self.groups, mask) if m]
        return FaceSet([k for k, m in zip(self.keys, mask) if m], self.crops[mask], self.landmarks68[mask],
                       self.dense[mask], self.attention[mask], groups)


def folder_group(file_name: str, key: str, source_path: str | None = None) -> str | None:
    """Identity of an image for ``group_by = "folder"``: the folder holding it, when it lies in a
    sub-folder of its input folder (its detections key, the path relative to the input folder,
    has a parent); None at the top of an input folder. The folder is named by the image's
    absolute ``source_path`` when recorded (so equal sub-folder names under two input folders
    stay apart), else by the key's parent within the detections file."""
    parent = PurePosixPath(key).parent.as_posix()
    if parent in ("", "."):
        return None
    return str(Path(source_path).parent) if source_path else f"{file_name}:{parent}"


class SynthIdentities:
    """Identity of an image for ``group_by = "synth"``: the ``identity`` that `facerecon synth`
    recorded for it in ``synth.h5``, looked up in the folder above the image's folder (the synth
    output ``OUT`` of ``OUT/images/x.png``) and then in the image's own folder."""

    def __init__(self):
        self.indexes: dict[Path, dict[str, int]] = {}

    def _index(self, store: Path) -> dict[str, int]:
        if store not in self.indexes:
            items = read_index(store, "images")
            self.indexes[store] = {str(a.get("image", key)): int(a["identity"]) for key, a in items.items()
                                   if "identity" in a}
        return self.indexes[store]

    def __call__(self, source_path: str | None) -> str | None:
        if not source_path:
            return None
        image = Path(source_path)
        for folder in (image.parent.parent, image.parent):
            store = folder / "synth.h5"
            if store.is_file():
                relative = image.relative_to(folder).as_posix()
                identity = self._index(store).get(relative)
                if identity is not None:
                    return f"{store}:{identity}"
        return None


def load_faces(files: list[Path], group_by: str = "none") -> FaceSet:
    """Faces of detections files; with ``group_by`` "folder" or "synth" also their identity groups
    (only the first, largest face of an image joins its image's group)."""
    keys, crops, lm, dense, attention, groups = [], [], [], [], [], []
    synth = SynthIdentities()
    for file in files:
        for key, attrs, faces in detect_stage.iter_detections(file):
            group = None
            if group_by == "folder":
                group = folder_group(file.name, key, attrs.get("source_path"))
            elif group_by == "synth":
                group = synth(attrs.get("source_path"))
            for face in faces:
                keys.append(f"{file.name}:{key}#{face.index}")
                crops.append(face.crop)
                lm.append(face.crop_landmarks68.astype(np.float32))
                dense.append(face.crop_landmarks478[:468, :2].astype(np.float32))
                attention.append(face.skin_attention)
                groups.append(group if face.index == 0 else None)
    if not keys:
        raise InputError("no faces in the training data (run `facerecon detect` on photos with faces)")
    sizes = {c.shape for c in crops}
    if len(sizes) > 1:
        raise InputError(f"training crops differ in size ({sorted(sizes)}); detect with one --crop-size")
    if group_by != "none" and not any(g is not None for g in groups):
        where = ("no image lies in a sub-folder of an input folder" if group_by == "folder" else
                 "no image is recorded in a synth.h5 beside or in its folder")
        raise InputError(f"data.group_by = {group_by!r} but {where}")
    return FaceSet(keys, np.stack(crops), np.stack(lm), np.stack(dense), np.stack(attention),
                   groups if group_by != "none" else None)


def split_validation(faces: FaceSet, fraction: float) -> tuple[FaceSet, FaceSet]:
    """Deterministic split by image key (all faces of an image on one side), or by identity
    group for grouped faces (all views of an identity on one side)."""
    def bucket(key: str) -> float:
        return int(hashlib.sha256(key.encode()).hexdigest()[:8], 16) / 0xFFFFFFFF

    groups = faces.groups or [None] * len(faces)
    held = np.array([bucket(g if g is not None else k.split("#")[0]) < fraction for k, g in zip(faces.keys, groups)])
    if held.all() or (fraction > 0 and not held.any() and len(faces) > 1):
        # keep at least one face on each side: the last face, with its whole identity group
        # when that leaves something to train on (an identity must not straddle the split)
        held[:] = False
        last = groups[-1]
        if last is not None:
            same = np.array([g == last for g in groups])
            if not same.all():
                held |= same
        held[-1] = True
    return faces.subset(~held), faces.subset(held)


class BatchPlan:
    """The global batch of every step, as (U, V) face indices: U units of V views.

    Ungrouped (V = 1): a per-epoch permutation of the faces seeded by (seed, epoch), cut into
    batches. Grouped: each epoch, the members of every identity group are shuffled and cut into
    tuples of V views (a group of n faces gives n // V tuples; leftovers change from epoch to
    epoch), the tuples are shuffled and cut into batches of ``batch_size / V`` tuples. Both are
    pure functions of (seed, step), so a resumed run sees the same batches.
    """

    def __init__(self, faces: FaceSet, batch_size: int, views: int, seed: int,
                 views_key: str = "data.views_per_identity"):
        self.count, self.views, self.seed = len(faces), views, seed
        self.units = batch_size // views
        if views > 1:
            names = faces.groups or [None] * len(faces)
            table: dict[str, int] = {}
            self.codes = np.array([-1 if g is None else table.setdefault(g, len(table)) for g in names], np.int64)
            sizes = np.bincount(self.codes[self.codes >= 0], minlength=len(table))
            self.groups = int((sizes >= views).sum())
            self.tuples = int((sizes // views).sum())
            self.unused = int(sizes[sizes < views].sum() + (self.codes < 0).sum())
            if self.tuples == 0:
                raise InputError(f"no identity group has {views_key} = {views} training images "
                                 f"({len(table)} groups, largest {int(sizes.max()) if len(sizes) else 0})")
        self._cache: tuple[int, np.ndarray] | None = None

    def _epoch_tuples(self, epoch: int) -> np.ndarray:
        if self._cache is not None and self._cache[0] == epoch:
            return self._cache[1]
        generator = torch.Generator().manual_seed(self.seed * 7919 + epoch)
        keys = torch.rand(self.count, generator=generator).numpy()
        order = np.lexsort((keys, self.codes))  # by group, randomly within a group
        codes = self.codes[order]
        starts = np.flatnonzero(np.r_[True, codes[1:] != codes[:-1]])
        sizes = np.diff(np.r_[starts, len(codes)])
        rank = np.arange(len(codes)) - np.repeat(starts, sizes)
        keep = (codes >= 0) & (rank < np.repeat(sizes // self.views * self.views, sizes))
        tuples = order[keep].reshape(-1, self.views)
        tuples = tuples[torch.randperm(len(tuples), generator=generator).numpy()]
        self._cache = (epoch, tuples)
        return tuples

    def __call__(self, step: int) -> np.ndarray:
        if self.views == 1:
            per_epoch = max(1, self.count // self.units)
            epoch, position = divmod(step, per_epoch)
            order = torch.randperm(self.count, generator=torch.Generator().manual_seed(self.seed * 7919 + epoch))
            start = position * self.units
            index = order[start:start + self.units].numpy() if self.count >= self.units else order.numpy()
            return index[:, None]
        per_epoch = max(1, self.tuples // self.units)
        epoch, position = divmod(step, per_epoch)
        tuples = self._epoch_tuples(epoch)
        start = position * self.units
        return tuples[start:start + self.units] if self.tuples >= self.units else tuples


def resolve_amp(mode: str, device: torch.device) -> torch.dtype | None:
    """Autocast dtype of ``optim.amp`` on ``device`` (None: full float32)."""
    if mode == "off" or (mode == "auto" and device.type != "cuda"):
        return None
    if mode == "auto":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if mode == "fp16" and device.type != "cuda":
        raise InputError("optim.amp = 'fp16' needs a CUDA device (use 'bf16' or 'off' on CPU)")
    return torch.bfloat16 if mode == "bf16" else torch.float16


@dataclass
class TrainSummary:
    output: str
    steps_done: int = 0
    first_loss: float | None = None
    last_loss: float | None = None
    validation_loss: float | None = None
    images_per_second: float | None = None
    checkpoint: str = ""
    interrupted: bool = False
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


class Trainer:
    """One training process: network, loss, optimiser and the step loop.

    ``ctx`` describes the process group when launched by torchrun (default: one process).
    """

    #: ``kind`` written into checkpoints (R-Net checkpoints predate it and have none)
    checkpoint_kind = "rnet"
    #: the configuration key that sets :attr:`views` (named in messages)
    views_key = "data.views_per_identity"
    #: DistributedDataParallel must expect parameters without gradients in some steps
    find_unused_parameters = False
    #: keyword arguments of every network forward of :meth:`predict`
    forward_options: dict = {}

    def __init__(self, config: TrainConfig, device: torch.device, ctx: DistContext | None = None):
        self._setup_common(config, device, ctx)
        torch.manual_seed(config.seed)
        self.network = RNet(self.tensors, config.architecture, specular=config.shading == "blinn-phong").to(device)
        if self.channels_last:
            self.network = self.network.to(memory_format=torch.channels_last)
        self.optimizer = torch.optim.Adam(self.network.parameters(), lr=config.learning_rate)
        self.scaler = torch.amp.GradScaler(device.type) if self.amp_dtype == torch.float16 else None
        #: what the training step calls: the network, in DistributedDataParallel when distributed
        #: (wrapped in :meth:`run`, after restoring, so every rank starts from rank 0's weights)
        self.model: torch.nn.Module = self.network

    def _setup_common(self, config: TrainConfig, device: torch.device, ctx: DistContext | None,
                      perceptual=None) -> None:
        """What every trainer needs: face model, the fit's loss (:class:`FaceFitter`), precision
        settings and the dense mirror map of the augmentation."""
        self.config = config
        self.device = device
        self.ctx = ctx or DistContext(device=device)
        self.face_model = resolve_face_model(config.face_model)
        self.tensors = FaceModelTensors(self.face_model).to(device)
        oval = None
        if self.face_model.dense_triangle is not None:
            oval = face_oval_indices()
        # the paper's fixed weights: the adaptive landmark trust is a per-photo fitting aid,
        # not part of the training objective
        # loss.shading: paper 000's Lambertian losses, or paper 002's Blinn-Phong ones (the fit's
        # --shading presets; the network then predicts the specular unknowns too)
        settings = SHADING_PRESETS[config.shading](dense_weight=config.dense_weight, weights=dict(config.weights),
                                                   landmark_trust_reference=0.0)
        self.loss = FaceFitter(self.tensors, self.face_model.regions, settings, oval_indices=oval,
                               perceptual=perceptual)
        self.amp_dtype = resolve_amp(config.amp, device)
        self.channels_last = config.channels_last == "on" or (config.channels_last == "auto" and device.type == "cuda")
        self.dense_mirror = None
        if self.tensors.dense_triangle is not None:
            points = self.tensors.dense_points(self.tensors.mean_shape[None])[0].cpu().numpy()
            self.dense_mirror = torch.as_tensor(dense_mirror_map(points), device=device)
        self.step = 0

    @property
    def views(self) -> int:
        """Images of one identity that are consecutive in every batch (1: ungrouped)."""
        return self.config.views_per_identity

    def train_mode(self) -> None:
        """Put the trained network(s) in training mode."""
        self.network.train()

    # -------------------------------------------------------------- checkpoints
    def network_state(self) -> dict:
        """The checkpoint's network entries (a subclass stores its own networks here)."""
        state = {"network": self.network.state_dict(), "architecture": self.config.architecture,
                 "sizes": self.network.sizes}
        if getattr(self.network, "correctives", None) is not None:  # paper 004: the corrective layout
            state["correctives"] = self.network.correctives.layout
        return state

    def restore_networks(self, state: dict, path: Path) -> None:
        """Load :meth:`network_state`'s entries of a checkpoint read from ``path``."""
        if state.get("correctives") is not None:
            raise InputError(f"checkpoint {path} has a corrective level (paper 004); --resume it with "
                             "[correctives] enabled = true")
        self._check_sizes(state, path)
        self.network.load_state_dict(state["network"])

    def _check_sizes(self, state: dict, path: Path) -> None:
        """InputError unless the checkpoint's network predicts what this one does (loss.shading)."""
        sizes = state.get("sizes")
        if sizes is not None and dict(sizes) != dict(self.network.sizes):
            which = "with" if "specular" in sizes else "without"
            raise InputError(f"checkpoint {path} is an R-Net {which} the specular unknowns of paper 002; "
                             "loss.shading must match the run it resumes")

    def save(self, path: Path) -> None:
        """Write a checkpoint atomically: :meth:`network_state` plus optimiser, scaler, step, config."""
        state = {"kind": self.checkpoint_kind, **self.network_state(), "optimizer": self.optimizer.state_dict(),
                 "step": self.step, "config": self.config.to_dict(), "model_id": self.face_model.model_id,
                 "code_version": __version__}
        if self.scaler is not None:
            state["scaler"] = self.scaler.state_dict()
        with atomic_path(path) as tmp:
            torch.save(state, tmp)

    def load_checkpoint(self, path: Path) -> dict:
        """A checkpoint of this trainer's kind and face model (ValueError with one line otherwise)."""
        state = torch.load(path, map_location=self.device, weights_only=False)
        kind = state.get("kind", "rnet")
        if kind != self.checkpoint_kind:
            raise InputError(f"checkpoint {path} is a {kind} checkpoint, not {self.checkpoint_kind} (--resume needs "
                             "an output.directory of this kind of training)")
        if state.get("model_id") != self.face_model.model_id:
            raise InputError(f"checkpoint {path} was trained with face model {state.get('model_id')!r}, "
                             f"not {self.face_model.model_id!r}")
        return state

    def restore(self, path: Path) -> None:
        """Resume from a checkpoint of :meth:`save`: networks, then optimiser, scaler and step."""
        state = self.load_checkpoint(path)
        self.restore_networks(state, path)
        self.optimizer.load_state_dict(state["optimizer"])
        if self.scaler is not None and "scaler" in state:
            self.scaler.load_state_dict(state["scaler"])
        self.step = int(state["step"])

    # -------------------------------------------------------------- steps
    def predict(self, crops: torch.Tensor, module: torch.nn.Module | None = None) -> dict[str, torch.Tensor]:
        """Network parameters (float32) for crops (B, S, S, 3), under autocast when enabled."""
        images = crops.permute(0, 3, 1, 2)
        if self.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        module = self.network if module is None else module
        if self.amp_dtype is None:
            return module(images, **self.forward_options)
        with torch.autocast(self.device.type, dtype=self.amp_dtype):
            params = module(images, **self.forward_options)
        return {k: v.float() for k, v in params.items()}

    def _float32(self):
        """Autocast off around rendering and losses (a no-op context without AMP)."""
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, enabled=False)

    def batch_losses(self, targets: FaceTargets, module: torch.nn.Module | None = None) -> dict[str, torch.Tensor]:
        params = self.predict(targets.crops, module)
        with self._float32():
            return self.loss.losses(params, targets, self.config.render_size)

    def multiview_terms(self, params: dict[str, torch.Tensor], targets: FaceTargets,
                        fragments: Fragments | None = None) -> dict[str, torch.Tensor]:
        """Paper 001 terms (P,) over the view pairs of a grouped batch (see :mod:`facerecon.losses.multiview`).

        ``fragments``: the photometric loss's rasterization of the same meshes at the render size
        (one rasterization per step); None rasterizes here, with the fit settings' backend.
        """
        b = targets.crops.shape[0]
        cam = model_to_camera(self.tensors.shape(params["identity"], params["expression"]), params["angles"],
                              params["translation"])
        return multiview.multiview_losses(
            cam, self.loss.photo_triangles, targets.crops, targets.landmarks68, camera_rotation(params["angles"]),
            params["translation"], crop_intrinsics(targets.size, b, device=cam.device), self.config.views_per_identity,
            self.config.render_size, fragments=fragments,
            rasterizer=MeshRenderer((self.config.render_size,) * 2, backend=self.loss.settings.render_backend).rasterize)

    def training_loss(self, batch: FaceTargets) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The step's scalar loss and the detached per-term means to log."""
        params = self.predict(batch.crops, self.model)
        with self._float32():
            return self.loss_of(params, batch)

    def loss_of(self, params: dict[str, torch.Tensor], batch: FaceTargets
                ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """:meth:`training_loss` of predicted parameters (float32, autocast off)."""
        terms, rendered = self.loss.losses_and_render(params, batch, self.config.render_size)
        loss = terms["total"].mean()
        values = {k: v.detach().mean() for k, v in terms.items() if k != "total"}
        if self.config.grouped:
            mv = self.multiview_terms(params, batch, rendered.fragments)
            loss = loss + multiview.combine(mv, self.config.multiview_weights)
            values.update({f"multiview_{k}": v.detach().mean() for k, v in mv.items()})
        return loss, values

    def before_step(self) -> None:
        """Called before every training step (a schedule that depends on :attr:`step` goes here)."""

    def backward(self, loss: torch.Tensor) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        if self.scaler is None:
            loss.backward()
            self.optimizer.step()
        else:
            self.scaler.scale(loss).backward()
            self.scaler.step(self.optimizer)
            self.scaler.update()

    @torch.no_grad()
    def validate(self, faces: FaceSet) -> float:
        """Mean paper-000 loss over ``faces`` (each process takes its share when distributed)."""
        self.network.eval()
        ctx = self.ctx
        mine = np.arange(ctx.rank, len(faces), ctx.world_size)
        totals = [torch.zeros(0, device=self.device)]
        for start in range(0, len(mine), self.config.batch_size):
            index = mine[start:start + self.config.batch_size]
            totals.append(self.batch_losses(faces.targets(index, self.device))["total"])
        self.network.train()
        values = torch.cat(totals)
        if not ctx.enabled:
            return float(values.mean())
        both = distributed.sum_across(ctx, torch.stack([values.sum(), torch.tensor(float(len(values)),
                                                                                      device=self.device)]))
        return float(both[0] / both[1].clamp_min(1.0))

    @torch.no_grad()
    def preview(self, faces: FaceSet, path: Path, count: int = 4) -> None:
        """input | render | overlay rows for the first faces."""
        self.network.eval()
        index = np.arange(min(count, len(faces)))
        targets = faces.targets(index, self.device)
        params = self.predict(targets.crops)
        with self._float32():
            render, overlay = render_preview(self.tensors, params, targets.crops)
        write_preview(path, [targets.crops, render, overlay])
        self.network.train()

    def start_notes(self, plan: BatchPlan) -> list[str]:
        """Notes on the data a run trains on."""
        if self.views == 1:
            return []
        return [f"{plan.groups} identities with >= {self.views} views ({plan.tuples} tuples per epoch); "
                f"{plan.unused} faces in smaller or no groups are not trained on"]

    def _start(self, resume: bool, summary: TrainSummary) -> None:
        """Restore or initialise, then wrap the network for distributed training."""
        cfg, ctx = self.config, self.ctx
        latest = cfg.output / "checkpoints" / "latest.pt"
        found = resume and latest.is_file()
        if ctx.enabled and resume and distributed.any_rank(ctx, found) and not distributed.all_ranks(ctx, found):
            raise InputError(f"--resume: {latest} is not visible to every process; output.directory must be on a "
                             "filesystem all nodes share")
        if found:
            self.restore(latest)
            summary.notes.append(f"resumed at step {self.step}")
        elif cfg.init is not None and self.step == 0:
            if ctx.is_main:  # DistributedDataParallel copies rank 0's weights to the others
                with user_file(cfg.init):
                    load_backbone_weights(self.network.backbone, cfg.init)
            summary.notes.append(f"backbone initialised from {cfg.init}")
        if ctx.enabled and self.model is self.network:
            self.model = distributed.wrap(self.network, ctx, find_unused=self.find_unused_parameters)
            summary.notes.append(f"{ctx.world_size} processes ({ctx.backend}), {cfg.batch_size // ctx.world_size} "
                                 "images per process and step")

    def run(self, train: FaceSet, valid: FaceSet, resume: bool, progress=None, should_stop=None) -> TrainSummary:
        cfg, ctx = self.config, self.ctx
        main = ctx.is_main
        out = cfg.output
        if main:
            (out / "checkpoints").mkdir(parents=True, exist_ok=True)
        distributed.barrier(ctx)
        summary = TrainSummary(output=str(out))
        latest = out / "checkpoints" / "latest.pt"
        views = self.views
        plan = BatchPlan(train, cfg.batch_size, views, cfg.seed, self.views_key)
        self._start(resume, summary)
        summary.notes += self.start_notes(plan)
        metrics_path = out / "metrics.jsonl"
        if main and not resume and metrics_path.exists():
            metrics_path.unlink()
        if progress is not None:
            progress.start(cfg.steps)
            for _ in range(self.step):
                progress.advance()
        self.train_mode()
        started, images_done = time.perf_counter(), 0
        with (open(metrics_path, "a") if main else contextlib.nullcontext()) as metrics:
            while self.step < cfg.steps:
                stop = should_stop is not None and should_stop()
                if distributed.any_rank(ctx, stop):  # every process stops at the same step
                    summary.interrupted = True
                    break
                units = plan(self.step)
                index = distributed.shard(units, ctx).reshape(-1)
                generator = torch.Generator().manual_seed(cfg.seed * 104729 + self.step + ctx.rank * 1_000_003)
                batch = augment(train.targets(index, self.device), cfg.augment, generator, self.dense_mirror,
                                group_size=views)
                self.before_step()
                loss, values = self.training_loss(batch)
                logged = torch.stack([loss.detach(), *values.values()])
                if ctx.enabled:  # the global batch's means, identical on every rank
                    logged = distributed.sum_across(ctx, logged) / ctx.world_size
                if not torch.isfinite(logged[0]):
                    raise FloatingPointError(f"loss became {float(logged[0])} at step {self.step}; lower "
                                             "optim.learning_rate")
                self.backward(loss)
                self.step += 1
                images_done += units.size
                numbers = logged.tolist()
                summary.first_loss = numbers[0] if summary.first_loss is None else summary.first_loss
                summary.last_loss = numbers[0]
                record = {"step": self.step, "loss": numbers[0], **dict(zip(values, numbers[1:])),
                          "images_per_second": images_done / max(time.perf_counter() - started, 1e-9)}
                if len(valid) and (self.step % cfg.validate_every == 0 or self.step == cfg.steps):
                    value = self.validate(valid)
                    if value is not None:  # None: nothing in the validation set to measure
                        record["validation_loss"] = summary.validation_loss = value
                if main:
                    metrics.write(json.dumps(record) + "\n")
                    metrics.flush()
                    if self.step % cfg.preview_every == 0 or self.step == cfg.steps:
                        self.preview(valid if len(valid) else train, out / "previews" / f"step_{self.step:07d}.png")
                    if self.step % cfg.checkpoint_every == 0 or self.step == cfg.steps:
                        self.save(out / "checkpoints" / f"step_{self.step:07d}.pt")
                        self.save(latest)
                if progress is not None:
                    progress.advance()
        if summary.interrupted and self.step and main:
            self.save(latest)
        distributed.barrier(ctx)  # rank 0's files are complete before any process returns
        summary.steps_done = self.step
        summary.images_per_second = images_done / max(time.perf_counter() - started, 1e-9) if images_done else None
        summary.checkpoint = str(latest)
        return summary


def render_preview(tensors: FaceModelTensors, params: dict[str, torch.Tensor], crops: torch.Tensor
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """The faces of ``params`` rendered on the crops' camera, and blended over the crops.

    Args:
        params: {name: (B, ...)} face parameters; crops: (B, S, S, 3) in [0, 1].

    Returns:
        render (B, S, S, 3) and overlay (B, S, S, 3), both in [0, 1].
    """
    b, size = crops.shape[0], crops.shape[1]
    verts = tensors.shape(params["identity"], params["expression"])
    cam = model_to_camera(verts, params["angles"], params["translation"])
    out = MeshRenderer(image_size=(size, size)).render(cam, tensors.triangles,
                                                       crop_intrinsics(size, b, device=crops.device),
                                                       tensors.albedo(params["albedo"]).clamp(0, 1), params["sh"])
    render = out.image.clamp(0, 1)
    mask = out.mask[..., None].float()
    return render, mask * (0.6 * render + 0.4 * crops) + (1 - mask) * crops


def write_preview(path: Path, columns: list[torch.Tensor]) -> None:
    """A PNG with one row per face and one column per (B, S, S, 3) image batch in [0, 1]."""
    rows = torch.cat([torch.cat([column[i] for column in columns], 1) for i in range(columns[0].shape[0])], 0)
    write_png(path, (rows * 255).round().byte().cpu().numpy())


def prepare_data(config: TrainConfig, should_stop=None) -> list[Path]:
    """Detections files to train on: the given ones plus image folders detected first."""
    files = list(config.detections)
    for path in files:
        if not path.is_file():
            raise InputError(f"data.detections: {path} does not exist")
    if config.images:
        target = config.output / "detections.h5"
        config.output.mkdir(parents=True, exist_ok=True)
        detect_stage.run_detect([str(p) for p in config.images], target,
                                detect_stage.DetectOptions(max_faces=1), should_stop=should_stop)
        files.append(target)
    return files
