"""Alignment and surface-distance metrics used by the evaluation protocols.

All functions take NumPy arrays in millimetres: meshes as vertices (N, 3) + triangles (F, 3),
point sets as (P, 3).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.spatial import cKDTree

from facerecon.facemodel.geometry import closest_points_on_mesh


@dataclass
class Similarity:
    """x -> scale * rotation @ x + translation."""

    scale: float
    rotation: np.ndarray
    translation: np.ndarray

    def apply(self, points: np.ndarray) -> np.ndarray:
        return self.scale * points @ self.rotation.T + self.translation

    def compose(self, inner: "Similarity") -> "Similarity":
        """self ∘ inner."""
        return Similarity(self.scale * inner.scale, self.rotation @ inner.rotation,
                          self.scale * self.rotation @ inner.translation + self.translation)


def umeyama(source: np.ndarray, target: np.ndarray, weights: np.ndarray | None = None,
            with_scale: bool = True) -> Similarity:
    """Least-squares similarity mapping source (P, 3) onto target (P, 3) (Umeyama 1991)."""
    w = np.ones(len(source)) if weights is None else np.asarray(weights, dtype=np.float64)
    w = w / w.sum()
    mu_s, mu_t = w @ source, w @ target
    s0, t0 = source - mu_s, target - mu_t
    cov = (t0 * w[:, None]).T @ s0
    u, d, vt = np.linalg.svd(cov)
    sign = np.eye(3)
    if np.linalg.det(u) * np.linalg.det(vt) < 0:
        sign[2, 2] = -1
    rotation = u @ sign @ vt
    variance = (w * (s0**2).sum(axis=1)).sum()
    scale = float(np.trace(np.diag(d) @ sign) / variance) if with_scale else 1.0
    return Similarity(scale, rotation, mu_t - scale * rotation @ mu_s)


def icp_similarity(source_vertices: np.ndarray, target_points: np.ndarray, initial: Similarity | None = None,
                   iterations: int = 60, tolerance: float = 1e-7, trim: float = 0.9) -> Similarity:
    """Align a predicted mesh's vertices to target points by ICP with one isotropic scale.

    Each iteration pairs every target point with its nearest transformed source vertex,
    keeps the closest ``trim`` fraction of pairs (robust to parts the prediction lacks) and
    solves the similarity in closed form. Stops when the mean pair distance changes by less
    than ``tolerance`` (relative).
    """
    current = initial or umeyama(np.zeros((1, 3)), np.zeros((1, 3)), with_scale=False)
    if initial is None:  # centroids and scale of the two sets first
        spread_s = np.sqrt(((source_vertices - source_vertices.mean(0)) ** 2).sum(1).mean())
        spread_t = np.sqrt(((target_points - target_points.mean(0)) ** 2).sum(1).mean())
        scale = spread_t / max(spread_s, 1e-12)
        current = Similarity(scale, np.eye(3), target_points.mean(0) - scale * source_vertices.mean(0))
    previous = np.inf
    for _ in range(iterations):
        moved = current.apply(source_vertices)
        distance, index = cKDTree(moved).query(target_points)
        keep = distance <= np.quantile(distance, trim)
        step = umeyama(moved[index[keep]], target_points[keep])
        current = step.compose(current)
        mean = float(distance[keep].mean())
        if abs(previous - mean) <= tolerance * max(mean, 1e-12):
            break
        previous = mean
    return current


def triangle_normals(vertices: np.ndarray, triangles: np.ndarray) -> np.ndarray:
    """Unit normals (F, 3) of triangles."""
    n = np.cross(vertices[triangles[:, 1]] - vertices[triangles[:, 0]], vertices[triangles[:, 2]] - vertices[triangles[:, 0]])
    return n / np.maximum(np.linalg.norm(n, axis=1, keepdims=True), 1e-12)


def surface_distances(points: np.ndarray, vertices: np.ndarray, triangles: np.ndarray
                      ) -> tuple[np.ndarray, np.ndarray]:
    """Per point: unsigned distance to the closest surface point, and point-to-plane distance
    (along the normal of the triangle holding that closest point)."""
    tri, bary, distance = closest_points_on_mesh(points, vertices, triangles)
    closest = (vertices[triangles[tri]] * bary[..., None]).sum(axis=1)
    plane = np.abs(((points - closest) * triangle_normals(vertices, triangles)[tri]).sum(axis=1))
    return distance, plane


def chunked_surface_distances(points: np.ndarray, vertices: np.ndarray, triangles: np.ndarray,
                              chunk: int = 20000) -> tuple[np.ndarray, np.ndarray]:
    """:func:`surface_distances` of many points (P, 3), ``chunk`` points at a time (bounded memory)."""
    parts = [surface_distances(points[i:i + chunk], vertices, triangles) for i in range(0, len(points), chunk)]
    return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])


def crop_sphere(vertices: np.ndarray, centre: np.ndarray, radius_mm: float,
                triangles: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray | None, np.ndarray]:
    """Vertices within ``radius_mm`` of ``centre`` (inclusive), triangles wholly inside
    (re-indexed), and the kept vertex indices."""
    keep = np.flatnonzero(np.linalg.norm(vertices - centre, axis=1) <= radius_mm)
    if triangles is None:
        return vertices[keep], None, keep
    remap = np.full(len(vertices), -1)
    remap[keep] = np.arange(len(keep))
    inside = np.all(remap[triangles] >= 0, axis=1)
    return vertices[keep], remap[triangles[inside]], keep


def find_nose_tip(vertices: np.ndarray, core_radius_mm: float = 35.0) -> np.ndarray:
    """The nose tip of a frontal face scan, found without landmarks.

    The face's forward axis is the principal axis of least variance (a face surface is a
    shallow shell), oriented so the shell is convex towards it (the centre of the face sticks
    out further than its border). The nose tip is the most forward point among the points
    within ``core_radius_mm`` of the axis through the centroid, refined to the median of the
    points within 3 mm of it (robust to spikes).
    """
    centre = vertices.mean(axis=0)
    centred = vertices - centre
    _, _, vt = np.linalg.svd(centred, full_matrices=False)
    forward = vt[2]
    depth = centred @ forward
    lateral = np.linalg.norm(centred - depth[:, None] * forward, axis=1)
    core = lateral <= np.percentile(lateral, 30)
    if (depth[core].mean() - depth[~core].mean()) < 0:
        forward, depth = -forward, -depth
    near_axis = lateral <= core_radius_mm
    candidates = np.flatnonzero(near_axis) if near_axis.any() else np.arange(len(vertices))
    tip = vertices[candidates[np.argmax(depth[candidates])]]
    close = np.linalg.norm(vertices - tip, axis=1) <= 3.0
    return np.median(vertices[close], axis=0)


@dataclass
class ScanError:
    """Errors of one prediction against one ground-truth scan (mm)."""

    rmse_point_to_plane: float
    mean_point_to_surface: float
    median_point_to_surface: float
    points: int
    alignment: Similarity


def scan_error(pred_vertices: np.ndarray, pred_triangles: np.ndarray, gt_points: np.ndarray,
               initial: Similarity | None = None) -> ScanError:
    """Align the prediction to the (cropped) ground truth by ICP with scale; point-to-plane RMSE
    and mean/median point-to-surface distance of the ground-truth points."""
    alignment = icp_similarity(pred_vertices, gt_points, initial)
    aligned = alignment.apply(pred_vertices)
    distance, plane = surface_distances(gt_points, aligned, pred_triangles)
    return ScanError(float(np.sqrt((plane**2).mean())), float(distance.mean()), float(np.median(distance)),
                     int(len(gt_points)), alignment)
