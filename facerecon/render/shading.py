"""Vertex normals and spherical-harmonics (SH) Lambertian shading.

Lighting follows paper 000 (Deng et al. 2019, "Accurate 3D face reconstruction with
weakly-supervised learning"): a Lambertian surface lit by 3 SH bands (9 coefficients),
the colour of a vertex with albedo ``t`` and unit normal ``n`` being
``t * sum_b gamma_b * Phi_b(n)``. ``Phi_b`` is the real SH basis Y_lm multiplied by the
Ramamoorthi-Hanrahan clamped-cosine convolution factors, i.e. per band ``l``

    a_0 = pi,           a_1 = 2 pi / sqrt(3),    a_2 = 2 pi / sqrt(8)
    c_0 = 1 / sqrt(4 pi), c_1 = sqrt(3) / sqrt(4 pi), c_2 = 3 sqrt(5) / sqrt(12 pi)

and (n = (x, y, z))

    Phi = [ a0 c0,
           -a1 c1 y,   a1 c1 z,   -a1 c1 x,
            a2 c2 x y, -a2 c2 y z, a2 c2 / (2 sqrt 3) (3 z^2 - 1),
           -a2 c2 x z, a2 c2 / 2 (x^2 - y^2) ]

which is the form used by the widely used Deep3DFaceRecon implementation. With only
the DC coefficient gamma_0 set, the irradiance is the constant ``a0 c0 gamma_0 =
(sqrt(pi) / 2) gamma_0``.

Frame note: the functions here evaluate the basis on whatever normals they receive.
:class:`~facerecon.render.renderer.MeshRenderer` passes OpenCV camera-frame normals
(x right, y down, z forward). Deep3DFaceRecon evaluates it on normals in a frame with
y up and z towards the camera, i.e. ``(x, -y, -z)`` of ours; its coefficients convert
to ours by negating indices 1, 2, 4 and 7 (the basis functions odd in y or z,
but not both).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

__all__ = ["vertex_normals", "sh_basis", "sh_irradiance", "shade_lambertian", "blinn_phong", "shade_specular", "SpecularLight",
           "SH_CONSTANTS"]

_A0, _A1, _A2 = math.pi, 2.0 * math.pi / math.sqrt(3.0), 2.0 * math.pi / math.sqrt(8.0)
_C0 = 1.0 / math.sqrt(4.0 * math.pi)
_C1 = math.sqrt(3.0) / math.sqrt(4.0 * math.pi)
_C2 = 3.0 * math.sqrt(5.0) / math.sqrt(12.0 * math.pi)

#: Products a_l * c_l per band (l = 0, 1, 2).
SH_CONSTANTS = (_A0 * _C0, _A1 * _C1, _A2 * _C2)


def vertex_normals(vertices: torch.Tensor, triangles: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """Area-weighted unit vertex normals.

    The normal of triangle (i, j, k) is ``(v_j - v_i) x (v_k - v_i)``: for triangles
    counter-clockwise seen from outside it points outwards (right-handed frames, which
    include the OpenCV camera frame). Each vertex sums the (area-weighted) normals of its
    triangles and is normalised; isolated vertices get a zero normal.

    Args:
        vertices: (B, N, 3).
        triangles: (F, 3) integer indices.

    Returns:
        (B, N, 3) unit normals, differentiable w.r.t. ``vertices``.
    """
    tris = triangles.to(device=vertices.device, dtype=torch.long)
    # Structure-of-arrays: (B, F) rows per corner and coordinate (fast gathers, and a
    # hand-rolled cross product, which is much faster than linalg.cross on (..., 3)).
    comps = vertices.unbind(-1)  # 3 x (B, N)
    idx = [tris[:, k].contiguous() for k in range(3)]
    (x0, x1, x2), (y0, y1, y2), (z0, z1, z2) = (
        [c.index_select(1, i) for i in idx] for c in comps
    )
    ax, ay, az = x1 - x0, y1 - y0, z1 - z0
    bx, by, bz = x2 - x0, y2 - y0, z2 - z0
    face_n = (ay * bz - az * by, az * bx - ax * bz, ax * by - ay * bx)  # |n| = 2 * area
    flat = tris.t().reshape(-1)  # corner 0 of all faces, then corner 1, then corner 2
    acc = [
        torch.zeros_like(comps[0]).index_add(1, flat, torch.cat([n, n, n], dim=1))
        for n in face_n
    ]
    norm = torch.sqrt(acc[0] * acc[0] + acc[1] * acc[1] + acc[2] * acc[2]).clamp_min(eps)
    return torch.stack([a / norm for a in acc], dim=-1)


def facing_cosine(points: torch.Tensor, normals: torch.Tensor) -> torch.Tensor:
    """Cosine between each surface normal and the ray from the point to the camera centre.

    Args:
        points: (..., 3) camera-frame positions (camera at the origin).
        normals: (..., 3) unit normals in the same frame.

    Returns:
        (...,) in [-1, 1]: 1 faces the camera, 0 is seen edge-on, below 0 faces away.
    """
    view = -points / points.norm(dim=-1, keepdim=True).clamp_min(1e-6)
    return (normals * view).sum(dim=-1)


def sh_basis(normals: torch.Tensor) -> torch.Tensor:
    """The 9 SH basis functions (times the Lambertian convolution constants).

    Args:
        normals: (..., 3) unit normals.

    Returns:
        (..., 9) basis values, see the module docstring for the exact form.
    """
    x, y, z = normals.unbind(-1)
    k0, k1, k2 = SH_CONSTANTS
    return torch.stack(
        [
            torch.full_like(x, k0),
            -k1 * y,
            k1 * z,
            -k1 * x,
            k2 * x * y,
            -k2 * y * z,
            (0.5 * k2 / math.sqrt(3.0)) * (3.0 * z * z - 1.0),
            -k2 * x * z,
            (0.5 * k2) * (x * x - y * y),
        ],
        dim=-1,
    )


def _sh_as_b39(sh: torch.Tensor) -> torch.Tensor:
    """(B, 9) / (B, 27) / (B, 3, 9) -> (B, 3, 9)."""
    if sh.dim() == 3 and sh.shape[1:] == (3, 9):
        return sh
    if sh.dim() == 2 and sh.shape[1] == 9:
        return sh.unsqueeze(1).expand(-1, 3, -1)
    if sh.dim() == 2 and sh.shape[1] == 27:
        return sh.view(sh.shape[0], 3, 9)
    raise ValueError(f"sh must be (B, 9), (B, 27) or (B, 3, 9), got {tuple(sh.shape)}")


def sh_irradiance(normals: torch.Tensor, sh: torch.Tensor) -> torch.Tensor:
    """Irradiance ``sum_b gamma_b Phi_b(n)`` per colour channel.

    Args:
        normals: (B, ..., 3) unit normals.
        sh: (B, 9) monochrome coefficients (same for R, G, B), (B, 27) per-channel
            coefficients laid out as three blocks of 9 (R, G, B), or (B, 3, 9).

    Returns:
        (B, ..., 3) irradiance, differentiable w.r.t. both inputs.
    """
    coeffs = _sh_as_b39(sh).to(normals.dtype)
    batch = normals.shape[0]
    if coeffs.shape[0] != batch:
        raise ValueError(f"sh batch {coeffs.shape[0]} != normals batch {batch}")
    basis = sh_basis(normals)  # (B, ..., 9)
    flat = basis.reshape(batch, -1, 9)
    if sh.dim() == 2 and sh.shape[1] == 9:
        irr = torch.bmm(flat, sh.to(normals.dtype).unsqueeze(-1)).expand(-1, -1, 3)
    else:
        irr = torch.bmm(flat, coeffs.transpose(1, 2))  # (B, M, 3)
    return irr.reshape(*normals.shape[:-1], 3)


def shade_lambertian(albedo: torch.Tensor, normals: torch.Tensor, sh: torch.Tensor) -> torch.Tensor:
    """Lambertian SH shading ``albedo * irradiance(normals)``.

    Args:
        albedo: (B, N, 3) linear RGB reflectance.
        normals: (B, N, 3) unit normals.
        sh: (B, 9), (B, 27) or (B, 3, 9), see :func:`sh_irradiance`.

    Returns:
        (B, N, 3) radiance (not clamped).
    """
    return albedo * sh_irradiance(normals, sh)


@dataclass
class SpecularLight:
    """One Blinn-Phong light and the specular reflectance it lights (paper 002, eq. 5).

    Attributes:
        albedo: (B, N, 3) per-vertex specular albedo t_s (linear, >= 0).
        direction: (B, 3) direction *towards* the light, in the camera frame the renderer
            shades in (OpenCV: x right, y down, z forward); need not be unit length. A light
            behind the camera has a negative z.
        color: (B, 3) linear RGB intensity of the light (multiplies t_s).
        shininess: (B,) Blinn-Phong exponent phi (>= 1).
    """

    albedo: torch.Tensor
    direction: torch.Tensor
    color: torch.Tensor
    shininess: torch.Tensor


def blinn_phong(normals: torch.Tensor, points: torch.Tensor, light_direction: torch.Tensor,
                shininess: torch.Tensor) -> torch.Tensor:
    """Blinn-Phong lobe ``[Nor(v_out - v_in) . n]^phi`` of paper 002, eq. 5, per point.

    ``v_in`` is the incoming light direction (from the light onto the surface, i.e. minus
    ``light_direction``) and ``v_out`` the direction from the surface to the camera centre
    (the origin), so ``Nor(v_out - v_in)`` is the half vector between the view and light
    directions. The lobe is 0 where the half vector or the light is behind the surface.
    Not energy normalised (as in the paper: the specular albedo carries the scale).

    Args:
        normals: (B, ..., 3) unit normals; points: (B, ..., 3) camera-frame positions.
        light_direction: (B, 3) towards the light (any length > 0).
        shininess: (B,) exponent phi >= 1.

    Returns:
        (B, ...) lobe values in [0, 1], differentiable w.r.t. every input.
    """
    batch = normals.shape[0]
    extra = [1] * (normals.dim() - 2)
    light = light_direction / light_direction.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    light = light.view(batch, *extra, 3)
    view = -points / points.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    half = view + light
    half = half / half.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    cosine = (normals * half).sum(dim=-1)
    lit = (normals * light).sum(dim=-1) > 0
    # clamp away from 0 so the power's gradient stays finite; masked to 0 afterwards
    value = cosine.clamp(1e-6, 1.0) ** shininess.view(batch, *extra)
    return torch.where(lit & (cosine > 0), value, torch.zeros_like(value))


def shade_specular(light: SpecularLight, normals: torch.Tensor, points: torch.Tensor,
                   albedo: torch.Tensor | None = None) -> torch.Tensor:
    """Specular radiance ``c_s = t_s * color * lobe`` (paper 002, eq. 5).

    Args:
        light: the light (its ``albedo`` is used when ``albedo`` is None).
        normals, points: (B, ..., 3) unit normals and camera-frame positions.
        albedo: (B, ..., 3) specular albedo at those points, e.g. interpolated per pixel.

    Returns:
        (B, ..., 3) radiance.
    """
    t_s = light.albedo if albedo is None else albedo
    lobe = blinn_phong(normals, points, light.direction, light.shininess)
    color = light.color.view(light.color.shape[0], *[1] * (t_s.dim() - 2), 3).to(t_s.dtype)
    return t_s * color * lobe[..., None]
