"""Synthetic faces rendered from a face model with known parameters (tests, benchmarks, training)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from facerecon.facemodel.tensors import FaceModelTensors
from facerecon.fitting.camera import crop_intrinsics, model_to_camera
from facerecon.fitting.optimize import specular_light
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
                      identity_scale: float = 1.0, expression_scale: float = 0.3, albedo_scale: float = 1.0,
                      specular: bool = False) -> dict[str, torch.Tensor]:
    """Random identity/expression/albedo/light and a pose (given yaw/pitch in degrees or random).

    With ``specular`` also paper 002's specular unknowns (:data:`SPECULAR_PARAMETER_NAMES`): specular
    albedo coefficients, a light from the front upper half (camera frame, within ~35 degrees of
    the view axis sideways and ~30 degrees upwards), a white light of intensity 1-2 and shininess
    8-40; drawn after everything else, so the other parameters are the same with or without it.
    """
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
    # white-ish light: a common level with a slight per-channel tint
    ambient = uniform(0.7, 1.1, batch, 1) * uniform(0.92, 1.08, batch, 3) / SH_CONSTANTS[0]
    sh[:, [0, 9, 18]] = ambient
    direction = normal(batch, 3) * 0.12
    for c in range(3):
        sh[:, 9 * c + 1: 9 * c + 4] = direction
    sh[:, [4, 5, 6, 7, 8, 13, 14, 15, 16, 17, 22, 23, 24, 25, 26]] = normal(batch, 15) * 0.03
    centre = model.mean_shape[model.landmarks68].mean(dim=0)
    translation = torch.stack([uniform(-8, 8, batch), uniform(-8, 8, batch),
                               distance_mm + uniform(-60, 60, batch)], dim=1)
    translation = translation - (torch.diag(torch.tensor([1.0, -1.0, -1.0])) @ centre)[None]
    params = {
        "identity": normal(batch, model.n_identity) * identity_scale,
        "expression": expression,
        "albedo": normal(batch, model.n_albedo) * albedo_scale,
        "sh": sh,
        "angles": angles,
        "translation": translation,
    }
    if specular:
        params |= {
            "specular": normal(batch, model.n_specular),
            "light_direction": torch.stack([uniform(-0.7, 0.7, batch), uniform(-0.6, 0.0, batch),
                                            -torch.ones(batch)], dim=1),
            "light_color": uniform(1.0, 2.0, batch, 1).expand(batch, 3).clone(),
            "log_shininess": torch.log(uniform(8.0, 40.0, batch, 1)),
        }
    return params


def textured_backgrounds(batch: int, size: int, generator: torch.Generator) -> torch.Tensor:
    """Smooth random colour fields with some stripes, (B, S, S, 3) in [0, 1]."""
    coarse = torch.rand(batch, 3, 4, 4, generator=generator)
    field = torch.nn.functional.interpolate(coarse, size=(size, size), mode="bicubic", align_corners=False)
    ys = torch.linspace(0, 1, size)[None, None, :, None]
    freq = 4 + 10 * torch.rand(batch, 1, 1, 1, generator=generator)
    stripes = 0.1 * torch.sin(2 * torch.pi * freq * ys)
    return (field * 0.8 + 0.1 + stripes).clamp(0, 1).permute(0, 2, 3, 1)


def _sphere(rings: int = 12, segments: int = 18) -> tuple[torch.Tensor, torch.Tensor]:
    """Unit UV sphere around +z: vertices (V, 3), outward counter-clockwise triangles (T, 3)."""
    theta = torch.linspace(0, torch.pi, rings + 1)[1:-1]  # polar angle from +z
    phi = torch.linspace(0, 2 * torch.pi, segments + 1)[:-1]
    t, p = torch.meshgrid(theta, phi, indexing="ij")
    ring = torch.stack([torch.sin(t) * torch.cos(p), torch.sin(t) * torch.sin(p), torch.cos(t)], -1).reshape(-1, 3)
    vertices = torch.cat([torch.tensor([[0.0, 0.0, 1.0]]), ring, torch.tensor([[0.0, 0.0, -1.0]])])
    idx = torch.arange(len(ring)).reshape(rings - 1, segments) + 1
    nxt = torch.roll(idx, -1, dims=1)
    tris = [torch.stack([torch.zeros(segments, dtype=torch.long), idx[0], nxt[0]], 1)]
    for r in range(rings - 2):
        tris += [torch.stack([idx[r], idx[r + 1], nxt[r + 1]], 1), torch.stack([idx[r], nxt[r + 1], nxt[r]], 1)]
    tris.append(torch.stack([torch.full((segments,), len(vertices) - 1), nxt[-1], idx[-1]], 1))
    return vertices, torch.cat(tris)


def eyeballs(model: FaceModelTensors, vertices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Two eyeballs behind the eyelids (face models here have holes there), canonical frame.

    Returns vertices (B, 2V, 3), triangles (2T, 3) indexed from 0, and albedo (B, 2V, 3): white
    sclera, brown iris, black pupil, looking along +z.
    """
    unit, tris = _sphere()
    lm = vertices[:, model.landmarks68]
    parts, colours = [], []
    for eye in (slice(36, 42), slice(42, 48)):
        corners = lm[:, eye]
        width = (corners[:, 0] - corners[:, 3]).norm(dim=-1)  # outer to inner corner
        radius = (0.42 * width)[:, None, None]
        centre = corners.mean(dim=1, keepdim=True) - torch.tensor([0.0, 0.0, 1.0]) * radius * 0.75
        parts.append(centre + radius * unit)
        cos = unit[:, 2]
        colour = torch.where((cos > 0.93)[:, None], torch.tensor([0.03, 0.03, 0.03]),
                             torch.where((cos > 0.8)[:, None], torch.tensor([0.25, 0.15, 0.08]),
                                         torch.tensor([0.82, 0.8, 0.77])))
        colours.append(colour.expand(vertices.shape[0], -1, -1))
    return torch.cat(parts, 1), torch.cat([tris, tris + len(unit)]), torch.cat(colours, 1)


def render_faces(model: FaceModelTensors, parameters: dict[str, torch.Tensor], size: int = 224,
                 background: torch.Tensor | None = None, zoom: float = 1.0, with_eyes: bool = True,
                 backend: str = "torch") -> SyntheticBatch:
    """Render faces of ``model`` with ``parameters`` on the fitting camera of a ``size`` crop.

    ``zoom`` scales the focal length (0.6 makes the face fill ~45 % of the image, like a
    portrait photo); ``with_eyes`` adds eyeballs behind the eye openings; ``backend``: the
    :class:`MeshRenderer` backend (explicit, so synthetic data never depends on what is installed).
    """
    batch = parameters["identity"].shape[0]
    verts = model.shape(parameters["identity"], parameters["expression"])
    k = crop_intrinsics(size, batch)
    k[:, 0, 0] *= zoom
    k[:, 1, 1] *= zoom
    albedo = model.albedo(parameters["albedo"]).clamp(0, 1)
    all_verts, triangles, all_albedo = verts, model.triangles, albedo
    if with_eyes:
        eye_verts, eye_tris, eye_albedo = eyeballs(model, verts)
        all_verts = torch.cat([verts, eye_verts], 1)
        triangles = torch.cat([model.triangles, eye_tris + verts.shape[1]])
        all_albedo = torch.cat([albedo, eye_albedo], 1)
    cam_all = model_to_camera(all_verts, parameters["angles"], parameters["translation"])
    light = None
    if "light_direction" in parameters:  # paper 002's specular term (eyes: a wet, shiny surface)
        light = specular_light(model, parameters)
        eyes = torch.full((batch, all_verts.shape[1] - verts.shape[1], 3), 0.3, dtype=verts.dtype)
        light.albedo = torch.cat([light.albedo, eyes], 1)
    out = MeshRenderer(image_size=(size, size), backend=backend).render(
        cam_all, triangles, k, all_albedo, parameters["sh"], background=background, specular=light)
    cam = cam_all[:, : verts.shape[1]]
    lm = project_points(model.landmark_points(cam), k)[..., :2]
    dense = project_points(model.dense_points(cam), k)[..., :2] if model.dense_triangle is not None else None
    return SyntheticBatch(out.image.clamp(0, 1), lm, dense, verts, parameters, out.mask)


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """(B, H, W, 3) float [0, 1] -> uint8 array."""
    return (images.clamp(0, 1) * 255.0).round().to(torch.uint8).cpu().numpy()
