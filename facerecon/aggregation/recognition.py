"""Face-recognition embeddings of faces in whole photos, and the same-person test on them.

:func:`photo_embeddings` cuts each face's chip from the full photo by its 68 landmarks (dlib's
alignment for dlib's network, with its pyramid for large faces) and embeds the chips in
batches. Distances are Euclidean between descriptors, as dlib compares its own;
:data:`SAME_PERSON_DISTANCE` is dlib's 0.6, checked on the real albums (docs/recognition.md).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from facerecon.networks.chips import binomial_halve, halved_matrix, pyramid_levels, sampling_grid

#: dlib's same-person threshold: Euclidean distance between two descriptors of one person; the
#: recognition check of ``facerecon aggregate`` excludes a face farther than this from its album's
#: consensus (on the 7 real albums (30 photos) each photo lay at most 0.49 from its album's
#: consensus and at least 0.67 from another album's, docs/recognition.md)
SAME_PERSON_DISTANCE = 0.6


def photo_chips(image: np.ndarray, landmarks68: np.ndarray, network) -> torch.Tensor:
    """(F, 3, S, S) chips in [0, 1] of the faces with ``landmarks68`` (F, 68, 2) in ``image``
    (H, W, 3) uint8, cut as ``network`` (see :mod:`facerecon.networks.recognition`) expects.

    The photo is held once per pyramid level and all faces of a level are sampled in one
    :func:`~torch.nn.functional.grid_sample` call (their grids stacked), so F faces cost one
    photo in memory, not F.
    """
    param = next(network.parameters())
    device = param.device
    photo = torch.tensor(np.asarray(image), device=device).permute(2, 0, 1)[None].float() / 255.0
    points = torch.as_tensor(np.asarray(landmarks68, np.float64), device=device)
    matrix = network.chip_matrix(points).double()
    size = network.chip_size
    levels = pyramid_levels(matrix) if network.chip_antialias else torch.zeros(len(matrix), dtype=torch.long)
    levels = levels.cpu()
    chips = torch.empty(len(matrix), 3, size, size, device=device)
    top = int(levels.max()) if len(levels) else 0
    for level in range(top + 1):
        final = level == top or min(photo.shape[2:]) < 7  # too small to halve again: the rest here
        index = torch.nonzero(levels >= level if final else levels == level)[:, 0].to(device)
        if len(index):
            chips[index] = _sample(photo, matrix[index], size, network.chip_padding_mode)
        if final:
            break
        photo, matrix = binomial_halve(photo), halved_matrix(matrix)
    return chips


def _sample(photo: torch.Tensor, matrix: torch.Tensor, size: int, padding_mode: str) -> torch.Tensor:
    """(F, 3, size, size) from one photo (1, 3, H, W) and F maps (F, 2, 3), in one grid_sample."""
    grid = sampling_grid(matrix, size, photo.shape[2], photo.shape[3], photo.dtype)  # (F, S, S, 2)
    stacked = F.grid_sample(photo, grid.reshape(1, -1, size, 2), align_corners=True, padding_mode=padding_mode)
    return stacked.reshape(3, len(matrix), size, size).transpose(0, 1)


def photo_embeddings(image: np.ndarray, landmarks68: np.ndarray, network, batch_size: int = 64) -> np.ndarray:
    """(F, D) float32 embeddings of the F faces with ``landmarks68`` (F, 68, 2) (photo pixels,
    iBUG order) in ``image`` (H, W, 3) uint8; ``network`` from
    :func:`facerecon.networks.recognition.load_recognition_network`."""
    landmarks68 = np.asarray(landmarks68, np.float64).reshape(-1, 68, 2)
    if not len(landmarks68):
        return np.zeros((0, 0), np.float32)
    out = []
    with torch.inference_mode():
        for start in range(0, len(landmarks68), batch_size):
            chips = photo_chips(image, landmarks68[start:start + batch_size], network)
            out.append(network(chips.to(next(network.parameters()).dtype)).float().cpu().numpy())
    return np.concatenate(out)


def euclidean_distances(embeddings: np.ndarray) -> np.ndarray:
    """Pairwise Euclidean distances (F, F) between embeddings (F, D)."""
    sq = (embeddings.astype(np.float64) ** 2).sum(1)
    return np.sqrt(np.maximum(sq[:, None] + sq[None] - 2 * embeddings @ embeddings.T.astype(np.float64), 0.0))
