"""Small geometric helpers on triangle meshes (NumPy, vectorised)."""

from __future__ import annotations

import numpy as np
from scipy.spatial import cKDTree


def closest_points_on_mesh(
    points: np.ndarray, vertices: np.ndarray, triangles: np.ndarray, candidates: int = 24
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Closest surface point of a mesh for each query point.

    Candidate triangles are the ``candidates`` nearest by centroid; exact point-triangle
    distances are computed for those (vectorised, Ericson's region tests).

    Args:
        points: (P, 3) query points.
        vertices: (N, 3); triangles: (F, 3).

    Returns:
        triangle index (P,), barycentric coordinates (P, 3), distance (P,).
    """
    centroids = vertices[triangles].mean(axis=1)
    k = min(candidates, len(triangles))
    _, cand = cKDTree(centroids).query(points, k=k)
    cand = cand.reshape(len(points), k)
    a, b, c = (vertices[triangles[cand, i]] for i in range(3))  # (P, k, 3)
    p = points[:, None, :]
    bary = _closest_barycentric(p, a, b, c)
    closest = bary[..., :1] * a + bary[..., 1:2] * b + bary[..., 2:] * c
    dist = np.linalg.norm(closest - p, axis=-1)
    best = dist.argmin(axis=1)
    rows = np.arange(len(points))
    return cand[rows, best], bary[rows, best], dist[rows, best]


def _closest_barycentric(p, a, b, c):
    """Barycentric coordinates (..., 3) of the closest point on triangles (a, b, c) to p."""
    ab, ac, ap = b - a, c - a, p - a
    d1, d2 = (ab * ap).sum(-1), (ac * ap).sum(-1)
    bp = p - b
    d3, d4 = (ab * bp).sum(-1), (ac * bp).sum(-1)
    cp = p - c
    d5, d6 = (ab * cp).sum(-1), (ac * cp).sum(-1)
    va = d3 * d6 - d5 * d4
    vb = d5 * d2 - d1 * d6
    vc = d1 * d4 - d3 * d2
    eps = 1e-12
    # interior solution
    denom = va + vb + vc
    denom = np.where(np.abs(denom) < eps, eps, denom)
    v = vb / denom
    w = vc / denom
    out = np.stack([1 - v - w, v, w], axis=-1)

    def put(mask, bary):
        nonlocal out
        out = np.where(mask[..., None], bary, out)

    # edges (checked before vertices so vertex regions take precedence)
    mask_bc = (va <= 0) & ((d4 - d3) >= 0) & ((d5 - d6) >= 0)
    t = (d4 - d3) / np.where((d4 - d3) + (d5 - d6) == 0, eps, (d4 - d3) + (d5 - d6))
    put(mask_bc, np.stack([np.zeros_like(t), 1 - t, t], axis=-1))
    mask_ac = (vb <= 0) & (d2 >= 0) & (d6 <= 0)
    t = d2 / np.where(d2 - d6 == 0, eps, d2 - d6)
    put(mask_ac, np.stack([1 - t, np.zeros_like(t), t], axis=-1))
    mask_ab = (vc <= 0) & (d1 >= 0) & (d3 <= 0)
    t = d1 / np.where(d1 - d3 == 0, eps, d1 - d3)
    put(mask_ab, np.stack([1 - t, t, np.zeros_like(t)], axis=-1))
    one = np.ones_like(d1)
    zero = np.zeros_like(d1)
    put((d6 >= 0) & (d5 <= d6), np.stack([zero, zero, one], axis=-1))
    put((d3 >= 0) & (d4 <= d3), np.stack([zero, one, zero], axis=-1))
    put((d1 <= 0) & (d2 <= 0), np.stack([one, zero, zero], axis=-1))
    return out
