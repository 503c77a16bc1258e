"""Region masks on the aligned crop, filled from face-mesh contours.

Masks are (S, S) uint8 with 255 inside the region and 0 outside:

* ``face``: inside the face oval (forehead top to chin, cheek to cheek);
* ``eyes``: inside both eyelid contours;
* ``brows``: inside both eyebrow outlines (upper and lower brow edge);
* ``lips``: the lip tissue, i.e. inside the outer lip contour and outside the inner one;
* ``inner_mouth``: inside the inner lip contour (teeth, tongue, mouth cavity; empty when
  the lips are closed), the region of paper 002's inner-mouth loss.
"""

from __future__ import annotations

import cv2
import numpy as np

from facerecon.detection.landmarks import (FACE_OVAL, LEFT_BROW, LEFT_EYE, LIPS_INNER, LIPS_OUTER, RIGHT_BROW,
                                           RIGHT_EYE)

MASK_NAMES = ("face", "eyes", "brows", "lips", "inner_mouth")
_SHIFT = 4  # sub-pixel bits for cv2.fillPoly


def _fill(size: int, rings: list[np.ndarray]) -> np.ndarray:
    mask = np.zeros((size, size), dtype=np.uint8)
    for ring in rings:  # one call per ring: fillPoly treats overlapping rings as holes
        poly = np.round(ring * (1 << _SHIFT)).astype(np.int32).reshape(1, -1, 2)
        cv2.fillPoly(mask, poly, 255, lineType=cv2.LINE_8, shift=_SHIFT)
    return mask


def polygon_mask(points: np.ndarray, indices, size: int) -> np.ndarray:
    """(size, size) uint8 mask of the polygon through ``points[indices]`` ((N, 2+) crop pixels)."""
    return _fill(size, [np.asarray(points, dtype=np.float64)[list(indices), :2]])


def region_masks(crop_landmarks: np.ndarray, size: int) -> dict[str, np.ndarray]:
    """All region masks of one face.

    Args:
        crop_landmarks: (478, 2+) or (468, 2+) landmarks in crop pixels.
        size: crop side.
    Returns:
        name -> (size, size) uint8 {0, 255}, names as in :data:`MASK_NAMES`.
    """
    p = np.asarray(crop_landmarks, dtype=np.float64)[:, :2]

    def ring(indices) -> np.ndarray:
        return p[list(indices)]

    inner = _fill(size, [ring(LIPS_INNER)])
    outer = _fill(size, [ring(LIPS_OUTER)])
    return {
        "face": _fill(size, [ring(FACE_OVAL)]),
        "eyes": _fill(size, [ring(RIGHT_EYE), ring(LEFT_EYE)]),
        "brows": _fill(size, [ring(RIGHT_BROW), ring(LEFT_BROW)]),
        "lips": np.where(inner > 0, 0, outer).astype(np.uint8),
        "inner_mouth": inner,
    }
