"""Loss terms of the hybrid-level weak supervision (paper 000 sec. 4) and their weights."""

from facerecon.losses.hybrid import (
    PAPER000_WEIGHTS,
    coefficient_regularizer,
    landmark_loss,
    landmark_weights_68,
    photometric_loss,
    texture_flatness,
)

__all__ = [
    "PAPER000_WEIGHTS",
    "coefficient_regularizer",
    "landmark_loss",
    "landmark_weights_68",
    "photometric_loss",
    "texture_flatness",
]
