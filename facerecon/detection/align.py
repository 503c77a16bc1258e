"""Similarity alignment of faces to a fixed five-point template (paper 000, sec. 6).

Paper 000 feeds its network 224x224 crops aligned with five facial points by a
similarity transform (rotation, uniform scale, translation). This module defines the
template and the transform, and warps crops from the full-resolution image.

Template (:data:`TEMPLATE5`, fractions of the crop side measured from its top-left outer
edge, x right, y down): the eye
centres lie on a horizontal line at 0.335 of the height, 0.33 of the width apart; the
nose tip is 0.55 and the mouth corners 0.90 eye-distances below that line, the mouth
corners 0.84 eye-distances apart. These are proportions of an average adult face
measured on mediapipe landmarks, made symmetric. At this scale the whole mesh, from
the top of the forehead (0.71 eye-distances above the eyes) to the chin (1.72 below),
spans 0.10..0.90 of the crop height, so forehead and chin fit with a margin.

Matrices are 2x3 affine ``M`` with ``crop = M @ [x, y, 1]``, mapping original-image
pixels to crop pixels (pixel centres at integer coordinates, as in OpenCV).
"""

from __future__ import annotations

import cv2
import numpy as np

#: Five-point template as fractions of the crop side (x, y), in
#: :data:`facerecon.detection.landmarks.POINTS5_NAMES` order.
TEMPLATE5 = np.array([
    [0.335, 0.335],     # right eye centre (image left)
    [0.665, 0.335],     # left eye centre
    [0.500, 0.5165],    # nose tip
    [0.3614, 0.632],    # right mouth corner
    [0.6386, 0.632],    # left mouth corner
], dtype=np.float64)

DEFAULT_CROP_SIZE = 224


def template_points(size: int = DEFAULT_CROP_SIZE) -> np.ndarray:
    """(5, 2) float64 template in pixels of a ``size`` x ``size`` crop."""
    # Fractions measure from the crop's outer edge; pixel centres sit at integers, so the
    # crop centre (fraction 0.5) is at (size - 1) / 2.
    return TEMPLATE5 * float(size) - 0.5


def estimate_similarity(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """Least-squares similarity transform (Umeyama, no reflection) taking ``src`` to ``dst``.

    Args:
        src, dst: (N, 2) corresponding points, N >= 2.
    Returns:
        (2, 3) float64 matrix ``M`` with ``dst ~= M @ [src, 1]``.
    """
    src = np.asarray(src, dtype=np.float64)[:, :2]
    dst = np.asarray(dst, dtype=np.float64)[:, :2]
    mu_s, mu_d = src.mean(axis=0), dst.mean(axis=0)
    s0, d0 = src - mu_s, dst - mu_d
    var_s = (s0 ** 2).sum() / len(src)
    if var_s <= 1e-12:
        raise ValueError("degenerate source points")
    cov = d0.T @ s0 / len(src)
    u, sig, vt = np.linalg.svd(cov)
    fix = np.eye(2)
    if np.linalg.det(u) * np.linalg.det(vt) < 0:
        fix[1, 1] = -1.0
    rot = u @ fix @ vt
    scale = (sig * np.diag(fix)).sum() / var_s
    m = np.empty((2, 3))
    m[:, :2] = scale * rot
    m[:, 2] = mu_d - m[:, :2] @ mu_s
    return m


def alignment_matrix(points5: np.ndarray, size: int = DEFAULT_CROP_SIZE) -> np.ndarray:
    """(2, 3) float64 matrix mapping original-image pixels to the aligned crop.

    Args:
        points5: (5, 2) points in :data:`~facerecon.detection.landmarks.POINTS5_NAMES` order.
        size: crop side in pixels.
    """
    return estimate_similarity(points5, template_points(size))


def invert_affine(m: np.ndarray) -> np.ndarray:
    """(2, 3) inverse of an invertible (2, 3) affine matrix (crop -> original for an
    alignment matrix)."""
    return cv2.invertAffineTransform(np.asarray(m, dtype=np.float64))


def similarity_scale(m: np.ndarray) -> float:
    """Uniform scale of a similarity matrix (crop pixels per original pixel)."""
    m = np.asarray(m, dtype=np.float64)
    return float(np.sqrt(abs(np.linalg.det(m[:, :2]))))


def transform_points(points: np.ndarray, m: np.ndarray) -> np.ndarray:
    """Apply ``m`` to (N, 2) or (N, 3) points; a third column (depth) is multiplied by the
    transform's scale. Returns float32 of the same shape."""
    p = np.asarray(points, dtype=np.float64)
    m = np.asarray(m, dtype=np.float64)
    out = p.copy()
    out[:, :2] = p[:, :2] @ m[:, :2].T + m[:, 2]
    if p.shape[1] > 2:
        out[:, 2:] = p[:, 2:] * similarity_scale(m)
    return out.astype(np.float32)


def warp_crop(image: np.ndarray, m: np.ndarray, size: int = DEFAULT_CROP_SIZE,
              border_value: int | tuple = 0) -> np.ndarray:
    """Aligned crop from the full-resolution image.

    Only the part of ``image`` under the crop is touched. When the crop shrinks the face
    (scale < 0.75) that part is first reduced with area averaging, so the bilinear warp
    does not alias. Pixels outside the image get ``border_value``.

    Args:
        image: (H, W) or (H, W, C) uint8.
        m: (2, 3) original -> crop matrix.
        size: output side.
    Returns:
        (size, size[, C]) array of ``image``'s dtype.
    """
    m = np.asarray(m, dtype=np.float64)
    h, w = image.shape[:2]
    inv = invert_affine(m)
    corners = np.array([[0, 0], [size - 1, 0], [0, size - 1], [size - 1, size - 1]], dtype=np.float64)
    src = corners @ inv[:, :2].T + inv[:, 2]
    x0 = int(np.floor(src[:, 0].min())) - 2
    y0 = int(np.floor(src[:, 1].min())) - 2
    x1 = int(np.ceil(src[:, 0].max())) + 3
    y1 = int(np.ceil(src[:, 1].max())) + 3
    x0c, y0c, x1c, y1c = max(x0, 0), max(y0, 0), min(x1, w), min(y1, h)
    shape = (size, size) + image.shape[2:]
    if x1c <= x0c or y1c <= y0c:
        return np.full(shape, border_value if np.isscalar(border_value) else 0, dtype=image.dtype)
    roi = image[y0c:y1c, x0c:x1c]
    local = m.copy()
    local[:, 2] += m[:, :2] @ np.array([x0c, y0c], dtype=np.float64)  # roi pixel -> crop
    scale = similarity_scale(m)
    if scale < 0.75:
        rw = max(1, int(round(roi.shape[1] * scale)))
        rh = max(1, int(round(roi.shape[0] * scale)))
        fx, fy = rw / roi.shape[1], rh / roi.shape[0]
        roi = cv2.resize(roi, (rw, rh), interpolation=cv2.INTER_AREA)
        # the resized pixel centre q sits at roi pixel a * q + b
        a = np.diag([1.0 / fx, 1.0 / fy])
        b = np.array([0.5 / fx - 0.5, 0.5 / fy - 0.5])
        local = np.concatenate([local[:, :2] @ a, (local[:, :2] @ b + local[:, 2])[:, None]], axis=1)
    out = cv2.warpAffine(np.ascontiguousarray(roi), local, (size, size), flags=cv2.INTER_LINEAR,
                         borderMode=cv2.BORDER_CONSTANT, borderValue=border_value)
    return out.reshape(shape)


def valid_mask(m: np.ndarray, image_size: tuple[int, int], size: int = DEFAULT_CROP_SIZE) -> np.ndarray:
    """(size, size) uint8 mask, 255 where the crop pixel comes from inside the image.

    Args:
        m: (2, 3) original -> crop matrix.
        image_size: (width, height) of the original image.
    """
    inv = invert_affine(m)
    v, u = np.mgrid[0:size, 0:size].astype(np.float64)
    x = inv[0, 0] * u + inv[0, 1] * v + inv[0, 2]
    y = inv[1, 0] * u + inv[1, 1] * v + inv[1, 2]
    w, h = image_size
    inside = (x >= -0.5) & (x <= w - 0.5) & (y >= -0.5) & (y <= h - 0.5)
    return inside.astype(np.uint8) * 255
