"""Files of a LAP result (docs/aggregation.md, docs/formats.md): meshes, depth/normal/albedo
PNGs and the contact sheet's renders."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import torch

from facerecon.aggregation.lap import CanonicalGrid, depth_normals, grid_triangles, grid_vertices
from facerecon.export.meshio import TexturedMesh
from facerecon.fitting.camera import crop_intrinsics, model_to_camera
from facerecon.io.atomic import atomic_path
from facerecon.render.renderer import MeshRenderer
from facerecon.synthetic import to_uint8

#: 16-bit depth PNG: value = round((z + DEPTH_OFFSET_MM) * DEPTH_UNITS_PER_MM), 0 off the face
DEPTH_OFFSET_MM = 100.0
DEPTH_UNITS_PER_MM = 100.0


def depth_png(depth: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """(R, R) uint16 depth image of a depth map (R, R) mm inside ``valid`` (R, R) bool."""
    values = np.round((depth + DEPTH_OFFSET_MM) * DEPTH_UNITS_PER_MM)
    return np.where(valid, np.clip(values, 1, 65535), 0).astype(np.uint16)


def depth_from_png(image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Inverse of :func:`depth_png`: depth (R, R) mm and valid (R, R) bool."""
    valid = image > 0
    return np.where(valid, image.astype(np.float64) / DEPTH_UNITS_PER_MM - DEPTH_OFFSET_MM, 0.0), valid


def normal_png(grid: CanonicalGrid, depth: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """(R, R, 3) uint8 model-frame normals as colours ((n + 1) / 2), black off the face."""
    normals = depth_normals(grid, torch.as_tensor(depth, dtype=torch.float32)).numpy()
    return np.where(valid[..., None], np.round((normals + 1) * 127.5), 0).astype(np.uint8)


def write_png16(path: Path, image: np.ndarray) -> None:
    """Write a (H, W) uint16 image as a 16-bit greyscale PNG atomically."""
    ok, data = cv2.imencode(".png", np.ascontiguousarray(image.astype(np.uint16)))
    if not ok:
        raise OSError(f"cannot encode {Path(path).name}")
    with atomic_path(path) as tmp:
        tmp.write_bytes(data.tobytes())


def lap_mesh(grid: CanonicalGrid, depth: np.ndarray, albedo: np.ndarray, valid: np.ndarray,
             texture_size: int = 512) -> TexturedMesh:
    """The face of a depth map (R, R) mm and albedo (R, R, 3) in [0, 1] as a textured mesh in the
    model frame (only the grid points of the face; texture = the albedo image, resized)."""
    valid_t = torch.as_tensor(valid)
    tris = grid_triangles(valid_t).numpy()
    used = np.unique(tris)
    remap = np.full(grid.size * grid.size, -1, np.int64)
    remap[used] = np.arange(len(used))
    verts = grid_vertices(grid, torch.as_tensor(depth, dtype=torch.float32)[None])[0].numpy()[used]
    colours = np.clip(albedo.reshape(-1, 3)[used] * 255 + 0.5, 0, 255).astype(np.uint8)
    texture = cv2.resize(np.clip(albedo * 255 + 0.5, 0, 255).astype(np.uint8), (texture_size, texture_size),
                         interpolation=cv2.INTER_CUBIC)
    faces = remap[tris]
    return TexturedMesh(verts.astype(np.float32), faces, grid.uv()[used], faces, colours, texture)


def three_views(vertices: torch.Tensor, triangles: torch.Tensor, albedo: torch.Tensor, size: int = 256
                ) -> list[np.ndarray]:
    """A face (N, 3) model frame, centred on its face, with albedo (N, 3) rendered at yaw -40, 0,
    +40 degrees on white under a soft top-front light (RGB uint8, ``size`` px each)."""
    dev = vertices.device
    angles = torch.deg2rad(torch.tensor([[0.0, -40.0, 0.0], [0.0, 0.0, 0.0], [0.0, 40.0, 0.0]], device=dev))
    cam = model_to_camera(vertices[None].expand(3, -1, -1), angles,
                          torch.tensor([0.0, 0.0, 1100.0], device=dev).expand(3, 3))
    sh = torch.zeros(3, 27, device=dev)
    sh[:, [0, 9, 18]] = 1.0
    sh[:, [3, 12, 21]] = -0.3
    out = MeshRenderer(image_size=(size, size)).render(cam, triangles, crop_intrinsics(size, 3, device=dev),
                                                       albedo[None].expand(3, -1, -1), sh,
                                                       background=torch.ones(3, size, size, 3, device=dev))
    return list(to_uint8(out.image))


def canonical_views(grid: CanonicalGrid, depth: torch.Tensor, albedo: torch.Tensor, valid: torch.Tensor,
                    size: int = 256) -> list[np.ndarray]:
    """:func:`three_views` of a canonical face: depth (R, R) mm, albedo (R, R, 3), valid (R, R)."""
    vertices = grid_vertices(grid, depth[None])[0] - torch.tensor([0.0, 0.0, 60.0], device=depth.device)
    return three_views(vertices, grid_triangles(valid), albedo.reshape(-1, 3), size)


def safe_stem(face: str) -> str:
    """A file-name stem for a face name ``<image key>#<index>`` (``sub/img.jpg#0`` -> ``sub_img_0``)."""
    key, _, index = face.partition("#")
    stem = Path(key).with_suffix("").as_posix().replace("/", "_") + (f"_{index}" if index else "")
    return "".join(ch if ch.isalnum() or ch in "-_" else "_" for ch in stem) or "photo"
