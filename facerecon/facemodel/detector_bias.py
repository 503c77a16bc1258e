"""The landmark detector's pose-dependent bias, as a table stored with a face model.

A landmark detector trained on real photos does not place its points where this face model
puts them, and the disagreement depends on the head pose: mediapipe pulls turned faces
towards frontal (its jaw and nose points lag behind the rotation), so a fit to raw
detections underestimates yaw and pitch and bends the identity to compensate. The table
holds, for sample head poses, the detector's mean offset (detected minus true position of
every landmark, on the aligned crop) measured on renders of this model
(:func:`facerecon.stages.calibrate.calibrate_detector_bias`); the fitter subtracts the
offset interpolated at its current pose estimate (:func:`interpolate_offsets`).

Offsets are stored as fractions of the crop size, so they apply to any crop size.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


@dataclass
class DetectorBias:
    """Mean landmark offsets of one detector on one face model, by head pose.

    Attributes (S samples):
        angles: (S, 2) float32 (pitch, yaw) in radians in the aligned crop's camera frame.
        offsets68: (S, 68, 2) float32, detected minus true 68-point positions / crop size.
        offsets_dense: (S, 468, 2) float32 the same for the dense landmarks, or None.
        bandwidth_degrees: standard deviation of the Gaussian kernel over (pitch, yaw).
        detector: which detector (and version) the table was measured with.
        description: how it was measured (grid, faces per cell, seed).
    """

    angles: np.ndarray
    offsets68: np.ndarray
    offsets_dense: np.ndarray | None
    bandwidth_degrees: float = 10.0
    detector: str = ""
    description: str = ""

    @property
    def n_samples(self) -> int:
        return int(self.angles.shape[0])

    def problems(self) -> list[str]:
        """Shape and value inconsistencies (empty when the table is usable)."""
        out = []
        s = self.angles.shape[0] if self.angles.ndim == 2 else -1
        if self.angles.ndim != 2 or self.angles.shape[1] != 2 or s < 1:
            out.append(f"detector_bias angles must be (S, 2) with S >= 1, got {self.angles.shape}")
        if self.offsets68.shape != (s, 68, 2):
            out.append(f"detector_bias offsets68 must be ({s}, 68, 2), got {self.offsets68.shape}")
        if self.offsets_dense is not None and (self.offsets_dense.ndim != 3 or self.offsets_dense.shape[0] != s
                                               or self.offsets_dense.shape[2] != 2):
            out.append(f"detector_bias offsets_dense must be ({s}, L, 2), got {self.offsets_dense.shape}")
        if not self.bandwidth_degrees > 0:
            out.append("detector_bias bandwidth_degrees must be positive")
        for name in ("angles", "offsets68", "offsets_dense"):
            arr = getattr(self, name)
            if arr is not None and not np.all(np.isfinite(arr)):
                out.append(f"detector_bias {name} contains NaN or infinite values")
        return out


def canonical_pitch_yaw(angles: torch.Tensor) -> torch.Tensor:
    """(B, >=2) Euler angles (pitch, yaw, ...) -> (B, 2) (pitch, yaw) with |pitch| <= 90 degrees.

    (pitch, yaw, roll) and (pitch +- 180, 180 - yaw, roll +- 180) are the same rotation; a fit
    near profile can land on either, and the table is indexed by the first.
    """
    pitch, yaw = angles[:, 0], angles[:, 1]
    flipped = pitch.abs() > torch.pi / 2
    pitch = torch.where(flipped, pitch - torch.sign(pitch) * torch.pi, pitch)
    yaw = torch.where(flipped, torch.pi - yaw, yaw)
    yaw = torch.remainder(yaw + torch.pi, 2 * torch.pi) - torch.pi
    return torch.stack([pitch, yaw], dim=1)


def interpolate_offsets(query: torch.Tensor, angles: torch.Tensor, offsets: torch.Tensor,
                        bandwidth: float) -> torch.Tensor:
    """Nadaraya-Watson estimate of the offsets at each query pose.

    Args:
        query: (B, 2) (pitch, yaw) radians; rows with non-finite values get zero offsets.
        angles: (S, 2) the table's poses.
        offsets: (S, L, 2) the table's offsets.
        bandwidth: kernel standard deviation in radians.

    Returns:
        (B, L, 2): the Gaussian-kernel weighted mean of the table's offsets. Weights are
        normalised in log space, so a pose far from every sample takes its nearest samples'
        offsets instead of dividing zero by zero.
    """
    finite = torch.isfinite(query).all(dim=1)
    safe = torch.where(finite[:, None], query, torch.zeros_like(query))
    distance2 = (((safe[:, None, :] - angles[None]) / bandwidth) ** 2).sum(dim=-1)  # (B, S)
    weights = torch.softmax(-0.5 * distance2, dim=1)
    result = torch.einsum("bs,slc->blc", weights, offsets)
    return torch.where(finite[:, None, None], result, torch.zeros_like(result))
