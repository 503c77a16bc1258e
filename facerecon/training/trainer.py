"""Self-supervised R-Net training with the hybrid loss of paper 000 (the fit's loss terms).

Data are aligned crops with landmarks and skin attention from detections files. Batches follow
a per-epoch permutation seeded by (seed, epoch), so a run resumed from a checkpoint sees the
same batches as an uninterrupted one. Checkpoints (network, optimiser, step, config, face-model
id, code version) are written atomically; metrics go to ``metrics.jsonl``; previews
(input | render | overlay) to ``previews/``.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from facerecon import __version__
from facerecon.export.meshio import write_png
from facerecon.facemodel.resolve import resolve_face_model
from facerecon.facemodel.tensors import FaceModelTensors
from facerecon.fitting.camera import crop_intrinsics, model_to_camera
from facerecon.fitting.optimize import FaceFitter, FaceTargets, FitSettings
from facerecon.io.atomic import atomic_path
from facerecon.networks.resnet import load_backbone_weights
from facerecon.networks.rnet import RNet
from facerecon.render.renderer import MeshRenderer
from facerecon.stages import detect as detect_stage
from facerecon.training.augment import augment
from facerecon.training.config import TrainConfig


@dataclass
class FaceSet:
    """Training faces as stacked arrays (N, ...) and their image keys."""

    keys: list[str]
    crops: np.ndarray
    landmarks68: np.ndarray
    dense: np.ndarray
    attention: np.ndarray

    def __len__(self) -> int:
        return len(self.keys)

    def targets(self, index: np.ndarray, device) -> FaceTargets:
        return FaceTargets(torch.from_numpy(self.crops[index]).float().div(255), torch.from_numpy(self.landmarks68[index]),
                           torch.from_numpy(self.dense[index]), torch.from_numpy(self.attention[index]).float().div(255)
                           ).to(device)

    def subset(self, mask: np.ndarray) -> "FaceSet":
        return FaceSet([k for k, m in zip(self.keys, mask) if m], self.crops[mask], self.landmarks68[mask],
                       self.dense[mask], self.attention[mask])


def load_faces(files: list[Path]) -> FaceSet:
    keys, crops, lm, dense, attention = [], [], [], [], []
    for file in files:
        for key, attrs, faces in detect_stage.iter_detections(file):
            for face in faces:
                keys.append(f"{file.name}:{key}#{face.index}")
                crops.append(face.crop)
                lm.append(face.crop_landmarks68.astype(np.float32))
                dense.append(face.crop_landmarks478[:468, :2].astype(np.float32))
                attention.append(face.skin_attention)
    if not keys:
        raise ValueError("no faces in the training data (run `facerecon detect` on photos with faces)")
    sizes = {c.shape for c in crops}
    if len(sizes) > 1:
        raise ValueError(f"training crops differ in size ({sorted(sizes)}); detect with one --crop-size")
    return FaceSet(keys, np.stack(crops), np.stack(lm), np.stack(dense), np.stack(attention))


def split_validation(faces: FaceSet, fraction: float) -> tuple[FaceSet, FaceSet]:
    """Deterministic split by image key (all faces of an image on one side)."""
    def bucket(key: str) -> float:
        image = key.split("#")[0]
        return int(hashlib.sha256(image.encode()).hexdigest()[:8], 16) / 0xFFFFFFFF

    held = np.array([bucket(k) < fraction for k in faces.keys])
    if held.all() or (fraction > 0 and not held.any() and len(faces) > 1):
        held[:] = False
        held[-1] = True  # keep at least one face on each side
    return faces.subset(~held), faces.subset(held)


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
    def __init__(self, config: TrainConfig, device: torch.device):
        self.config = config
        self.device = device
        self.face_model = resolve_face_model(config.face_model)
        self.tensors = FaceModelTensors(self.face_model).to(device)
        oval = None
        if self.face_model.dense_triangle is not None:
            from facerecon.facemodel.embedding import face_oval_indices

            oval = face_oval_indices()
        settings = FitSettings(dense_weight=config.dense_weight, weights=dict(config.weights))
        self.loss = FaceFitter(self.tensors, self.face_model.regions, settings, oval_indices=oval)
        torch.manual_seed(config.seed)
        self.network = RNet(self.tensors, config.architecture).to(device)
        self.dense_mirror = None
        if self.tensors.dense_triangle is not None:
            from facerecon.training.augment import dense_mirror_map

            points = self.tensors.dense_points(self.tensors.mean_shape[None])[0].cpu().numpy()
            self.dense_mirror = torch.as_tensor(dense_mirror_map(points), device=device)
        self.optimizer = torch.optim.Adam(self.network.parameters(), lr=config.learning_rate)
        self.step = 0

    # -------------------------------------------------------------- checkpoints
    def save(self, path: Path) -> None:
        state = {"network": self.network.state_dict(), "optimizer": self.optimizer.state_dict(), "step": self.step,
                 "config": self.config.to_dict(), "model_id": self.face_model.model_id, "code_version": __version__,
                 "architecture": self.config.architecture, "sizes": self.network.sizes}
        with atomic_path(path) as tmp:
            torch.save(state, tmp)

    def restore(self, path: Path) -> None:
        state = torch.load(path, map_location=self.device, weights_only=False)
        if state.get("model_id") != self.face_model.model_id:
            raise ValueError(f"checkpoint {path} was trained with face model {state.get('model_id')!r}, "
                             f"not {self.face_model.model_id!r}")
        self.network.load_state_dict(state["network"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.step = int(state["step"])

    # -------------------------------------------------------------- steps
    def batch_losses(self, targets: FaceTargets) -> dict[str, torch.Tensor]:
        images = targets.crops.permute(0, 3, 1, 2)
        params = self.network(images)
        return self.loss.losses(params, targets, self.config.render_size)

    def batch_indices(self, step: int, count: int) -> np.ndarray:
        per_epoch = max(1, count // self.config.batch_size)
        epoch, position = divmod(step, per_epoch)
        order = torch.randperm(count, generator=torch.Generator().manual_seed(self.config.seed * 7919 + epoch))
        start = position * self.config.batch_size
        return order[start:start + self.config.batch_size].numpy() if count >= self.config.batch_size else \
            order.numpy()

    @torch.no_grad()
    def validate(self, faces: FaceSet) -> float:
        self.network.eval()
        totals = []
        for start in range(0, len(faces), self.config.batch_size):
            index = np.arange(start, min(len(faces), start + self.config.batch_size))
            totals.append(self.batch_losses(faces.targets(index, self.device))["total"])
        self.network.train()
        return float(torch.cat(totals).mean())

    @torch.no_grad()
    def preview(self, faces: FaceSet, path: Path, count: int = 4) -> None:
        """input | render | overlay rows for the first faces."""
        self.network.eval()
        index = np.arange(min(count, len(faces)))
        targets = faces.targets(index, self.device)
        params = self.network(targets.crops.permute(0, 3, 1, 2))
        size = targets.size
        verts = self.tensors.shape(params["identity"], params["expression"])
        cam = model_to_camera(verts, params["angles"], params["translation"])
        out = MeshRenderer(image_size=(size, size)).render(cam, self.tensors.triangles,
                                                           crop_intrinsics(size, len(index), device=self.device),
                                                           self.tensors.albedo(params["albedo"]).clamp(0, 1),
                                                           params["sh"])
        mask = out.mask[..., None].float()
        overlay = mask * (0.6 * out.image.clamp(0, 1) + 0.4 * targets.crops) + (1 - mask) * targets.crops
        rows = torch.cat([torch.cat([targets.crops[i], out.image[i].clamp(0, 1), overlay[i]], 1)
                          for i in range(len(index))], 0)
        write_png(path, (rows * 255).round().byte().cpu().numpy())
        self.network.train()

    def run(self, train: FaceSet, valid: FaceSet, resume: bool, progress=None, should_stop=None) -> TrainSummary:
        cfg = self.config
        out = cfg.output
        (out / "checkpoints").mkdir(parents=True, exist_ok=True)
        summary = TrainSummary(output=str(out))
        latest = out / "checkpoints" / "latest.pt"
        if resume and latest.is_file():
            self.restore(latest)
            summary.notes.append(f"resumed at step {self.step}")
        elif cfg.init is not None and self.step == 0:
            load_backbone_weights(self.network.backbone, cfg.init)
            summary.notes.append(f"backbone initialised from {cfg.init}")
        metrics_path = out / "metrics.jsonl"
        if not resume and metrics_path.exists():
            metrics_path.unlink()
        if progress is not None:
            progress.start(cfg.steps)
            for _ in range(self.step):
                progress.advance()
        self.network.train()
        started, images_done = time.perf_counter(), 0
        with open(metrics_path, "a") as metrics:
            while self.step < cfg.steps:
                if should_stop is not None and should_stop():
                    summary.interrupted = True
                    break
                index = self.batch_indices(self.step, len(train))
                generator = torch.Generator().manual_seed(cfg.seed * 104729 + self.step)
                batch = augment(train.targets(index, self.device), cfg.augment, generator, self.dense_mirror)
                terms = self.batch_losses(batch)
                loss = terms["total"].mean()
                if not torch.isfinite(loss):
                    raise FloatingPointError(f"loss became {float(loss)} at step {self.step}; lower "
                                             "optim.learning_rate")
                self.optimizer.zero_grad(set_to_none=True)
                loss.backward()
                self.optimizer.step()
                self.step += 1
                images_done += len(index)
                value = float(loss.detach())
                summary.first_loss = value if summary.first_loss is None else summary.first_loss
                summary.last_loss = value
                record = {"step": self.step, "loss": value,
                          **{k: float(v.detach().mean()) for k, v in terms.items() if k != "total"},
                          "images_per_second": images_done / max(time.perf_counter() - started, 1e-9)}
                if len(valid) and (self.step % cfg.validate_every == 0 or self.step == cfg.steps):
                    record["validation_loss"] = summary.validation_loss = self.validate(valid)
                metrics.write(json.dumps(record) + "\n")
                metrics.flush()
                if self.step % cfg.preview_every == 0 or self.step == cfg.steps:
                    self.preview(valid if len(valid) else train, out / "previews" / f"step_{self.step:07d}.png")
                if self.step % cfg.checkpoint_every == 0 or self.step == cfg.steps:
                    self.save(out / "checkpoints" / f"step_{self.step:07d}.pt")
                    self.save(latest)
                if progress is not None:
                    progress.advance()
        if summary.interrupted and self.step:
            self.save(latest)
        summary.steps_done = self.step
        summary.images_per_second = images_done / max(time.perf_counter() - started, 1e-9) if images_done else None
        summary.checkpoint = str(latest)
        return summary


def prepare_data(config: TrainConfig, should_stop=None) -> list[Path]:
    """Detections files to train on: the given ones plus image folders detected first."""
    files = list(config.detections)
    for path in files:
        if not path.is_file():
            raise ValueError(f"data.detections: {path} does not exist")
    if config.images:
        target = config.output / "detections.h5"
        config.output.mkdir(parents=True, exist_ok=True)
        detect_stage.run_detect([str(p) for p in config.images], target,
                                detect_stage.DetectOptions(max_faces=1), should_stop=should_stop)
        files.append(target)
    return files
