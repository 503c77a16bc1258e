"""High-level mesh renderer: projection, rasterization, Gouraud SH shading.

Pipeline of :meth:`MeshRenderer.render`:

1. project the camera-frame vertices with the intrinsics (``camera.project_points``);
2. rasterize (torch backend, or PyTorch3D for the visibility pass);
3. per-vertex normals (area weighted) and per-vertex Lambertian SH colours
   (Gouraud shading, as paper 000), evaluated on OpenCV camera-frame normals;
4. interpolate colours and normals with the perspective-correct barycentrics;
5. with a :class:`~facerecon.render.shading.SpecularLight` (paper 002), add the Blinn-Phong
   specular term, evaluated per pixel on the interpolated normal, position and specular
   albedo (Phong-interpolated: a highlight is sharper than the mesh's triangles).

Differentiable: image, depth and normals w.r.t. vertices (through barycentrics, depth,
shading), albedo, SH coefficients, intrinsics and background. Not differentiable:
which triangle covers which pixel (no silhouette/occlusion gradients), mask,
triangle ids and vertex visibility.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from . import pytorch3d_backend
from .camera import project_points
from .rasterize import Fragments, interpolate_compact, rasterize, scatter_to_pixels
from .shading import SpecularLight, shade_lambertian, shade_specular, vertex_normals

__all__ = ["RenderOutput", "MeshRenderer", "available_backends"]


def available_backends() -> list[str]:
    """Backends usable here: always ``"torch"``, plus ``"pytorch3d"`` if importable."""
    backends = ["torch"]
    if pytorch3d_backend.is_available():
        backends.append("pytorch3d")
    return backends


@dataclass
class RenderOutput:
    """Result of :meth:`MeshRenderer.render` (B images of size H x W, N vertices).

    Attributes:
        image: (B, H, W, 3) shaded colours, ``background`` (or 0) where mask is False.
        mask: (B, H, W) bool, pixel covered by the mesh.
        depth: (B, H, W) camera z, 0 on background.
        normals: (B, H, W, 3) unit camera-frame (OpenCV) normals, 0 on background.
        vertex_visibility: (B, N) bool, vertex belongs to at least one triangle that
            won a pixel.
        fragments: the rasterizer's :class:`Fragments`.
        vertex_colors: (B, N, 3) per-vertex shaded colours (albedo when unlit); the diffuse
            part only when a specular light is given.
        diffuse: (B, H, W, 3) the lit diffuse image (0 on background), with a specular light only.
        specular: (B, H, W, 3) the lit specular image (0 on background), with a specular light only;
            ``image = diffuse + specular`` on covered pixels.
    """

    image: torch.Tensor
    mask: torch.Tensor
    depth: torch.Tensor
    normals: torch.Tensor
    vertex_visibility: torch.Tensor
    fragments: Fragments
    vertex_colors: torch.Tensor
    diffuse: Optional[torch.Tensor] = None
    specular: Optional[torch.Tensor] = None


class MeshRenderer:
    """Batched differentiable mesh renderer.

    Args:
        image_size: (H, W) of the rendered images.
        backend: ``"auto"`` (PyTorch3D when importable, else torch), ``"torch"`` or
            ``"pytorch3d"`` (raises :class:`pytorch3d_backend.BackendUnavailableError`
            if PyTorch3D is missing).
        cull_backfaces: drop triangles that are clockwise as displayed.
    """

    def __init__(
        self,
        image_size: Sequence[int] = (224, 224),
        backend: str = "auto",
        cull_backfaces: bool = True,
    ) -> None:
        self.image_size = (int(image_size[0]), int(image_size[1]))
        self.cull_backfaces = bool(cull_backfaces)
        if backend == "auto":
            backend = "pytorch3d" if pytorch3d_backend.is_available() else "torch"
        elif backend == "pytorch3d":
            if not pytorch3d_backend.is_available():
                raise pytorch3d_backend.BackendUnavailableError(
                    "backend='pytorch3d' requested but PyTorch3D cannot be imported; "
                    "install pytorch3d or use backend='torch' (or 'auto')"
                )
        elif backend != "torch":
            raise ValueError(f"unknown backend {backend!r}; expected 'auto', 'torch' or 'pytorch3d'")
        self.backend = backend

    def __repr__(self) -> str:
        return (
            f"MeshRenderer(image_size={self.image_size}, backend={self.backend!r}, "
            f"cull_backfaces={self.cull_backfaces})"
        )

    def rasterize(self, screen_vertices: torch.Tensor, triangles: torch.Tensor) -> Fragments:
        """Rasterize (B, N, 3) ``(u, v, z)`` with the selected backend."""
        if self.backend == "pytorch3d":
            return pytorch3d_backend.rasterize_pytorch3d(
                screen_vertices, triangles, self.image_size, self.cull_backfaces
            )
        return rasterize(screen_vertices, triangles, self.image_size, self.cull_backfaces)

    def render(
        self,
        vertices_cam: torch.Tensor,
        triangles: torch.Tensor,
        intrinsics: torch.Tensor,
        albedo: torch.Tensor,
        sh: Optional[torch.Tensor] = None,
        background: Optional[torch.Tensor] = None,
        specular: Optional[SpecularLight] = None,
    ) -> RenderOutput:
        """Render a batch of meshes sharing one triangle list.

        Args:
            vertices_cam: (B, N, 3) OpenCV camera-frame vertices (z > 0 visible).
            triangles: (F, 3) integer indices, counter-clockwise as displayed for
                front faces (i.e. counter-clockwise seen from outside).
            intrinsics: (B, 3, 3) pinhole intrinsics.
            albedo: (B, N, 3) per-vertex reflectance.
            sh: (B, 9), (B, 27) or (B, 3, 9) SH coefficients (see :mod:`.shading`), or None for
                unlit rendering (image = interpolated albedo).
            background: (B, H, W, 3) used where no triangle covers the pixel; None = 0.
            specular: a Blinn-Phong light with its (B, N, 3) specular albedo, added to the
                (diffuse) shading per pixel (paper 002: c = c_d + c_s); None = Lambertian only.

        Returns:
            :class:`RenderOutput`.
        """
        if vertices_cam.dim() != 3 or vertices_cam.shape[-1] != 3:
            raise ValueError(f"vertices_cam must be (B, N, 3), got {tuple(vertices_cam.shape)}")
        B, N, _ = vertices_cam.shape
        if albedo.shape != (B, N, 3):
            raise ValueError(f"albedo must be {(B, N, 3)}, got {tuple(albedo.shape)}")
        H, W = self.image_size
        tris = triangles.to(device=vertices_cam.device, dtype=torch.long)

        screen = project_points(vertices_cam, intrinsics.to(vertices_cam.dtype))
        frags = self.rasterize(screen, tris)

        normals_v = vertex_normals(vertices_cam, tris)
        albedo = albedo.to(vertices_cam.dtype)
        colors_v = albedo if sh is None else shade_lambertian(albedo, normals_v, sh)

        # One interpolation for colours and normals (shares the gathers), computed for
        # covered pixels only (channel-major) and written into the output images.
        channels = [colors_v, normals_v]
        if specular is not None:
            if specular.albedo.shape != (B, N, 3):
                raise ValueError(f"specular albedo must be {(B, N, 3)}, got {tuple(specular.albedo.shape)}")
            channels += [vertices_cam, specular.albedo.to(vertices_cam.dtype)]
        pix, vals = interpolate_compact(torch.cat(channels, dim=-1), tris, frags)
        mask = frags.mask
        if background is not None and background.shape != (B, H, W, 3):
            raise ValueError(f"background must be {(B, H, W, 3)}, got {tuple(background.shape)}")
        parts = vals.split([3] * len(channels), dim=0)  # split: backward is one cat, no zero fill
        c_pix, n_pix = parts[0], parts[1]
        n_pix = n_pix / (n_pix * n_pix).sum(0).sqrt().clamp_min(1e-12)
        diffuse_img = specular_img = None
        if specular is not None:
            # per covered pixel, each pixel a batch row with its face's light: values (3, P) -> (P, 3)
            rows = pix // (H * W)
            light = SpecularLight(parts[3].t(), specular.direction[rows], specular.color[rows],
                                  specular.shininess[rows])
            s_pix = shade_specular(light, n_pix.t(), parts[2].t()).t()
            diffuse_img = scatter_to_pixels(pix, c_pix, B * H * W).view(B, H, W, 3)
            specular_img = scatter_to_pixels(pix, s_pix, B * H * W).view(B, H, W, 3)
            c_pix = c_pix + s_pix
        image = scatter_to_pixels(pix, c_pix, B * H * W, background).view(B, H, W, 3)
        n_img = scatter_to_pixels(pix, n_pix, B * H * W).view(B, H, W, 3)

        visibility = self._vertex_visibility(frags, tris, B, N)
        return RenderOutput(
            image=image,
            mask=mask,
            depth=frags.depth,
            normals=n_img,
            vertex_visibility=visibility,
            fragments=frags,
            vertex_colors=colors_v,
            diffuse=diffuse_img,
            specular=specular_img,
        )

    @staticmethod
    def _vertex_visibility(frags: Fragments, tris: torch.Tensor, B: int, N: int) -> torch.Tensor:
        """(B, N) bool: vertex of at least one triangle that won a pixel."""
        with torch.no_grad():
            tid = frags.triangle_id.reshape(B, -1)
            F = tris.shape[0]
            face_vis = torch.zeros(B, F + 1, dtype=torch.bool, device=tid.device)
            # Background (-1) goes to the extra column F, which is dropped.
            face_vis.scatter_(1, torch.where(tid < 0, F, tid), True)
            face_vis = face_vis[:, :F]
            # All three corners at once: (B, 3F) flags scattered onto (B, N) with max.
            corners = tris.t().reshape(1, -1).expand(B, -1)
            flags = face_vis.to(torch.uint8).repeat(1, 3)
            vis = torch.zeros(B, N, dtype=torch.uint8, device=tid.device)
            vis.scatter_reduce_(1, corners, flags, reduce="amax")
        return vis.bool()

