"""The fitting camera: a fixed pinhole on the aligned crop, and the head pose.

Model vertices (canonical frame: +y up, +z out of the face, mm) go to the OpenCV camera
frame (y down, z forward) as ``v_cam = FLIP @ R(angles) @ v + t`` where ``R`` is the
head rotation (pitch, yaw, roll) and ``FLIP = diag(1, -1, -1)`` turns the face towards the
camera. ``t`` is in millimetres. The focal length follows paper 000's choice of a fixed,
empirically selected focal (1015 px for a 224 px crop, i.e. a ~12.6 degree field of view).
"""

from __future__ import annotations

import cv2
import numpy as np
import torch

from facerecon.render.camera import euler_to_matrix, matrix_to_euler

FOCAL_AT_224 = 1015.0
FLIP = torch.tensor([[1.0, 0.0, 0.0], [0.0, -1.0, 0.0], [0.0, 0.0, -1.0]])


def crop_intrinsics(crop_size: int, batch: int = 1, dtype=torch.float32, device=None) -> torch.Tensor:
    """Intrinsics (B, 3, 3) of the fitting camera for a square crop of ``crop_size`` px."""
    focal = FOCAL_AT_224 * crop_size / 224.0
    centre = (crop_size - 1) / 2.0  # pixel centres at integer coordinates
    k = torch.tensor([[focal, 0.0, centre], [0.0, focal, centre], [0.0, 0.0, 1.0]], dtype=dtype, device=device)
    return k.expand(batch, 3, 3).clone()


def camera_rotation(angles: torch.Tensor) -> torch.Tensor:
    """(B, 3, 3) rotation from the canonical model frame to the camera frame."""
    return FLIP.to(angles) @ euler_to_matrix(angles)


def model_to_camera(vertices: torch.Tensor, angles: torch.Tensor, translation: torch.Tensor) -> torch.Tensor:
    """Pose canonical vertices (B, N, 3) into the camera frame, with angles (B, 3), translation (B, 3)."""
    return vertices @ camera_rotation(angles).transpose(1, 2) + translation[:, None, :]


def pose_from_landmarks(model_points: np.ndarray, image_points: np.ndarray, intrinsics: np.ndarray
                        ) -> tuple[np.ndarray, np.ndarray]:
    """Initial head pose per face from 2D-3D landmark correspondences (PnP).

    Args:
        model_points: (L, 3) canonical landmark positions (mm).
        image_points: (B, L, 2) detected landmarks (crop pixels).
        intrinsics: (3, 3).

    Returns:
        angles (B, 3) radians and translation (B, 3) mm. Falls back to a frontal pose at a
        distance matching the landmark spread when PnP fails or lands behind the camera.
    """
    angles, translations = [], []
    flip = FLIP.numpy().astype(np.float64)
    spread_model = np.linalg.norm(model_points[:, :2] - model_points[:, :2].mean(0), axis=1).mean()
    for points in image_points.astype(np.float64):  # a handful of faces: per-face PnP is cheap
        spread_image = np.linalg.norm(points - points.mean(0), axis=1).mean()
        depth = intrinsics[0, 0] * spread_model / max(spread_image, 1e-6)
        centre = points.mean(0)
        fallback_t = np.array([(centre[0] - intrinsics[0, 2]) * depth / intrinsics[0, 0],
                               (centre[1] - intrinsics[1, 2]) * depth / intrinsics[1, 1], depth])
        fallback_t -= flip @ model_points.mean(0)
        rotation, translation = flip, fallback_t
        ok, rvec, tvec = cv2.solvePnP(model_points.astype(np.float64), points, intrinsics.astype(np.float64), None,
                                      flags=cv2.SOLVEPNP_EPNP)
        if ok:
            ok, rvec, tvec = cv2.solvePnP(model_points.astype(np.float64), points, intrinsics.astype(np.float64),
                                          None, rvec, tvec, useExtrinsicGuess=True, flags=cv2.SOLVEPNP_ITERATIVE)
        if ok and np.all(np.isfinite(tvec)) and tvec[2, 0] > 0.3 * depth:
            rotation, translation = cv2.Rodrigues(rvec)[0], tvec[:, 0]
        head = flip @ rotation  # FLIP is its own inverse
        angles.append(matrix_to_euler(torch.as_tensor(head[None], dtype=torch.float64))[0].numpy())
        translations.append(translation)
    return np.asarray(angles, dtype=np.float32), np.asarray(translations, dtype=np.float32)
