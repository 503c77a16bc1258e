"""Batch augmentation of aligned crops: shift, scale, rotation and horizontal flip.

Crops, skin attention and landmarks move together; a flip also swaps left and right landmark
indices (``IBUG68_MIRROR`` for the 68 points, a mirror map of the dense points computed from
the face model's embedding). Vectorised over the batch; randomness from a seeded generator so
a resumed run sees the same augmentation. For multi-view batches (groups of consecutive views
of one face) the flip is drawn per group: a mirrored view only matches other mirrored views.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment

from facerecon.detection.landmarks import IBUG68_MIRROR
from facerecon.fitting.optimize import FaceTargets


@dataclass
class AugmentSettings:
    enabled: bool = True
    shift: float = 0.05           # fraction of the crop side
    scale: float = 0.1            # +- relative
    rotation_degrees: float = 10.0
    flip: bool = True


def dense_mirror_map(dense_points: np.ndarray) -> np.ndarray:
    """(L,) index of each dense landmark's mirror partner, from the points (L, 3) on the mean face
    (canonical frame, mirror plane x = 0)."""
    mirrored = dense_points * np.array([-1.0, 1.0, 1.0])
    # a one-to-one assignment (not per-point nearest) so a slightly asymmetric embedding
    # cannot map two points onto one partner
    cost = np.linalg.norm(mirrored[:, None] - dense_points[None], axis=-1)
    rows, cols = linear_sum_assignment(cost)
    mapping = np.empty(len(dense_points), np.int64)
    mapping[rows] = cols
    return mapping


def augment(targets: FaceTargets, settings: AugmentSettings, generator: torch.Generator,
            dense_mirror: torch.Tensor | None, group_size: int = 1) -> FaceTargets:
    """A randomly transformed copy of ``targets`` (crops (B, S, S, 3), landmarks in pixels).

    ``group_size`` > 1: the batch is made of groups of that many consecutive views of one face,
    which share the flip (shift, scale and rotation stay per view).
    """
    if not settings.enabled:
        return targets
    b, s = targets.crops.shape[0], targets.size
    device = targets.crops.device

    def uniform(limit):
        return (torch.rand(b, generator=generator) * 2 - 1) * limit

    scale = 1.0 + uniform(settings.scale)
    angle = uniform(math.radians(settings.rotation_degrees))
    shift = torch.stack([uniform(settings.shift), uniform(settings.shift)], 1) * (s - 1)
    if not settings.flip:
        flip = torch.zeros(b, dtype=torch.bool)
    elif group_size > 1:
        flip = (torch.rand(b // group_size, generator=generator) < 0.5).repeat_interleave(group_size)
    else:
        flip = torch.rand(b, generator=generator) < 0.5
    centre = (s - 1) / 2.0
    cos, sin = torch.cos(angle) * scale, torch.sin(angle) * scale
    # forward map input pixel -> output pixel: p' = R (p - c) + c + shift, then optional flip
    forward = torch.zeros(b, 3, 3)
    forward[:, 0, 0], forward[:, 0, 1], forward[:, 1, 0], forward[:, 1, 1] = cos, -sin, sin, cos
    forward[:, :2, 2] = centre - (forward[:, :2, :2] @ torch.full((2,), centre)) + shift
    forward[:, 2, 2] = 1.0
    mirror = torch.eye(3).repeat(b, 1, 1)
    mirror[flip, 0, 0] = -1.0
    mirror[flip, 0, 2] = s - 1.0
    forward = (mirror @ forward).to(device)
    inverse = torch.linalg.inv(forward)
    ys, xs = torch.meshgrid(torch.arange(s, device=device, dtype=torch.float32),
                            torch.arange(s, device=device, dtype=torch.float32), indexing="ij")
    grid = torch.stack([xs, ys, torch.ones_like(xs)], -1).reshape(1, -1, 3)
    source = (grid @ inverse.transpose(1, 2))[..., :2] / (s - 1) * 2 - 1
    source = source.reshape(b, s, s, 2)
    stacked = torch.cat([targets.crops, targets.attention[..., None]], -1).permute(0, 3, 1, 2)
    warped = F.grid_sample(stacked, source, align_corners=True, padding_mode="border").permute(0, 2, 3, 1)

    def move(points: torch.Tensor, mirror_index: torch.Tensor | None) -> torch.Tensor:
        homogeneous = torch.cat([points, torch.ones_like(points[..., :1])], -1)
        moved = (homogeneous @ forward.transpose(1, 2))[..., :2]
        if mirror_index is not None:  # a flipped face's left eye is the detector's right eye
            moved = torch.where(flip.to(device)[:, None, None], moved[:, mirror_index], moved)
        return moved

    lm68 = move(targets.landmarks68, torch.as_tensor(IBUG68_MIRROR, device=device))
    dense = None if targets.dense is None else move(targets.dense, dense_mirror)
    return FaceTargets(warped[..., :3].contiguous(), lm68, dense, warped[..., 3].contiguous())
