"""Landmark index tables over mediapipe's 478-point face mesh.

Indices 0..467 are mediapipe's face-mesh vertices, 468..477 the refined irises
(468 right iris centre, 469..472 its ring; 473 left iris centre, 474..477 its ring).
"Right" and "left" are the subject's: the subject's right eye appears on the image's left.

The 68-point table :data:`IBUG68_FROM_MP478` picks one mesh vertex per iBUG-300W point.
It was derived for this project as follows (docs/detection.md has the figure-free version):

* jaw (iBUG 1-17): the face-oval chain from the ear at eye height (127 / 356) down to the
  chin (152), sampled at equal arc length on a frontal face (snapped to the nearest oval
  vertex); the two sides are mirror images of each other;
* brows (18-27): the upper brow contour, outer to inner end (70..107 / 336..300);
* nose bridge (28-31): midline vertices from between the eyes (168) to the most
  protruding tip vertex (4), about evenly spaced;
* nose base (32-36): the lower nostril rim through the subnasale (98, 97, 2, 326, 327);
* eyes (37-48): eyelid contour vertices: corners, and two points on each lid at about
  one and two thirds of the way between the corners;
* outer lips (49-60): corners (61, 291), the cupid's bow peaks (37, 267), the upper
  midline (0), points halfway between corner and peak (40, 270), and the lower lip at
  thirds (321, 314, 17, 84, 91);
* inner lips (61-68): inner corners (78, 308), midline (13, 14) and the halfway points.

Every left/right pair of the table is a mirror pair of the mesh (tested).
"""

from __future__ import annotations

import numpy as np

N_MESH = 468
N_REFINED = 478

#: iBUG 68-point index (0-based) -> mediapipe 478-mesh vertex index.
IBUG68_FROM_MP478 = np.array([
    # jaw 0-16, from the subject's right ear (image left) over the chin to the left ear
    127, 234, 132, 58, 172, 136, 149, 148, 152, 377, 378, 365, 397, 288, 361, 454, 356,
    # right brow 17-21 (outer -> inner), left brow 22-26 (inner -> outer)
    70, 63, 105, 66, 107, 336, 296, 334, 293, 300,
    # nose bridge 27-30 (top -> tip), nose base 31-35 (right -> left)
    168, 197, 5, 4, 98, 97, 2, 326, 327,
    # right eye 36-41: outer corner, upper lid x2, inner corner, lower lid x2
    33, 160, 158, 133, 153, 144,
    # left eye 42-47: inner corner, upper lid x2, outer corner, lower lid x2
    362, 385, 387, 263, 373, 380,
    # outer lips 48-59: right corner, upper lip to left corner, lower lip back
    61, 40, 37, 0, 267, 270, 291, 321, 314, 17, 84, 91,
    # inner lips 60-67: right inner corner, upper, left inner corner, lower
    78, 81, 13, 311, 308, 402, 14, 178,
], dtype=np.int64)

#: iBUG 68 index of each point's mirror image (left <-> right), 0-based.
IBUG68_MIRROR = np.array(
    list(range(16, -1, -1))
    + list(range(26, 16, -1))
    + [27, 28, 29, 30, 35, 34, 33, 32, 31]
    + [45, 44, 43, 42, 47, 46, 39, 38, 37, 36, 41, 40]
    + [54, 53, 52, 51, 50, 49, 48, 59, 58, 57, 56, 55]
    + [64, 63, 62, 61, 60, 67, 66, 65],
    dtype=np.int64)

#: iBUG 68 groups (0-based, end exclusive).
IBUG68_GROUPS = {
    "jaw": (0, 17), "right_brow": (17, 22), "left_brow": (22, 27), "nose_bridge": (27, 31),
    "nose_base": (31, 36), "right_eye": (36, 42), "left_eye": (42, 48), "outer_lips": (48, 60),
    "inner_lips": (60, 68),
}

# Closed contours (rings) of the mesh, in drawing order.
FACE_OVAL = (10, 338, 297, 332, 284, 251, 389, 356, 454, 323, 361, 288, 397, 365, 379, 378, 400, 377,
             152, 148, 176, 149, 150, 136, 172, 58, 132, 93, 234, 127, 162, 21, 54, 103, 67, 109)
RIGHT_EYE = (33, 246, 161, 160, 159, 158, 157, 173, 133, 155, 154, 153, 145, 144, 163, 7)
LEFT_EYE = (263, 466, 388, 387, 386, 385, 384, 398, 362, 382, 381, 380, 374, 373, 390, 249)
RIGHT_BROW = (70, 63, 105, 66, 107, 55, 65, 52, 53, 46)   # upper edge out->in, lower edge in->out
LEFT_BROW = (300, 293, 334, 296, 336, 285, 295, 282, 283, 276)
LIPS_OUTER = (61, 185, 40, 39, 37, 0, 267, 269, 270, 409, 291, 375, 321, 405, 314, 17, 84, 181, 91, 146)
LIPS_INNER = (78, 191, 80, 81, 82, 13, 312, 311, 310, 415, 308, 324, 318, 402, 317, 14, 87, 178, 88, 95)
RIGHT_IRIS_CENTER = 468
LEFT_IRIS_CENTER = 473

#: Mirror pairs (right, left) spread over the face, used for the head's left-right axis.
SYMMETRIC_PAIRS = ((33, 263), (133, 362), (160, 387), (144, 373), (70, 300), (105, 334), (61, 291),
                   (40, 270), (98, 327), (127, 356), (234, 454), (132, 361), (58, 288), (172, 397),
                   (136, 365), (149, 378), (148, 377))

NOSE_TIP = 4
CHIN = 152
FOREHEAD = 10

#: Names of the five points, in order.
POINTS5_NAMES = ("right_eye_center", "left_eye_center", "nose_tip", "right_mouth_corner", "left_mouth_corner")


def landmarks68(landmarks478: np.ndarray) -> np.ndarray:
    """iBUG 68 points from mesh landmarks.

    Args:
        landmarks478: (478, D) or (468, D) mesh points (D = 2 or 3).
    Returns:
        (68, 2) float32 x, y.
    """
    points = np.asarray(landmarks478)
    return points[IBUG68_FROM_MP478, :2].astype(np.float32)


def points5_from_68(points68: np.ndarray) -> np.ndarray:
    """Five alignment points from iBUG 68 points.

    Eye centres are the means of the six eyelid points of each eye (not the irises, which
    move with gaze); nose tip is iBUG 31; mouth corners iBUG 49 and 55.

    Args:
        points68: (68, 2).
    Returns:
        (5, 2) float32 in :data:`POINTS5_NAMES` order (subject's right first, which is the
        image's left on a frontal face).
    """
    p = np.asarray(points68, dtype=np.float64)[:, :2]
    return np.stack([
        p[36:42].mean(axis=0), p[42:48].mean(axis=0), p[30], p[48], p[54],
    ]).astype(np.float32)


def points5(landmarks478: np.ndarray) -> np.ndarray:
    """(5, 2) float32 alignment points from (478, D) mesh points (see :func:`points5_from_68`)."""
    return points5_from_68(landmarks68(landmarks478))
