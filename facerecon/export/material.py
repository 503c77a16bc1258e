"""Paper 002's material of a fitted face: de-lit diffuse albedo and specular maps in UV space.

A fit with ``--shading blinn-phong`` explains the photo as ``albedo * irradiance + specular``
(diffuse albedo lit by SH, specular albedo lit by one Blinn-Phong light). These functions turn
that fit and its lit photo texture into the textures of a relightable material: the diffuse
albedo (the photo texture divided by the fitted irradiance, after the fitted highlights are
taken off; the model albedo where the photo did not see the surface) and the specular albedo,
both in the model's UV layout, plus the shininess.
"""

from __future__ import annotations

import numpy as np
import torch

from facerecon.export.texture import bake_vertex_values, delight_texture
from facerecon.render.shading import SpecularLight, blinn_phong, sh_irradiance, vertex_normals

#: photo quality (``unwrap_texture(return_quality=True)``: photo weight times facing cosine) at
#: which the de-lit photo fully replaces the model albedo
FULL_QUALITY = 0.5


def to_uint8(image: np.ndarray) -> np.ndarray:
    """Float image in [0, 1] -> uint8."""
    return np.clip(np.asarray(image) * 255.0 + 0.5, 0, 255).astype(np.uint8)


def specular_material(vertices_cam: torch.Tensor, triangles: torch.Tensor, uv: np.ndarray, triangle_uv: np.ndarray,
                      albedo: torch.Tensor, sh: torch.Tensor, light: SpecularLight, photo_texture: np.ndarray,
                      quality: np.ndarray) -> dict[str, np.ndarray | float]:
    """The diffuse albedo, specular albedo and shininess of one fitted face.

    Args:
        vertices_cam: (N, 3) fitted vertices in the fitting camera frame; triangles: (F, 3).
        uv: (U, 2); triangle_uv: (F, 3): the model's texture layout.
        albedo: (N, 3) fitted diffuse albedo; sh: (27,) or (9,) fitted SH light.
        light: the fitted Blinn-Phong light of this face (batch of 1: albedo (1, N, 3), direction (1, 3),
            color (1, 3), shininess (1,)).
        photo_texture: (T, T, 3) uint8 lit photo texture (:func:`~facerecon.export.texture.unwrap_texture`).
        quality: (T, T) the photo's weight per texel times its facing cosine (``return_quality=True``).

    Returns:
        ``diffuse_texture`` (T, T, 3) uint8, ``specular_texture`` (T, T, 3) uint8 (the specular albedo
        t_s, the light's colour not included), ``shininess`` (float).
    """
    size = photo_texture.shape[0]
    normals = vertex_normals(vertices_cam[None], triangles)[0]
    irradiance = sh_irradiance(normals[None], sh[None])[0].clamp_min(0.0)
    # per texel: the interpolated position, normal and specular albedo, then the lobe (per pixel, as
    # the renderer evaluates it)
    channels = torch.cat([vertices_cam, normals, light.albedo[0], irradiance, albedo], dim=1)
    baked, _ = bake_vertex_values(triangles, uv, triangle_uv, channels.detach().cpu().float(), size)
    baked_t = torch.from_numpy(baked).reshape(-1, 15)
    position, normal, t_s = baked_t[:, 0:3], baked_t[:, 3:6], baked_t[:, 6:9]
    normal = torch.nn.functional.normalize(normal, dim=-1)
    lobe = blinn_phong(normal, position, light.direction.detach().cpu().float().expand(len(normal), 3),
                       light.shininess.detach().cpu().float().expand(len(normal)))
    specular = t_s * light.color.detach().cpu().float()[0] * lobe[:, None]
    shape = (size, size, 3)
    seen = np.clip(np.asarray(quality, np.float64) / FULL_QUALITY, 0.0, 1.0)
    diffuse = delight_texture(photo_texture, baked[..., 9:12], specular.numpy().reshape(shape),
                              np.clip(baked[..., 12:15], 0, 1), seen)
    return {"diffuse_texture": diffuse, "specular_texture": to_uint8(t_s.numpy().reshape(shape)),
            "shininess": float(light.shininess.reshape(-1)[0])}
