"""Optional PyTorch3D visibility backend.

Only the (non-differentiable) visibility pass is delegated to PyTorch3D's mesh
rasterizer (``rasterize_meshes``, the function behind ``MeshRasterizer``); the
differentiable barycentrics and depth are then recomputed by
:func:`facerecon.render.rasterize.fragments_from_triangle_ids`, so both backends
return identical :class:`~facerecon.render.rasterize.Fragments` semantics and gradients.

Screen-space conversion. Our screen space has ``u`` right, ``v`` down, pixel centres at
integer coordinates. PyTorch3D's NDC has +X left, +Y up, and samples output pixel
(row r, col c) at ``x = range_x / W * (W - 1 - c) + range_x / (2 W) - range_x / 2``
(similarly y with H), where ``range`` is 2 on the shorter image side and
``2 * long / short`` on the longer one. That map is affine, so we convert
``u -> x_ndc`` and ``v -> y_ndc`` exactly. Our own validity rules (near plane, degenerate
triangles, back-face culling with our orientation convention) are applied beforehand by
turning dropped triangles into degenerate ones, which PyTorch3D skips.

PyTorch3D is imported lazily; :func:`is_available` says whether it can be.
"""

from __future__ import annotations

import functools
from typing import Sequence

import torch

from .rasterize import DEFAULT_NEAR, Fragments, fragments_from_triangle_ids, triangle_validity

__all__ = ["is_available", "rasterize_pytorch3d", "screen_to_pytorch3d_ndc", "BackendUnavailableError"]


class BackendUnavailableError(RuntimeError):
    """The requested rendering backend cannot be imported."""


@functools.lru_cache(maxsize=1)
def is_available() -> bool:
    """True when ``import pytorch3d`` (with its rasterizer) works (cached)."""
    try:
        import pytorch3d.renderer.mesh.rasterize_meshes  # noqa: F401
        import pytorch3d.structures  # noqa: F401
    except Exception:  # ImportError, or a broken binary build
        return False
    return True


def _ndc_range(s1: int, s2: int) -> float:
    return 2.0 * s1 / s2 if s1 > s2 else 2.0


def screen_to_pytorch3d_ndc(screen_vertices: torch.Tensor, image_size: Sequence[int]) -> torch.Tensor:
    """Convert (B, N, 3) ``(u, v, z)`` to PyTorch3D NDC ``(x, y, z)`` for an (H, W) image."""
    H, W = int(image_size[0]), int(image_size[1])
    rx, ry = _ndc_range(W, H), _ndc_range(H, W)
    u, v, z = screen_vertices.unbind(-1)
    x = rx / W * (W - 1 - u) + rx / (2 * W) - rx / 2
    y = ry / H * (H - 1 - v) + ry / (2 * H) - ry / 2
    return torch.stack([x, y, z], dim=-1)


def rasterize_pytorch3d(
    screen_vertices: torch.Tensor,
    triangles: torch.Tensor,
    image_size: Sequence[int],
    cull_backfaces: bool = True,
    near: float = DEFAULT_NEAR,
) -> Fragments:
    """Same contract as :func:`facerecon.render.rasterize.rasterize`, using PyTorch3D.

    Args:
        screen_vertices: (B, N, 3) ``(u, v, z)``.
        triangles: (F, 3) integer vertex indices.
        image_size: (H, W).
        cull_backfaces: drop triangles that are clockwise as displayed.
        near: drop triangles with any vertex at ``z <= near``.

    Returns:
        :class:`Fragments` (barycentrics/depth differentiable w.r.t. the vertices).

    Raises:
        BackendUnavailableError: PyTorch3D is not installed.
    """
    try:
        from pytorch3d.renderer.mesh.rasterize_meshes import rasterize_meshes
        from pytorch3d.structures import Meshes
    except Exception as exc:  # pragma: no cover - depends on the environment
        raise BackendUnavailableError(
            "the 'pytorch3d' render backend needs PyTorch3D, which is not importable "
            f"({exc}); install it or use backend='torch'"
        ) from exc

    H, W = int(image_size[0]), int(image_size[1])
    B = screen_vertices.shape[0]
    tris = triangles.to(device=screen_vertices.device, dtype=torch.long)
    F = tris.shape[0]
    with torch.no_grad():
        sv = screen_vertices.detach().float()
        valid, _ = triangle_validity(sv, tris, cull_backfaces, near)
        faces = torch.where(valid.unsqueeze(-1), tris.unsqueeze(0), torch.zeros_like(tris))
        ndc = screen_to_pytorch3d_ndc(sv, (H, W))
        ndc = torch.nan_to_num(ndc, nan=0.0, posinf=0.0, neginf=0.0)
        meshes = Meshes(verts=list(ndc), faces=list(faces))
        pix_to_face, _, _, _ = rasterize_meshes(
            meshes,
            image_size=(H, W),
            blur_radius=0.0,
            faces_per_pixel=1,
            perspective_correct=False,
            cull_backfaces=False,
        )
        p2f = pix_to_face[..., 0]  # packed face index, -1 on background
        offset = (torch.arange(B, device=p2f.device) * F).view(B, 1, 1)
        tid = torch.where(p2f >= 0, p2f - offset, torch.full_like(p2f, -1))
    return fragments_from_triangle_ids(screen_vertices, tris, tid.long())
