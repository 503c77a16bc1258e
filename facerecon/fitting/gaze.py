"""Gaze from mediapipe's iris points, as observed values of the eye-look blendshapes.

The face models here have no eyeballs: their ``eyeLook*`` blendshapes move the eyelids the
way a gaze does, and a fit can only guess them from the lids, which a squint or a
detector bias moves as well. mediapipe's 478-point mesh locates the irises (points 468-477),
so the gaze is observed: the iris centre's offset from the middle of the eye corners,
in eye widths, along the corner axis (towards the outer corner: looking out) and across it
(towards the mouth: looking down).

The mapping to weights is linear with a dead zone, constants chosen from the geometry, not
fitted to data: a fully turned eye moves the iris centre about a fifth of the eye width
sideways (``HORIZONTAL_SPAN``) and about 0.15 of it up or down (``VERTICAL_SPAN``); a level
gaze puts the iris centre about 0.1 eye widths above the corner line (``VERTICAL_REST``, the
iris sits higher than the corners); offsets within ``DEAD_ZONE`` of rest are "looking ahead"
(weight 0). Used by the fit as a prior (:func:`facerecon.losses.expression.observed_weight_prior`),
never as a hard constraint.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

#: mediapipe 478-point indices: (outer corner, inner corner, iris centre) of the subject's
#: right eye (ARKit suffix ``_R``) and left eye (``_L``)
EYES = {"_R": (33, 133, 468), "_L": (263, 362, 473)}
HORIZONTAL_SPAN = 0.20
VERTICAL_SPAN = 0.15
VERTICAL_REST = -0.10
DEAD_ZONE = 0.05
#: blendshape names per eye and direction, in the column order of :func:`gaze_weights`
GAZE_NAMES = tuple(f"eyeLook{d}{side}" for side in EYES for d in ("Out", "In", "Up", "Down"))


def iris_offsets(points478: torch.Tensor) -> torch.Tensor:
    """Iris-centre offsets per eye, in eye widths.

    Args:
        points478: (B, 478, 2) mediapipe landmarks (pixels, y down).

    Returns:
        (B, 2, 2): for eyes (``_R``, ``_L``), (h, v): h > 0 towards the outer corner, v > 0
        towards the mouth (perpendicular to the line between the two eyes' centres).
    """
    centres = []
    out = []
    for outer, inner, _iris in EYES.values():
        centres.append(0.5 * (points478[:, outer] + points478[:, inner]))
    across = centres[1] - centres[0]  # subject's right eye -> left eye
    across = across / across.norm(dim=-1, keepdim=True).clamp_min(1e-6)
    down = torch.stack([-across[:, 1], across[:, 0]], dim=-1)
    for (outer, inner, iris), centre in zip(EYES.values(), centres):
        axis = points478[:, outer] - points478[:, inner]
        width = axis.norm(dim=-1).clamp_min(1e-6)
        offset = points478[:, iris] - centre
        out.append(torch.stack([(offset * axis).sum(-1) / width ** 2, (offset * down).sum(-1) / width], dim=-1))
    return torch.stack(out, dim=1)


def gaze_weights(points478: torch.Tensor) -> torch.Tensor:
    """Observed eye-look blendshape weights (B, 8) in [0, 1], columns :data:`GAZE_NAMES`."""
    offsets = iris_offsets(points478)
    h, v = offsets[..., 0], offsets[..., 1] - VERTICAL_REST

    def ramp(x: torch.Tensor, span: float) -> torch.Tensor:
        return ((x - DEAD_ZONE) / (span - DEAD_ZONE)).clamp(0.0, 1.0)

    per_eye = torch.stack([ramp(h, HORIZONTAL_SPAN), ramp(-h, HORIZONTAL_SPAN), ramp(-v, VERTICAL_SPAN),
                           ramp(v, VERTICAL_SPAN)], dim=-1)  # (B, 2, 4): out, in, up, down
    return per_eye.reshape(points478.shape[0], 8)


def gaze_columns(names: Sequence[str]) -> np.ndarray:
    """(8,) indices of :data:`GAZE_NAMES` in a model's expression names, or (0,) when the model
    lacks any of them (no gaze prior then)."""
    index = {str(n): i for i, n in enumerate(names)}
    if not all(n in index for n in GAZE_NAMES):
        return np.zeros(0, dtype=np.int64)
    return np.asarray([index[n] for n in GAZE_NAMES], dtype=np.int64)
