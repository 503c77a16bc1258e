"""Annotations every face model carries, derived from its geometry and 68 landmarks.

Importers call :func:`derive_regions`, :func:`symmetric_pairs` and, for models without
a measured albedo space, :func:`laplacian_albedo_space`. All functions take the model's
mean shape in millimetres in the canonical head frame (+x towards the subject's left,
+y up, +z out of the face).
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp
from scipy.sparse.linalg import eigsh
from scipy.spatial import cKDTree


# iBUG 68-point landmark groups (0-based indices).
JAW = np.arange(0, 17)
BROW_RIGHT = np.arange(17, 22)
BROW_LEFT = np.arange(22, 27)
NOSE = np.arange(27, 36)
EYE_RIGHT = np.arange(36, 42)
EYE_LEFT = np.arange(42, 48)
LIPS_OUTER = np.arange(48, 60)
LIPS_INNER = np.arange(60, 68)

# Mean linear reflectance used for the synthetic albedo of models without one.
# Values are typical light-to-medium skin reflectance in [0, 1] (sRGB-like, as BFM
# albedo is stored); lips and brows get darker tints so rendered means read as faces.
SKIN_ALBEDO = np.array([0.71, 0.52, 0.43], dtype=np.float32)
LIP_ALBEDO = np.array([0.62, 0.36, 0.34], dtype=np.float32)
BROW_ALBEDO = np.array([0.32, 0.23, 0.19], dtype=np.float32)
EYE_ALBEDO = np.array([0.45, 0.36, 0.33], dtype=np.float32)
INNER_MOUTH_ALBEDO = np.array([0.30, 0.12, 0.12], dtype=np.float32)


def _polygon_signed_distance(points_xy: np.ndarray, polygon_xy: np.ndarray) -> np.ndarray:
    """Signed distance (P,) of points to a closed polygon (Q, 2): >0 inside, <0 outside."""
    a = polygon_xy.astype(np.float64)
    b = np.roll(a, -1, axis=0)
    p = points_xy.astype(np.float64)[:, None, :]  # (P, 1, 2)
    ab = (b - a)[None]  # (1, Q, 2)
    t = np.clip(((p - a[None]) * ab).sum(-1) / np.maximum((ab * ab).sum(-1), 1e-12), 0.0, 1.0)
    closest = a[None] + t[..., None] * ab
    dist = np.sqrt(((p - closest) ** 2).sum(-1)).min(axis=1)
    # even-odd rule for inside/outside, vectorised over points and edges
    ya, yb = a[None, :, 1], b[None, :, 1]
    px, py = p[..., 0], p[..., 1]
    crosses = (ya > py) != (yb > py)
    x_at = a[None, :, 0] + (py - ya) * (b[None, :, 0] - a[None, :, 0]) / np.where(yb - ya == 0, 1e-12, yb - ya)
    inside = (crosses & (px < x_at)).sum(axis=1) % 2 == 1
    return np.where(inside, dist, -dist)


def _band_polygon(line_xy: np.ndarray, half_width: float) -> np.ndarray:
    """A closed polygon (2L, 2) around a polyline (L, 2), ``half_width`` on each side."""
    tangent = np.gradient(line_xy, axis=0)
    tangent /= np.maximum(np.linalg.norm(tangent, axis=1, keepdims=True), 1e-9)
    normal = np.stack([-tangent[:, 1], tangent[:, 0]], axis=1)
    return np.concatenate([line_xy + half_width * normal, (line_xy - half_width * normal)[::-1]])


def vertex_normals_np(vertices: np.ndarray, triangles: np.ndarray) -> np.ndarray:
    """Area-weighted unit vertex normals (N, 3) of a mesh (NumPy)."""
    v0, v1, v2 = (vertices[triangles[:, k]] for k in range(3))
    face_n = np.cross(v1 - v0, v2 - v0)
    normals = np.zeros_like(vertices, dtype=np.float64)
    for k in range(3):
        np.add.at(normals, triangles[:, k], face_n)
    return (normals / np.maximum(np.linalg.norm(normals, axis=1, keepdims=True), 1e-12)).astype(np.float32)


def derive_regions(
    mean_shape: np.ndarray,
    triangles: np.ndarray,
    landmarks68: np.ndarray,
    face_vertices: np.ndarray | None = None,
) -> dict[str, np.ndarray]:
    """Named vertex regions from the frontal projection of the mean shape.

    Args:
        mean_shape: (N, 3) millimetres, canonical frame.
        triangles: (F, 3) vertex indices.
        landmarks68: (68,) vertex index per iBUG landmark.
        face_vertices: optional (M,) indices of the face area; default every vertex
            whose normal faces forward (+z) within the jaw/brow bounding region.

    Returns:
        dict with int32 index arrays: ``face``, ``photometric`` (front of the face from the
        jaw line to the forehead: the rendered region of the photometric loss), ``skin``
        (photometric minus eyes, brows, lips, inner mouth and nostrils: the region of the
        texture-flatness loss, paper 000 eq. 6), ``eyes``, ``brows``, ``lips``,
        ``inner_mouth``, ``nose``.
    """
    n = mean_shape.shape[0]
    xy = mean_shape[:, :2].astype(np.float64)
    lm = mean_shape[landmarks68]
    lm_xy = lm[:, :2].astype(np.float64)
    normals = vertex_normals_np(mean_shape, triangles)
    interocular = float(np.linalg.norm(lm_xy[36:42].mean(0) - lm_xy[42:48].mean(0)))
    if face_vertices is None:
        forward = normals[:, 2] > 0.1
        jaw_poly = np.concatenate([lm_xy[JAW], lm_xy[np.r_[26:16:-1]] + [0, 0.5 * interocular]])
        face_mask = forward & (_polygon_signed_distance(xy, jaw_poly) >= -0.05 * interocular)
    else:
        face_mask = np.zeros(n, bool)
        face_mask[np.asarray(face_vertices)] = True

    # Only vertices near the front surface take part in frontal-projection regions: a
    # vertex behind the face (ear, back of head, mouth socket) shares xy with the front.
    depth_ok = mean_shape[:, 2] > (lm[:, 2].min() - 0.35 * interocular)
    candidates = face_mask & depth_ok

    def region(polygon: np.ndarray, margin: float) -> np.ndarray:
        inside = _polygon_signed_distance(xy, polygon) >= -margin
        return candidates & inside

    eyes = region(lm_xy[EYE_RIGHT], 0.08 * interocular) | region(lm_xy[EYE_LEFT], 0.08 * interocular)
    brows = region(_band_polygon(lm_xy[BROW_RIGHT], 0.09 * interocular), 0.0) | region(
        _band_polygon(lm_xy[BROW_LEFT], 0.09 * interocular), 0.0
    )
    inner_mouth = region(lm_xy[LIPS_INNER], 0.02 * interocular)
    # Mouth interior geometry (teeth, socket) lies behind the lips: include it.
    mouth_socket = face_mask & (_polygon_signed_distance(xy, lm_xy[LIPS_INNER]) >= -0.02 * interocular) & (
        mean_shape[:, 2] < lm[LIPS_INNER, 2].min() - 0.02 * interocular
    )
    inner_mouth |= mouth_socket
    lips = region(lm_xy[LIPS_OUTER], 0.03 * interocular) & ~inner_mouth
    nostril_poly = np.concatenate([lm_xy[31:36], lm_xy[[33]] + [0, 0.12 * interocular]])
    nose = region(np.concatenate([lm_xy[[39, 42]], lm_xy[[35, 34, 33, 32, 31]]]), 0.05 * interocular)
    nostrils = region(nostril_poly, 0.02 * interocular)
    # The photometric region: the front of the face between the jaw line and a forehead line
    # raised 0.6 inter-ocular distances above the brows (no ears, neck or hair line).
    forehead = lm_xy[np.r_[26:16:-1]] + [0, 0.6 * interocular]
    front_poly = np.concatenate([lm_xy[JAW], forehead])
    photometric = region(front_poly, 0.02 * interocular)
    skin = photometric & ~eyes & ~brows & ~lips & ~inner_mouth & ~nostrils
    as_idx = lambda m: np.flatnonzero(m).astype(np.int32)  # noqa: E731
    return {
        "face": as_idx(face_mask),
        "skin": as_idx(skin),
        "eyes": as_idx(eyes),
        "brows": as_idx(brows),
        "lips": as_idx(lips),
        "inner_mouth": as_idx(inner_mouth),
        "nose": as_idx(nose),
        "photometric": as_idx(photometric),
    }


def symmetric_pairs(mean_shape: np.ndarray, tolerance_mm: float = 1.0) -> np.ndarray:
    """Mutual nearest left/right vertex pairs under the mirror x -> -x.

    Args:
        mean_shape: (N, 3) millimetres, symmetric about x = 0.
        tolerance_mm: largest distance between a vertex's mirror image and its partner.

    Returns:
        (P, 2) int32 pairs (i, j) with x_i > 0 > x_j; midline vertices are left out.
    """
    mirrored = mean_shape * np.array([-1.0, 1.0, 1.0])
    tree = cKDTree(mean_shape)
    dist, partner = tree.query(mirrored)
    idx = np.arange(len(mean_shape))
    mutual = partner[partner] == idx
    keep = mutual & (dist <= tolerance_mm) & (mean_shape[:, 0] > 1e-3) & (partner != idx)
    return np.stack([idx[keep], partner[keep]], axis=1).astype(np.int32)


def graph_laplacian(n_vertices: int, triangles: np.ndarray) -> sp.csr_matrix:
    """Uniform (combinatorial) graph Laplacian L = D - A of a triangle mesh, (N, N)."""
    edges = np.concatenate([triangles[:, [0, 1]], triangles[:, [1, 2]], triangles[:, [2, 0]]])
    edges = np.concatenate([edges, edges[:, ::-1]])
    adjacency = sp.coo_matrix(
        (np.ones(len(edges)), (edges[:, 0], edges[:, 1])), shape=(n_vertices, n_vertices)
    ).tocsr()
    adjacency.data[:] = 1.0
    degree = sp.diags(np.asarray(adjacency.sum(axis=1)).ravel())
    return (degree - adjacency).tocsr()


def laplacian_albedo_space(
    mean_shape: np.ndarray,
    triangles: np.ndarray,
    regions: dict[str, np.ndarray],
    n_modes: int = 27,
    dc_std: float = 0.08,
    varying_std: float = 0.04,
) -> tuple[np.ndarray, np.ndarray]:
    """A smooth synthetic albedo space for models that have none (e.g. ICT-FaceKit).

    The mean is a typical skin reflectance with darker lips, brows and inner mouth
    (tints softened by a few Laplacian smoothing passes). The basis holds, for each RGB
    channel independently, the ``n_modes`` lowest-frequency eigenvectors of the mesh's
    graph Laplacian (normalised to unit RMS). The constant mode is scaled by ``dc_std``; the
    others by ``1 / (1 + lambda_k / lambda_1)``, renormalised so that together they vary by
    ``varying_std`` RMS per channel. Coefficients have an N(0, 1) prior and high
    frequencies vary less.

    Returns:
        albedo_mean (N, 3) float32 and albedo_basis (3 * n_modes, N, 3) float32, the
        modes ordered channel-major (R modes, then G, then B).
    """
    n = mean_shape.shape[0]
    lap = graph_laplacian(n, triangles)
    mean = np.tile(SKIN_ALBEDO, (n, 1)).astype(np.float64)
    for name, colour in (("lips", LIP_ALBEDO), ("brows", BROW_ALBEDO), ("eyes", EYE_ALBEDO),
                         ("inner_mouth", INNER_MOUTH_ALBEDO)):
        if name in regions and len(regions[name]):
            mean[regions[name]] = colour
    degree = np.asarray(lap.diagonal()).clip(min=1)
    adjacency = sp.diags(degree) - lap
    for _ in range(3):  # soften region borders
        mean = 0.5 * mean + 0.5 * (adjacency @ mean) / degree[:, None]
    k = min(n_modes, n - 2)
    # Shift-invert about a small negative shift finds the smallest eigenvalues quickly. A fixed
    # start vector and a sign convention (largest entry positive) make the space the same on
    # every import: ARPACK's default random start flips modes, so coefficients would mean
    # different colours from one import to the next.
    eigenvalues, eigenvectors = eigsh(lap.astype(np.float64), k=k, sigma=-1e-3, which="LM",
                                      v0=np.linspace(1.0, 2.0, n))
    order = np.argsort(eigenvalues)
    eigenvalues, eigenvectors = eigenvalues[order], eigenvectors[:, order]
    largest = eigenvectors[np.abs(eigenvectors).argmax(axis=0), np.arange(k)]
    eigenvectors = eigenvectors * np.where(largest < 0, -1.0, 1.0)[None, :]
    eigenvectors = eigenvectors / np.sqrt((eigenvectors**2).mean(axis=0, keepdims=True))
    reference = eigenvalues[1] if k > 1 and eigenvalues[1] > 1e-9 else 1.0
    # Constant mode: overall skin tone (std dc_std). Varying modes: std falling as
    # 1 / (1 + lambda_k / lambda_1), scaled so together they vary by varying_std (RMS)
    # per channel, about what skin varies over a face.
    std = 1.0 / (1.0 + np.clip(eigenvalues, 0, None) / reference)
    std[1:] *= varying_std / max(float(np.sqrt((std[1:] ** 2).sum())), 1e-12)
    std[0] = dc_std
    modes = (eigenvectors * std[None, :]).T  # (k, N)
    basis = np.zeros((3 * k, n, 3), dtype=np.float32)
    for channel in range(3):
        basis[channel * k:(channel + 1) * k, :, channel] = modes
    return mean.astype(np.float32), basis


#: Mean specular albedo (grey, linear) by region of the default space: skin reflects a few per
#: cent specularly at normal incidence (Fresnel F0 of skin ~0.028, Weyrich et al. 2006) and
#: oily regions more; paper 002's specular albedo carries the light's scale too, so the values
#: are the product of both for a typical flash or window light. Eyes (wet cornea) are shiny,
#: brows and the inner mouth hardly.
SPECULAR_BY_REGION = {"skin": 0.10, "t_zone": 0.18, "lips": 0.14, "eyes": 0.30, "brows": 0.03, "inner_mouth": 0.04}
#: Prior standard deviation of each mode of the default specular space (grey reflectance units)
SPECULAR_MODE_STD = {"overall": 0.06, "t_zone": 0.06, "lower_face": 0.04, "lips": 0.05}


def default_specular_space(mean_shape: np.ndarray, triangles: np.ndarray, regions: dict[str, np.ndarray],
                           landmarks68: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """A plausible specular albedo space for face models without a measured one (e.g. ICT).

    Grey (equal in R, G, B: skin's specular reflection is not tinted by its pigments). The mean
    is :data:`SPECULAR_BY_REGION`, where the T-zone is the nose region plus the skin above the
    brows; the basis has one smooth mode per entry of :data:`SPECULAR_MODE_STD` (overall level,
    T-zone, the skin below the nose, lips), each a region indicator softened by Laplacian
    passes and scaled to that standard deviation at the region's centre. Coefficients have an
    N(0, 1) prior. Deterministic and cheap (sparse smoothing only).

    Args:
        mean_shape: (N, 3) mm, canonical frame (+y up); triangles: (F, 3);
        regions: the model's vertex regions (``skin``, ``nose``, ``lips``, ``eyes``, ``brows``,
            ``inner_mouth``; missing ones are skipped); landmarks68: (68,) vertex indices.

    Returns:
        specular_mean (N, 3) float32 and specular_basis (4, N, 3) float32.
    """
    n = mean_shape.shape[0]
    lap = graph_laplacian(n, triangles)
    degree = np.asarray(lap.diagonal()).clip(min=1)
    adjacency = sp.diags(degree) - lap

    def smooth(values: np.ndarray, passes: int = 4) -> np.ndarray:
        for _ in range(passes):
            values = 0.5 * values + 0.5 * (adjacency @ values) / degree
        return values

    def indicator(index) -> np.ndarray:
        out = np.zeros(n)
        if index is not None and len(index):
            out[np.asarray(index)] = 1.0
        return out

    y = mean_shape[:, 1]
    skin = indicator(regions.get("skin"))
    brow_line = float(mean_shape[landmarks68[np.r_[BROW_RIGHT, BROW_LEFT]], 1].mean())
    nose_bottom = float(mean_shape[landmarks68[33], 1])
    t_zone = np.maximum(indicator(regions.get("nose")), skin * (y > brow_line))
    lower_face = skin * (y < nose_bottom) * (1 - indicator(regions.get("lips")))
    mean = np.full(n, SPECULAR_BY_REGION["skin"])
    for name, mask in (("t_zone", t_zone), ("lips", indicator(regions.get("lips"))),
                       ("eyes", indicator(regions.get("eyes"))), ("brows", indicator(regions.get("brows"))),
                       ("inner_mouth", indicator(regions.get("inner_mouth")))):
        mean = np.where(mask > 0, SPECULAR_BY_REGION[name], mean)
    mean = smooth(mean, 3)
    masks = {"overall": np.ones(n), "t_zone": t_zone, "lower_face": lower_face, "lips": indicator(regions.get("lips"))}
    basis = np.zeros((len(SPECULAR_MODE_STD), n, 3), dtype=np.float32)
    for k, (name, std) in enumerate(SPECULAR_MODE_STD.items()):
        mode = smooth(masks[name])
        peak = float(mode.max())
        if peak > 0:
            basis[k] = (mode / peak * std)[:, None]
    return np.repeat(mean[:, None], 3, axis=1).astype(np.float32), basis


def cylindrical_uv(mean_shape: np.ndarray) -> np.ndarray:
    """Per-vertex texture coordinates (N, 2) in [0, 1] from a cylindrical unwrap about +y.

    Used for models shipped without UVs (e.g. BFM). The seam is at the back of the head.
    """
    centre = mean_shape.mean(axis=0)
    p = mean_shape - centre
    angle = np.arctan2(p[:, 0], p[:, 2])  # 0 at the front
    u = 0.5 + angle / (2 * np.pi)
    height = p[:, 1]
    v = (height - height.min()) / max(float(np.ptp(height)), 1e-9)
    uv = np.stack([u, v], axis=1)
    # stretch the used range to fill the texture
    uv = (uv - uv.min(0)) / np.maximum(np.ptp(uv, axis=0), 1e-9)
    return uv.astype(np.float32)
