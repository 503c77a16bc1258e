"""Synthetic faces rendered from a face model with known parameters (tests, benchmarks, training)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from facerecon.facemodel.tensors import FaceModelTensors
from facerecon.fitting.camera import crop_intrinsics, model_to_camera
from facerecon.render.camera import project_points
from facerecon.render.renderer import MeshRenderer
from facerecon.render.shading import SH_CONSTANTS


@dataclass
class SyntheticBatch:
    """Rendered faces and their ground truth.

    images: (B, S, S, 3) float in [0, 1]; landmarks68: (B, 68, 2) px; dense: (B, 468, 2) px or
    None; vertices: (B, N, 3) canonical mm; parameters: name -> (B, ...) tensors;
    mask: (B, S, S) bool face coverage.
    """

    images: torch.Tensor
    landmarks68: torch.Tensor
    dense: torch.Tensor | None
    vertices: torch.Tensor
    parameters: dict[str, torch.Tensor]
    mask: torch.Tensor


def random_parameters(model: FaceModelTensors, batch: int, generator: torch.Generator,
                      yaw_degrees=None, pitch_degrees=None, distance_mm: float = 1200.0,
                      identity_scale: float = 1.0, expression_scale: float = 0.3, albedo_scale: float = 1.0
                      ) -> dict[str, torch.Tensor]:
    """Random identity/expression/albedo/light and a pose (given yaw/pitch in degrees or random)."""
    def normal(*shape):
        return torch.randn(*shape, generator=generator)

    def uniform(lo, hi, *shape):
        return lo + (hi - lo) * torch.rand(*shape, generator=generator)

    if model.expression_kind == "blendshape":
        expression = (uniform(0, 1, batch, model.n_expression) ** 3) * expression_scale
    else:
        expression = normal(batch, model.n_expression) * expression_scale
    yaw = torch.as_tensor(yaw_degrees, dtype=torch.float32).expand(batch) if yaw_degrees is not None \
        else uniform(-45, 45, batch)
    pitch = torch.as_tensor(pitch_degrees, dtype=torch.float32).expand(batch) if pitch_degrees is not None \
        else uniform(-15, 15, batch)
    angles = torch.stack([torch.deg2rad(pitch), torch.deg2rad(yaw), torch.deg2rad(uniform(-8, 8, batch))], dim=1)
    sh = torch.zeros(batch, 27)
    ambient = uniform(0.7, 1.1, batch, 3) / SH_CONSTANTS[0]
    sh[:, [0, 9, 18]] = ambient
    direction = normal(batch, 3) * 0.12
    for c in range(3):
        sh[:, 9 * c + 1: 9 * c + 4] = direction
    sh[:, [4, 5, 6, 7, 8, 13, 14, 15, 16, 17, 22, 23, 24, 25, 26]] = normal(batch, 15) * 0.03
    centre = model.mean_shape[model.landmarks68].mean(dim=0)
    translation = torch.stack([uniform(-8, 8, batch), uniform(-8, 8, batch),
                               distance_mm + uniform(-60, 60, batch)], dim=1)
    translation = translation - (torch.diag(torch.tensor([1.0, -1.0, -1.0])) @ centre)[None]
    return {
        "identity": normal(batch, model.n_identity) * identity_scale,
        "expression": expression,
        "albedo": normal(batch, model.n_albedo) * albedo_scale,
        "sh": sh,
        "angles": angles,
        "translation": translation,
    }


def textured_backgrounds(batch: int, size: int, generator: torch.Generator) -> torch.Tensor:
    """Smooth random colour fields with some stripes, (B, S, S, 3) in [0, 1]."""
    coarse = torch.rand(batch, 3, 4, 4, generator=generator)
    field = torch.nn.functional.interpolate(coarse, size=(size, size), mode="bicubic", align_corners=False)
    ys = torch.linspace(0, 1, size)[None, None, :, None]
    freq = 4 + 10 * torch.rand(batch, 1, 1, 1, generator=generator)
    stripes = 0.1 * torch.sin(2 * torch.pi * freq * ys)
    return (field * 0.8 + 0.1 + stripes).clamp(0, 1).permute(0, 2, 3, 1)


def render_faces(model: FaceModelTensors, parameters: dict[str, torch.Tensor], size: int = 224,
                 background: torch.Tensor | None = None) -> SyntheticBatch:
    """Render faces of ``model`` with ``parameters`` on the fitting camera of a ``size`` crop."""
    batch = parameters["identity"].shape[0]
    verts = model.shape(parameters["identity"], parameters["expression"])
    cam = model_to_camera(verts, parameters["angles"], parameters["translation"])
    k = crop_intrinsics(size, batch)
    albedo = model.albedo(parameters["albedo"]).clamp(0, 1)
    out = MeshRenderer(image_size=(size, size), backend="auto").render(
        cam, model.triangles, k, albedo, parameters["sh"], background=background)
    lm = project_points(cam[:, model.landmarks68], k)[..., :2]
    dense = project_points(model.dense_points(cam), k)[..., :2] if model.dense_triangle is not None else None
    return SyntheticBatch(out.image.clamp(0, 1), lm, dense, verts, parameters, out.mask)


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """(B, H, W, 3) float [0, 1] -> uint8 array."""
    return (images.clamp(0, 1) * 255.0).round().to(torch.uint8).cpu().numpy()
