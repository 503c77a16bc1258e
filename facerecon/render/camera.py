"""Camera helpers: Euler angles, rigid transforms, pinhole projection, intrinsics.

Conventions (shared by the whole package):

* The camera frame is OpenCV's: x right, y down, z forward; visible points have z > 0.
* Intrinsics ``K`` are (B, 3, 3); a point (x, y, z) projects to
  ``u = fx * x / z + s * y / z + cx`` and ``v = fy * y / z + cy`` (``s`` is the skew
  ``K[0, 1]``, normally 0).
* Pixel centres sit at integer coordinates: pixel (row i, col j) has centre
  ``u = j, v = i``; an image of size (H, W) spans ``u in [-0.5, W - 0.5]``.
* Euler angles are (pitch about x, yaw about y, roll about z) in radians and
  ``R = Rz(roll) @ Ry(yaw) @ Rx(pitch)``.

All functions are pure, batched and differentiable; they run on any device/dtype.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch

__all__ = [
    "euler_to_matrix",
    "matrix_to_euler",
    "transform_points",
    "project_points",
    "intrinsics_from_fov",
    "scale_pixels",
    "scale_intrinsics",
]


def euler_to_matrix(angles: torch.Tensor) -> torch.Tensor:
    """Rotation matrices from Euler angles.

    Args:
        angles: (B, 3) radians, columns (pitch about x, yaw about y, roll about z).

    Returns:
        (B, 3, 3) rotation ``R = Rz(roll) @ Ry(yaw) @ Rx(pitch)``.
    """
    if angles.shape[-1] != 3:
        raise ValueError(f"angles must have shape (B, 3), got {tuple(angles.shape)}")
    pitch, yaw, roll = angles.unbind(-1)
    cx, sx = torch.cos(pitch), torch.sin(pitch)
    cy, sy = torch.cos(yaw), torch.sin(yaw)
    cz, sz = torch.cos(roll), torch.sin(roll)
    # Closed form of Rz @ Ry @ Rx.
    r00 = cy * cz
    r01 = sx * sy * cz - cx * sz
    r02 = cx * sy * cz + sx * sz
    r10 = cy * sz
    r11 = sx * sy * sz + cx * cz
    r12 = cx * sy * sz - sx * cz
    r20 = -sy
    r21 = sx * cy
    r22 = cx * cy
    rows = [
        torch.stack([r00, r01, r02], dim=-1),
        torch.stack([r10, r11, r12], dim=-1),
        torch.stack([r20, r21, r22], dim=-1),
    ]
    return torch.stack(rows, dim=-2)


def matrix_to_euler(rotation: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`euler_to_matrix`.

    Args:
        rotation: (B, 3, 3) rotation matrices.

    Returns:
        (B, 3) angles (pitch, yaw, roll) in radians with yaw in [-pi/2, pi/2] and
        pitch, roll in (-pi, pi]. At gimbal lock (|yaw| = pi/2) roll is set to 0.
    """
    if rotation.shape[-2:] != (3, 3):
        raise ValueError(f"rotation must have shape (B, 3, 3), got {tuple(rotation.shape)}")
    r = rotation
    cos_yaw = torch.sqrt(r[..., 0, 0] ** 2 + r[..., 1, 0] ** 2)
    yaw = torch.atan2(-r[..., 2, 0], cos_yaw)
    eps = 1e-6 if r.dtype == torch.float64 else 1e-5
    regular = cos_yaw > eps
    pitch_reg = torch.atan2(r[..., 2, 1], r[..., 2, 2])
    roll_reg = torch.atan2(r[..., 1, 0], r[..., 0, 0])
    # Gimbal lock: only pitch -/+ roll is determined; choose roll = 0.
    pitch_lock = torch.atan2(-r[..., 1, 2], r[..., 1, 1])
    pitch = torch.where(regular, pitch_reg, pitch_lock)
    roll = torch.where(regular, roll_reg, torch.zeros_like(roll_reg))
    return torch.stack([pitch, yaw, roll], dim=-1)


def transform_points(
    points: torch.Tensor, rotation: torch.Tensor, translation: torch.Tensor
) -> torch.Tensor:
    """Rigid transform ``p' = R p + t``.

    Args:
        points: (B, N, 3).
        rotation: (B, 3, 3).
        translation: (B, 3).

    Returns:
        (B, N, 3) transformed points.
    """
    return torch.matmul(points, rotation.transpose(-1, -2)) + translation.unsqueeze(-2)


def project_points(points_cam: torch.Tensor, intrinsics: torch.Tensor) -> torch.Tensor:
    """Pinhole projection of camera-frame points to pixel coordinates.

    Args:
        points_cam: (B, N, 3) OpenCV camera-frame points (z > 0 in front of the camera).
        intrinsics: (B, 3, 3) matrices ``[[fx, s, cx], [0, fy, cy], [0, 0, 1]]``.

    Returns:
        (B, N, 3) ``(u, v, z)``: pixel coordinates (pixel centres at integers) and the
        camera depth z (unchanged). Points with z == 0 exactly are divided by a tiny
        number instead of producing inf; points with z <= 0 are meaningless and the
        rasterizer drops triangles that touch them.
    """
    z = points_cam[..., 2:3]
    tiny = torch.finfo(points_cam.dtype).tiny
    z_safe = torch.where(z == 0, torch.full_like(z, tiny), z)
    xy = points_cam[..., :2] / z_safe  # (B, N, 2) normalised image coordinates
    k = intrinsics
    u = k[:, 0, 0, None] * xy[..., 0] + k[:, 0, 1, None] * xy[..., 1] + k[:, 0, 2, None]
    v = k[:, 1, 1, None] * xy[..., 1] + k[:, 1, 2, None]
    return torch.stack([u, v, points_cam[..., 2]], dim=-1)


def scale_pixels(points: torch.Tensor, scale: float) -> torch.Tensor:
    """Pixel coordinates in an image resized by ``scale`` (the one place of the rescaling rule).

    With pixel centres at integers an image spans ``[-0.5, W - 0.5]``, so resizing by ``s``
    maps ``u -> (u + 0.5) * s - 0.5`` (not ``u * s``): the image's edges, not pixel 0's
    centre, stay put.

    Args:
        points: (..., 2) or any shape of pixel coordinates (u, v).
        scale: new size / old size.

    Returns:
        Same shape as ``points``.
    """
    return (points + 0.5) * scale - 0.5


def scale_intrinsics(intrinsics: torch.Tensor, scale: float) -> torch.Tensor:
    """Intrinsics of the same camera rendering an image resized by ``scale``.

    Focal lengths and skew scale by ``scale``; the principal point follows
    :func:`scale_pixels`, so projecting with the result equals ``scale_pixels`` of projecting
    with ``intrinsics``.

    Args:
        intrinsics: (..., 3, 3), e.g. (B, 3, 3).
        scale: new size / old size.

    Returns:
        (..., 3, 3), a new tensor.
    """
    k = intrinsics.clone()
    k[..., :2, :2] = k[..., :2, :2] * scale
    k[..., :2, 2] = scale_pixels(k[..., :2, 2], scale)
    return k


def intrinsics_from_fov(
    fov_degrees: float | torch.Tensor,
    image_size: Sequence[int],
    batch: int = 1,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Pinhole intrinsics with square pixels and the principal point at the image centre.

    Args:
        fov_degrees: full *horizontal* field of view in degrees (across the image width,
            edge to edge), a float or a (B,) tensor.
        image_size: (H, W) in pixels.
        batch: B, used when ``fov_degrees`` is a float.
        device, dtype: of the result.

    Returns:
        (B, 3, 3) with ``fx = fy = (W / 2) / tan(fov / 2)``, ``cx = (W - 1) / 2``,
        ``cy = (H - 1) / 2`` (pixel centres at integer coordinates).
    """
    h, w = int(image_size[0]), int(image_size[1])
    if isinstance(fov_degrees, torch.Tensor):
        fov = fov_degrees.to(device=device, dtype=dtype).reshape(-1)
        if fov.numel() == 1 and batch > 1:
            fov = fov.expand(batch)
    else:
        fov = torch.full((batch,), float(fov_degrees), device=device, dtype=dtype)
    focal = (w / 2.0) / torch.tan(fov * (math.pi / 360.0))
    k = torch.zeros(fov.shape[0], 3, 3, device=fov.device, dtype=dtype)
    k[:, 0, 0] = focal
    k[:, 1, 1] = focal
    k[:, 0, 2] = (w - 1) / 2.0
    k[:, 1, 2] = (h - 1) / 2.0
    k[:, 2, 2] = 1.0
    return k
