"""Mesh files: OBJ + MTL + texture PNG, PLY with vertex colours, GLB (binary glTF).

All writers are atomic (temporary file + rename) and take millimetre vertices.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from facerecon.io.atomic import atomic_path, atomic_write_text

SUPPORTED_FORMATS = ("obj", "ply", "glb")


@dataclass
class TexturedMesh:
    """A mesh ready to write.

    vertices: (N, 3) float32 mm; triangles: (F, 3) int; uv: (T, 2) in [0, 1] (origin bottom-left);
    triangle_uv: (F, 3) int; vertex_colors: (N, 3) uint8; texture: (H, W, 3) uint8 RGB or None.
    """

    vertices: np.ndarray
    triangles: np.ndarray
    uv: np.ndarray
    triangle_uv: np.ndarray
    vertex_colors: np.ndarray
    texture: np.ndarray | None = None


def parse_formats(text: str) -> list[str]:
    """``"obj,ply"`` -> ``["obj", "ply"]``; raises ValueError naming an unknown format."""
    formats = [f.strip().lower() for f in text.split(",") if f.strip()]
    unknown = [f for f in formats if f not in SUPPORTED_FORMATS]
    if unknown or not formats:
        raise ValueError(f"unknown mesh format(s) {', '.join(unknown) or '(none)'}; choose from "
                         f"{', '.join(SUPPORTED_FORMATS)}")
    return list(dict.fromkeys(formats))


def write_png(path: Path, rgb: np.ndarray) -> None:
    """Write an RGB uint8 image as PNG atomically."""
    ok, data = cv2.imencode(".png", np.ascontiguousarray(rgb[..., ::-1]))
    if not ok:
        raise OSError(f"cannot encode {path.name}")
    with atomic_path(path) as tmp:
        tmp.write_bytes(data.tobytes())


def write_obj(mesh: TexturedMesh, path: Path) -> list[Path]:
    """OBJ with UVs, an MTL and the texture PNG beside it. Returns the written paths."""
    path = Path(path)
    stem = path.stem
    written = [path]
    header = f"# facerecon mesh, millimetres\nmtllib {stem}.mtl\nusemtl {stem}\n"
    faces = np.concatenate([mesh.triangles[:, :, None], mesh.triangle_uv[:, :, None]], axis=2).reshape(-1, 6) + 1
    body = io.StringIO()
    np.savetxt(body, mesh.vertices, fmt="v %.4f %.4f %.4f")
    np.savetxt(body, mesh.uv, fmt="vt %.6f %.6f")
    np.savetxt(body, faces, fmt="f %d/%d %d/%d %d/%d")
    atomic_write_text(path, header + body.getvalue())
    mtl = [f"newmtl {stem}", "Ka 1 1 1", "Kd 1 1 1", "Ks 0 0 0", "d 1", "illum 1"]
    if mesh.texture is not None:
        texture_path = path.with_name(f"{stem}_texture.png")
        write_png(texture_path, mesh.texture)
        mtl.append(f"map_Kd {texture_path.name}")
        written.append(texture_path)
    atomic_write_text(path.with_suffix(".mtl"), "\n".join(mtl) + "\n")
    written.append(path.with_suffix(".mtl"))
    return written


def write_ply(mesh: TexturedMesh, path: Path) -> list[Path]:
    """Binary little-endian PLY with per-vertex RGB colours."""
    n, f = len(mesh.vertices), len(mesh.triangles)
    header = (
        "ply\nformat binary_little_endian 1.0\ncomment facerecon mesh, millimetres\n"
        f"element vertex {n}\nproperty float x\nproperty float y\nproperty float z\n"
        "property uchar red\nproperty uchar green\nproperty uchar blue\n"
        f"element face {f}\nproperty list uchar int vertex_indices\nend_header\n"
    ).encode("ascii")
    vertex = np.zeros(n, dtype=[("p", "<f4", 3), ("c", "u1", 3)])
    vertex["p"] = mesh.vertices
    vertex["c"] = mesh.vertex_colors
    face = np.zeros(f, dtype=[("n", "u1"), ("i", "<i4", 3)])
    face["n"] = 3
    face["i"] = mesh.triangles
    with atomic_path(path) as tmp:
        tmp.write_bytes(header + vertex.tobytes() + face.tobytes())
    return [Path(path)]


def _split_seams(mesh: TexturedMesh) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """One vertex per (position, uv) pair, as glTF needs: vertices, uv, colours, triangles."""
    pairs = np.stack([mesh.triangles.ravel(), mesh.triangle_uv.ravel()], axis=1)
    unique, inverse = np.unique(pairs, axis=0, return_inverse=True)
    return (mesh.vertices[unique[:, 0]], mesh.uv[unique[:, 1]], mesh.vertex_colors[unique[:, 0]],
            inverse.reshape(-1, 3))


def write_glb(mesh: TexturedMesh, path: Path) -> list[Path]:
    """Binary glTF with the texture embedded and smooth vertex normals.

    glTF's unit is the metre, so GLB vertices are the millimetre vertices / 1000.
    """
    import trimesh
    from PIL import Image

    from facerecon.facemodel.annotate import vertex_normals_np

    normals_full = vertex_normals_np(mesh.vertices.astype(np.float64), mesh.triangles)
    pairs = np.stack([mesh.triangles.ravel(), mesh.triangle_uv.ravel()], axis=1)
    unique = np.unique(pairs, axis=0)
    vertices, uv, colors, triangles = _split_seams(mesh)
    normals = normals_full[unique[:, 0]]
    if mesh.texture is not None:
        material = trimesh.visual.material.PBRMaterial(
            baseColorTexture=Image.fromarray(mesh.texture), metallicFactor=0.0, roughnessFactor=0.9)
        visual = trimesh.visual.TextureVisuals(uv=uv, material=material)
    else:
        visual = trimesh.visual.ColorVisuals(vertex_colors=colors)
    tm = trimesh.Trimesh(vertices=vertices / 1000.0, faces=triangles, visual=visual, process=False,
                         vertex_normals=normals)
    data = tm.export(file_type="glb")
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return [Path(path)]


def write_mesh(mesh: TexturedMesh, base: Path, formats: list[str]) -> list[Path]:
    """Write ``base.<fmt>`` for every format; returns every file written."""
    writers = {"obj": write_obj, "ply": write_ply, "glb": write_glb}
    written: list[Path] = []
    for fmt in formats:
        written += writers[fmt](mesh, Path(f"{base}.{fmt}"))
    return written
