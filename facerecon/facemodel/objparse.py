"""Minimal, fast Wavefront OBJ reading for importers (positions, UVs, polygons)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np


@dataclass
class ObjMesh:
    """Arrays read from an OBJ file.

    vertices: (N, 3) float32; uv: (T, 2) float32; polygons: (P, K) int64 vertex indices,
    0-based, padded with -1 where a polygon has fewer than K corners; polygon_uv: (P, K)
    int64 or None; materials: P material names ('' when none).
    """

    vertices: np.ndarray
    uv: np.ndarray
    polygons: np.ndarray
    polygon_uv: np.ndarray | None
    materials: list[str]


def read_obj_vertices(path: str | Path) -> np.ndarray:
    """Only the ``v`` lines of an OBJ file, (N, 3) float32 (fast path for blendshape files)."""
    lines = [ln[2:] for ln in Path(path).read_text(errors="replace").splitlines() if ln.startswith("v ")]
    values = np.array(" ".join(lines).split(), dtype=np.float64)
    if values.size % 3 and lines:
        values = np.array([ln.split()[:3] for ln in lines], dtype=np.float64).ravel()
    return values.reshape(-1, 3).astype(np.float32)


def read_obj(path: str | Path) -> ObjMesh:
    """Positions, texture coordinates, polygons (with UV indices) and materials of an OBJ."""
    vertices, uvs, faces, face_uv, materials = [], [], [], [], []
    material = ""
    for line in Path(path).read_text(errors="replace").splitlines():
        if line.startswith("v "):
            vertices.append(line.split()[1:4])
        elif line.startswith("vt "):
            uvs.append(line.split()[1:3])
        elif line.startswith("f "):
            corners = line.split()[1:]
            faces.append([int(c.split("/")[0]) for c in corners])
            parts = [c.split("/") for c in corners]
            face_uv.append([int(p[1]) if len(p) > 1 and p[1] else 0 for p in parts])
            materials.append(material)
        elif line.startswith("usemtl"):
            material = line.split(maxsplit=1)[1].strip() if len(line.split()) > 1 else ""
    verts = np.asarray(vertices, dtype=np.float64).astype(np.float32).reshape(-1, 3)
    uv = np.asarray(uvs, dtype=np.float64).astype(np.float32).reshape(-1, 2)
    width = max((len(f) for f in faces), default=3)

    def pad(rows: list[list[int]], count: int) -> np.ndarray:
        out = np.full((len(rows), width), -1, dtype=np.int64)
        for i, row in enumerate(rows):  # importer-time only, not a hot path
            idx = np.asarray(row, dtype=np.int64)
            out[i, : len(row)] = np.where(idx < 0, count + idx, idx - 1)
        return out

    polygons = pad(faces, len(verts))
    has_uv = face_uv and all(all(i != 0 for i in row) for row in face_uv)
    polygon_uv = pad(face_uv, len(uv)) if has_uv else None
    return ObjMesh(verts, uv, polygons, polygon_uv, materials)


def triangulate(polygons: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Fan-triangulate polygons (P, K) padded with -1.

    Returns:
        triangles (T, 3) and source (T,) the polygon each triangle came from.
    """
    tris, source = [], []
    for k in range(1, polygons.shape[1] - 1):
        valid = polygons[:, k + 1] >= 0
        tri = np.stack([polygons[:, 0], polygons[:, k], polygons[:, k + 1]], axis=1)[valid]
        tris.append(tri)
        source.append(np.flatnonzero(valid))
    triangles = np.concatenate(tris)
    src = np.concatenate(source)
    order = np.argsort(src, kind="stable")
    return triangles[order], src[order]
