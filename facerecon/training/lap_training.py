"""LAP training (paper 003 sec. 4.3): the networks of :mod:`facerecon.networks.lap` on photo
collections grouped by person.

Data: the detect stage's aligned crops (``data.detections`` / ``data.images``), grouped into
people by ``data.group_by`` (``folder``: one sub-folder per person, as ``aggregate`` finds
albums; ``synth``: the identity recorded by ``facerecon synth``). Every crop is resized to
``lap.image_size``; its face mask ``M`` is the detector's skin attention united with the
eyes/brows/mouth polygons of its landmarks, and the relaxed mask ``M_re`` is ``M`` with those
polygons at ``lap.relaxed_weight`` (the optimisation route's masks, :mod:`facerecon.aggregation.lap`;
the paper parses faces with a BiSeNet instead).

Each step draws ``lap.identities_per_batch`` people and for each an album of random size 1 to
``lap.max_album_size`` (at most the person's photo count) from the step's seed, so a resumed run
sees the same albums. The aggregation networks give each album one canonical depth and albedo
(eq. 4); every photo of the album is rendered from them with its own predicted pose and light,
and from their mirror image (eq. 2). The three training steps:

1. ``lap.aggregate_steps``: aggregation, pose, light and confidence networks with the relaxed
   consistency loss (eq. 5) of the render and of the flipped render (weight ``flip_weight``),
   plus the weak landmark anchor (``lap.landmark``; not in the paper);
2. ``lap.personalise_steps``: those frozen; the attribute-refining networks turn the canonical
   face into each photo's personalised one, trained with eq. 3 (face mask ``M``) of its render
   and flipped render;
3. ``lap.finetune_steps``: all networks with the sum of both losses.

One Adam optimiser (``lap.learning_rate``, paper 1e-4) holds every parameter; frozen networks
get no gradient (Adam skips them), so its state carries over between the steps and a resumed
run continues exactly. Checkpoints (``kind = "lap"``: networks with their fixed buffers, layout,
optimiser, step, configuration, face-model id, code version) are written atomically to
``output.directory/checkpoints/`` (``latest.pt`` and ``step_N.pt``); ``metrics.jsonl`` and
``previews/`` (photo | canonical render | personalised render) as for R-Net. The perceptual
loss the paper adds (Unsup3D's VGG features) is not used: there are no VGG weights here.
One process only.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from facerecon import __version__
from facerecon.aggregation.lap import (INNER_LANDMARKS, LapOptimiser, LapSettings, polygon_masks, relaxed_nll,
                                       sample_grid)
from facerecon.errors import InputError
from facerecon.facemodel.resolve import resolve_face_model
from facerecon.facemodel.tensors import FaceModelTensors
from facerecon.fitting.camera import crop_intrinsics, model_to_camera, pose_from_landmarks
from facerecon.io.atomic import atomic_path
from facerecon.networks.lap import CHECKPOINT_KIND, LapNetworks
from facerecon.render.camera import project_points
from facerecon.render.renderer import MeshRenderer
from facerecon.training.config import TrainConfig
from facerecon.training.trainer import FaceSet, TrainSummary, write_preview


@dataclass
class LapData:
    """Training photos at the network size S: crops (N, S, S, 3) in [0, 1], face mask ``face``
    and relaxed mask ``relaxed`` (N, S, S), landmarks (N, 68, 2) at S px, and the people:
    ``groups``, one array of face indices per person."""

    crops: torch.Tensor
    face: torch.Tensor
    relaxed: torch.Tensor
    landmarks: torch.Tensor
    groups: list[np.ndarray]
    unused: int = 0

    def __len__(self) -> int:
        return int(self.crops.shape[0])


def photo_masks(crops: torch.Tensor, attention: torch.Tensor, landmarks68: torch.Tensor, size: int,
                relaxed_weight: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Crops (N, C, C, 3) in [0, 1], skin attention (N, C, C) in [0, 1] and landmarks (N, 68, 2)
    (crop px) at ``size``: crops (N, S, S, 3), face mask M and relaxed mask M_re (N, S, S),
    landmarks (N, 68, 2) at S px."""
    resized = F.interpolate(crops.permute(0, 3, 1, 2), size=(size, size), mode="bilinear", antialias=True,
                            align_corners=False).permute(0, 2, 3, 1).clamp(0, 1)
    attention = F.interpolate(attention[:, None], size=(size, size), mode="bilinear", antialias=True,
                              align_corners=False)[:, 0]
    landmarks = (landmarks68 + 0.5) * (size / crops.shape[1]) - 0.5
    parts = torch.as_tensor(polygon_masks(landmarks.cpu().numpy(), size), device=crops.device)
    face = torch.maximum(attention, parts)
    return resized, face, face * (1.0 - (1.0 - relaxed_weight) * parts), landmarks


def lap_data(faces: FaceSet, size: int, relaxed_weight: float, chunk: int = 256) -> LapData:
    """:class:`LapData` of a face set with identity groups (faces in no group are not used)."""
    crops, face, relaxed, landmarks = [], [], [], []
    for start in range(0, len(faces), chunk):
        index = np.arange(start, min(start + chunk, len(faces)))
        t = faces.targets(index, "cpu")
        c, f, r, lm = photo_masks(t.crops, t.attention, t.landmarks68, size, relaxed_weight)
        crops.append(c)
        face.append(f)
        relaxed.append(r)
        landmarks.append(lm)
    members: dict[str, list[int]] = {}
    for i, g in enumerate(faces.groups or [None] * len(faces)):
        if g is not None:
            members.setdefault(g, []).append(i)
    groups = [np.asarray(v, np.int64) for _, v in sorted(members.items())]
    unused = len(faces) - sum(len(g) for g in groups)
    if not len(faces):
        return LapData(torch.zeros(0, size, size, 3), torch.zeros(0, size, size), torch.zeros(0, size, size),
                       torch.zeros(0, 68, 2), [], 0)
    return LapData(torch.cat(crops), torch.cat(face), torch.cat(relaxed), torch.cat(landmarks), groups, unused)


def albums_for_step(groups: list[np.ndarray], count: int, max_size: int, seed: int, step: int) -> list[np.ndarray]:
    """The step's albums: ``count`` people (all when fewer) in a random order, each with a random
    album of 1 to ``min(max_size, photos)`` of its photos; a pure function of (seed, step)."""
    generator = torch.Generator().manual_seed(seed * 7919 + step)
    order = torch.randperm(len(groups), generator=generator)[:count].tolist()
    albums = []
    for i in order:
        members = groups[i]
        n = int(torch.randint(1, min(max_size, len(members)) + 1, (1,), generator=generator))
        albums.append(members[torch.randperm(len(members), generator=generator)[:n].numpy()])
    return albums


def canonical_template(tensors: FaceModelTensors, regions: dict, size: int, kind: str = "mean_face"
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The fixed parts of the canonical face on a ``size`` grid: template depth (R, R) mm, the face
    mask (R, R) bool and the iBUG landmarks' canonical (x, y) (68, 2), from the face model's mean
    face (as the optimisation route starts); ``kind = "flat"``: the template is that face's mean depth."""
    optimiser = LapOptimiser(tensors, regions, LapSettings(grid_size=size, render_size=size))
    dev = tensors.mean_shape.device
    depth, _albedo, valid, landmarks = optimiser.initial_face(torch.zeros(tensors.n_identity, device=dev),
                                                              torch.zeros(tensors.n_albedo, device=dev))
    if kind == "flat":
        depth = torch.full_like(depth, float(depth[valid].mean())) * valid
    return depth.cpu(), valid.cpu(), landmarks.cpu()


class LapTrainer:
    """The three-step LAP training of one process; see the module docstring."""

    def __init__(self, config: TrainConfig, device: torch.device):
        if config.lap is None:
            raise InputError("LapTrainer needs [lap] enabled = true")
        self.config, self.device, self.settings = config, device, config.lap
        self.face_model = resolve_face_model(config.face_model)
        self.tensors = FaceModelTensors(self.face_model).to(device)
        self.networks: LapNetworks | None = None
        self.optimizer = None
        self.step = 0
        S = self.settings.image_size
        self.renderer = MeshRenderer((S, S), backend="torch")

    # -------------------------------------------------------------- networks
    def build(self, default_translation: torch.Tensor) -> None:
        st = self.settings
        depth, valid, landmarks = canonical_template(self.tensors, self.face_model.regions, st.image_size,
                                                     st.depth_template)
        torch.manual_seed(self.config.seed)
        self.networks = LapNetworks(st.image_size, st.width, st.code_size, depth, valid, landmarks,
                                    default_translation).to(self.device)
        self.optimizer = torch.optim.Adam(self.networks.parameters(), lr=self.config.learning_rate)

    def save(self, path: Path) -> None:
        state = {"kind": CHECKPOINT_KIND, "networks": self.networks.state_dict(), "lap_layout": self.networks.layout,
                 "optimizer": self.optimizer.state_dict(), "step": self.step, "config": self.config.to_dict(),
                 "model_id": self.face_model.model_id, "code_version": __version__}
        with atomic_path(path) as tmp:
            torch.save(state, tmp)

    def restore(self, path: Path) -> None:
        state = torch.load(path, map_location=self.device, weights_only=False)
        if state.get("kind", "rnet") != CHECKPOINT_KIND:
            raise InputError(f"checkpoint {path} is a {state.get('kind', 'rnet')} checkpoint, not lap (--resume needs "
                             "an output.directory of this kind of training)")
        weights = state["networks"]
        self.build(weights["default_translation"].to(self.device))
        if state["lap_layout"] != self.networks.layout:
            raise InputError(f"checkpoint {path} has networks {state['lap_layout']}; the configuration "
                             f"{self.networks.layout} (lap.image_size, width or code_size changed)")
        self.networks.load_state_dict(weights)
        self.optimizer.load_state_dict(state["optimizer"])
        self.step = int(state["step"])

    # -------------------------------------------------------------- losses
    def render(self, depth: torch.Tensor, albedo: torch.Tensor, scene: dict[str, torch.Tensor]):
        """Renders (B, S, S, 3) and masks of faces (B, R, R) / (B, R, R, 3) with each photo's pose and light."""
        net = self.networks
        cam = model_to_camera(net.vertices(depth), scene["angles"], scene["translation"])
        k = crop_intrinsics(net.image_size, depth.shape[0], device=depth.device)
        return self.renderer.render(cam, net.triangles, k, albedo.reshape(depth.shape[0], -1, 3), scene["sh"])

    def pair_nll(self, depth, albedo, scene, photos, weight) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Eq. 3 / 5 (B,) of the render and of the flipped render (eq. 2), and the renders (B, S, S, 3)."""
        B, S = depth.shape[0], self.networks.image_size
        both = {k: v.repeat(2, *[1] * (v.dim() - 1)) for k, v in scene.items() if k != "sigma"}
        out = self.render(torch.cat([depth, depth.flip(-1)]), torch.cat([albedo, albedo.flip(-2)]), both)
        sigma = F.interpolate(scene["sigma"], size=(S, S), mode="bilinear", align_corners=False)
        sigma = torch.cat([sigma[:, 0], sigma[:, 1]])
        nll = relaxed_nll(out.image, photos.repeat(2, 1, 1, 1), sigma, weight.repeat(2, 1, 1) * out.mask.float())
        return nll[:B], nll[B:], out.image[:B]

    def landmark_loss(self, depth, scene, target) -> torch.Tensor:
        """(B,) mean squared px (at 128 px) between the detected inner landmarks and the canonical
        ones (on the predicted depth) projected with the predicted pose."""
        net = self.networks
        xy = net.landmarks[INNER_LANDMARKS]
        z = sample_grid(depth, net.grid, xy)
        points = torch.cat([xy[None].expand(depth.shape[0], -1, -1), z[..., None]], -1)
        k = crop_intrinsics(net.image_size, depth.shape[0], device=depth.device)
        uv = project_points(model_to_camera(points, scene["angles"], scene["translation"]), k)[..., :2]
        return ((uv - target[:, INNER_LANDMARKS]) ** 2).sum(-1).mean(-1) / (net.image_size / 128.0) ** 2

    def album_batch(self, data: LapData, albums: list[np.ndarray]):
        """Padded album images (G, N, 3, S, S), mask (G, N), flat index (B,) and album of each (B,)."""
        G, N = len(albums), max(len(a) for a in albums)
        index = np.concatenate(albums)
        S = self.networks.image_size
        padded = torch.zeros(G, N, 3, S, S, device=self.device)
        mask = torch.zeros(G, N, dtype=torch.bool, device=self.device)
        images = LapNetworks.normalise(data.crops[index].to(self.device))
        position = 0
        for g, album in enumerate(albums):
            padded[g, :len(album)] = images[position:position + len(album)]
            mask[g, :len(album)] = True
            position += len(album)
        album_of = torch.as_tensor(np.repeat(np.arange(G), [len(a) for a in albums]), device=self.device)
        return padded, mask, index, album_of, images

    def losses(self, data: LapData, albums: list[np.ndarray], phase: int):
        """The step's scalar loss, the detached terms to log and (photos, canonical, personalised) renders."""
        st, net = self.settings, self.networks
        padded, mask, index, album_of, images = self.album_batch(data, albums)
        photos = data.crops[index].to(self.device)
        frozen = phase == 2
        with torch.set_grad_enabled(torch.is_grad_enabled() and not frozen):
            canonical = net.aggregate(padded, mask)
            scene = net.scene(images)
        depth, albedo = canonical["depth"][album_of], canonical["albedo"][album_of]
        values: dict[str, torch.Tensor] = {}
        total = torch.zeros((), device=self.device)
        nll, nll_flip, canonical_render = self.pair_nll(depth, albedo, scene, photos,
                                                        data.relaxed[index].to(self.device))
        values["rcl"], values["rcl_flip"] = nll.detach().mean(), nll_flip.detach().mean()
        lm = self.landmark_loss(depth, scene, data.landmarks[index].to(self.device))
        values["landmark"] = lm.detach().mean()
        if phase in (1, 3):
            total = total + nll.mean() + st.flip_weight * nll_flip.mean() + st.landmark * lm.mean()
        personal_render = canonical_render
        if phase in (2, 3):
            personal_depth, personal_albedo = net.personalise(depth, albedo, images)
            p_nll, p_flip, personal_render = self.pair_nll(personal_depth, personal_albedo, scene, photos,
                                                           data.face[index].to(self.device))
            values["personal"], values["personal_flip"] = p_nll.detach().mean(), p_flip.detach().mean()
            total = total + p_nll.mean() + st.flip_weight * p_flip.mean()
        weights = canonical["depth_weights"].detach()
        values["depth_weight_max"] = weights.amax(1).mean()
        return total, values, (photos, canonical_render.detach(), personal_render.detach())

    # -------------------------------------------------------------- validation and previews
    def validation_albums(self, data: LapData) -> list[np.ndarray]:
        return [g[:self.settings.max_album_size] for g in data.groups]

    @torch.no_grad()
    def validate(self, data: LapData, phase: int) -> float | None:
        albums = self.validation_albums(data)
        if not albums:
            return None
        totals = []
        step = self.settings.identities_per_batch
        for start in range(0, len(albums), step):
            totals.append(float(self.losses(data, albums[start:start + step], phase)[0]))
        return float(np.mean(totals))

    @torch.no_grad()
    def preview(self, data: LapData, path: Path, phase: int) -> None:
        """One album: photo | canonical render | personalised render (phases 2 and 3) over the photo."""
        albums = self.validation_albums(data)[:1]
        if not albums:
            return
        photos, canonical, personal = self.losses(data, albums, max(phase, 2))[2]
        write_preview(path, [photos, canonical, personal])

    # -------------------------------------------------------------- the loop
    def default_translation(self, faces: FaceSet) -> torch.Tensor:
        """Translation (mm) of a frontal mean face at the fitting camera matching the training
        crops' mean landmarks (PnP)."""
        points = self.tensors.landmark_points(self.tensors.mean_shape[None])[0].detach().cpu().numpy()
        mean = faces.landmarks68.mean(0, keepdims=True)
        _, translation = pose_from_landmarks(points, mean, crop_intrinsics(faces.crops.shape[1])[0].numpy())
        return torch.as_tensor(translation[0], dtype=torch.float32, device=self.device)

    def run(self, train: FaceSet, valid: FaceSet, resume: bool, progress=None, should_stop=None) -> TrainSummary:
        cfg, st = self.config, self.settings
        out = cfg.output
        (out / "checkpoints").mkdir(parents=True, exist_ok=True)
        summary = TrainSummary(output=str(out))
        latest = out / "checkpoints" / "latest.pt"
        if resume and latest.is_file():
            self.restore(latest)
            summary.notes.append(f"resumed at step {self.step}")
        else:
            self.build(self.default_translation(train))
        train_data = lap_data(train, st.image_size, st.relaxed_weight)
        valid_data = lap_data(valid, st.image_size, st.relaxed_weight)
        if not train_data.groups:
            raise InputError("no identity group in the training data (LAP trains on photos grouped by person)")
        sizes = [len(g) for g in train_data.groups]
        summary.notes.append(f"LAP networks at {st.image_size} px (width {st.width}, code {st.code_size}); "
                             f"{len(sizes)} people with 1-{max(sizes)} photos, albums of 1-{st.max_album_size}; "
                             f"steps {st.aggregate_steps} aggregate / {st.personalise_steps} personalise / "
                             f"{st.finetune_steps} fine-tune; {train_data.unused} faces in no group are not used")
        metrics_path = out / "metrics.jsonl"
        if not resume and metrics_path.exists():
            metrics_path.unlink()
        if progress is not None:
            progress.start(cfg.steps)
            for _ in range(self.step):
                progress.advance()
        started, images_done = time.perf_counter(), 0
        self.networks.train()
        with open(metrics_path, "a") as metrics:
            while self.step < cfg.steps:
                if should_stop is not None and should_stop():
                    summary.interrupted = True
                    break
                phase = st.phase(self.step)
                albums = albums_for_step(train_data.groups, st.identities_per_batch, st.max_album_size, cfg.seed,
                                         self.step)
                loss, values, _ = self.losses(train_data, albums, phase)
                if not torch.isfinite(loss):
                    raise FloatingPointError(f"loss became {float(loss)} at step {self.step}; lower lap.learning_rate")
                self.optimizer.zero_grad(set_to_none=True)
                loss.backward()
                self.optimizer.step()
                self.step += 1
                images_done += sum(len(a) for a in albums)
                value = float(loss.detach())
                summary.first_loss = value if summary.first_loss is None else summary.first_loss
                summary.last_loss = value
                record = {"step": self.step, "phase": phase, "loss": value,
                          **{k: float(v) for k, v in values.items()},
                          "album_sizes": [len(a) for a in albums],
                          "images_per_second": images_done / max(time.perf_counter() - started, 1e-9)}
                boundary = st.phase(self.step) != phase or self.step == cfg.steps
                if valid_data.groups and (self.step % cfg.validate_every == 0 or boundary):
                    record["validation_loss"] = summary.validation_loss = self.validate(valid_data, phase)
                metrics.write(json.dumps(record) + "\n")
                metrics.flush()
                if self.step % cfg.preview_every == 0 or self.step == cfg.steps:
                    self.preview(valid_data if valid_data.groups else train_data,
                                 out / "previews" / f"step_{self.step:07d}.png", phase)
                if self.step % cfg.checkpoint_every == 0 or boundary:
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
