"""Head-pose estimate from the 3D face-mesh landmarks.

The mediapipe wheel (0.10.21) does not ship ``canonical_face_model.obj``, so pose is not
solved against a canonical model. Instead the head's axes are read directly off the
mesh landmarks, which mediapipe returns in 3D (x, y in pixels, z relative depth on the
same scale, growing away from the camera), i.e. in a right-handed camera frame with
x right, y down, z forward:

* left-right axis ``e_x``: the mean of (left - right) over mirror pairs spread over the face
  (:data:`~facerecon.detection.landmarks.SYMMETRIC_PAIRS`);
* back axis ``e_z``: the normal of the plane fitted (least squares) to the face-oval
  vertices, oriented so the nose tip lies in front of the plane;
* ``e_x`` is made orthogonal to ``e_z``, and ``e_y = e_z x e_x`` (pointing towards the chin).

From the facing direction ``f = -e_z``:

* ``yaw = atan2(f_x, -f_z)``: positive when the face turns towards the image's right
  (the subject's left);
* ``pitch = atan2(-f_y, hypot(f_x, f_z))``: positive when the face turns up;
* ``roll = atan2(e_x,y, e_x,x)``: positive when the head tilts clockwise in the image.

All three are 0 when the face-oval plane is parallel to the image and the eyes are level.
This is a weak-perspective estimate (mediapipe's depth is relative); pitch carries a small
person-dependent offset because "face-oval plane" and "looking straight" differ slightly.
"""

from __future__ import annotations

import numpy as np

from facerecon.detection.landmarks import FACE_OVAL, NOSE_TIP, SYMMETRIC_PAIRS


def head_axes(landmarks: np.ndarray) -> np.ndarray:
    """Rotation whose columns are the head's axes (x to the subject's left, y to the chin,
    z to the back of the head) in camera coordinates.

    Args:
        landmarks: (478, 3) or (468, 3) points, x, y, z in a common (pixel) scale.
    Returns:
        (3, 3) float64 rotation matrix.
    """
    p = np.asarray(landmarks, dtype=np.float64)[:, :3]
    pairs = np.asarray(SYMMETRIC_PAIRS)
    ex = (p[pairs[:, 1]] - p[pairs[:, 0]]).mean(axis=0)
    oval = p[list(FACE_OVAL)]
    centre = oval.mean(axis=0)
    _, _, vt = np.linalg.svd(oval - centre, full_matrices=False)
    ez = vt[2]
    if np.dot(p[NOSE_TIP] - centre, ez) > 0:  # the nose is in front, i.e. against e_z
        ez = -ez
    ex = ex - np.dot(ex, ez) * ez
    norm = np.linalg.norm(ex)
    if norm < 1e-9:
        raise ValueError("degenerate landmarks: no left-right direction")
    ex /= norm
    ey = np.cross(ez, ex)
    return np.stack([ex, ey, ez], axis=1)


def pose_from_axes(axes: np.ndarray) -> np.ndarray:
    """(3,) float32 (pitch, yaw, roll) in degrees from :func:`head_axes` output."""
    ex, ez = axes[:, 0], axes[:, 2]
    f = -ez
    yaw = np.degrees(np.arctan2(f[0], -f[2]))
    pitch = np.degrees(np.arctan2(-f[1], np.hypot(f[0], f[2])))
    roll = np.degrees(np.arctan2(ex[1], ex[0]))
    return np.array([pitch, yaw, roll], dtype=np.float32)


def head_pose(landmarks: np.ndarray) -> np.ndarray:
    """(3,) float32 (pitch, yaw, roll) degrees from (478, 3) landmarks; see the module notes."""
    return pose_from_axes(head_axes(landmarks))
