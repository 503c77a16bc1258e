"""Augmentation keeps crops and landmarks consistent (including flips)."""

from __future__ import annotations

import numpy as np
import torch

from facerecon.fitting.optimize import FaceTargets
from facerecon.training.augment import AugmentSettings, augment, dense_mirror_map


def _dot_image(points: torch.Tensor, size: int = 64) -> torch.Tensor:
    image = torch.zeros(size, size, 3)
    for x, y in points.round().long().tolist():
        image[max(y - 1, 0):y + 2, max(x - 1, 0):x + 2, 0] = 1.0
    return image


def test_landmarks_follow_the_pixels():
    torch.manual_seed(0)
    lm = torch.rand(1, 68, 2) * 40 + 12
    crop = _dot_image(lm[0, :1])  # a bright dot under landmark 0
    targets = FaceTargets(crop[None], lm, None, torch.ones(1, 64, 64))
    settings = AugmentSettings(shift=0.1, scale=0.1, rotation_degrees=15, flip=False)
    out = augment(targets, settings, torch.Generator().manual_seed(3), None)
    red = out.crops[0, ..., 0]
    y, x = np.unravel_index(int(red.argmax()), red.shape)
    assert abs(x - out.landmarks68[0, 0, 0].item()) <= 1.5 and abs(y - out.landmarks68[0, 0, 1].item()) <= 1.5


def test_flip_swaps_left_and_right_landmarks():
    lm = torch.zeros(1, 68, 2)
    lm[0, :, 1] = 30
    lm[0, 36, 0], lm[0, 45, 0] = 20.0, 44.0  # right eye outer corner on image left
    targets = FaceTargets(torch.rand(1, 64, 64, 3), lm, None, torch.ones(1, 64, 64))
    settings = AugmentSettings(shift=0, scale=0, rotation_degrees=0, flip=True)
    for seed in range(10):
        generator = torch.Generator().manual_seed(seed)
        out = augment(targets, settings, generator, None)
        if not torch.equal(out.crops, targets.crops):  # this draw flipped
            assert out.landmarks68[0, 36, 0].item() < out.landmarks68[0, 45, 0].item()
            assert abs(out.landmarks68[0, 36, 0].item() - (63 - 44.0)) < 1e-4
            torch.testing.assert_close(out.crops[0], targets.crops[0].flip(1), atol=1e-5, rtol=0)
            break
    else:
        raise AssertionError("no flip in 10 draws")


def test_dense_mirror_map_pairs_left_and_right(ict_embedded_model):
    from facerecon.facemodel.tensors import FaceModelTensors

    tensors = FaceModelTensors(ict_embedded_model)
    points = tensors.dense_points(tensors.mean_shape[None])[0].numpy()
    mirror = dense_mirror_map(points)
    assert mirror[33] == 263 and mirror[263] == 33 and mirror[1] == 1  # eye corners swap, nose tip stays
