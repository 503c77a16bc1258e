"""Identity consistency and averaging over a photo set (paper 000 sec. 5 baselines)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


def neutral_shapes(identity: np.ndarray, mean_shape: np.ndarray, identity_basis: np.ndarray,
                   region: np.ndarray) -> np.ndarray:
    """Neutral shapes (F, R, 3) over ``region`` for identity coefficients (F, K)."""
    basis = identity_basis[:, region].reshape(identity_basis.shape[0], -1)
    return (mean_shape[region].reshape(1, -1) + identity @ basis).reshape(len(identity), -1, 3)


def shape_distances(shapes: np.ndarray) -> np.ndarray:
    """Pairwise RMS vertex distance (F, F) in mm between shapes (F, R, 3), centroids removed."""
    centred = shapes - shapes.mean(axis=1, keepdims=True)
    flat = centred.reshape(len(shapes), -1)
    sq = (flat**2).sum(1)
    d2 = np.maximum(sq[:, None] + sq[None] - 2 * flat @ flat.T, 0.0)
    return np.sqrt(d2 / shapes.shape[1])


def consistent_faces(distances: np.ndarray, photo_of_face: list[int], min_threshold: float = 2.5,
                     spread: float = 2.0) -> tuple[np.ndarray, int, float]:
    """Which faces show the album's person.

    The reference is the face with the smallest median distance to the others (the
    medoid). A face is kept when its distance to the reference is at most
    ``max(min_threshold, spread * median distance of all faces to the reference)`` (the
    default suits identity-shape distances in mm);
    of several faces in one photo only the closest can be kept.

    Returns:
        keep (F,) bool, the reference index and the threshold used.
    """
    n = len(distances)
    if n <= 2:
        return np.ones(n, bool), 0, float("inf")
    off_diagonal = np.where(np.eye(n, dtype=bool), np.nan, distances)
    reference = int(np.argmin(np.nanmedian(off_diagonal, axis=1)))
    to_ref = distances[reference]
    threshold = max(min_threshold, spread * float(np.median(np.delete(to_ref, reference))))
    keep = to_ref <= threshold
    keep[list(one_face_per_photo(keep, photo_of_face, to_ref))] = False
    return keep, reference, threshold


def one_face_per_photo(candidates: np.ndarray, photo_of_face: list, distance: np.ndarray) -> dict[int, int]:
    """The one-face-per-photo rule: of the ``candidates`` ((F,) bool) that share a photo
    (``photo_of_face`` (F,) ids), only the one with the smallest ``distance`` (F,) can be kept
    (the first of equals).

    Returns:
        {candidate that gives way: the closer face of its photo}.
    """
    by_photo: dict = {}
    for i in np.flatnonzero(candidates):
        by_photo.setdefault(photo_of_face[i], []).append(int(i))
    dropped = {}
    for faces in by_photo.values():
        best = min(faces, key=lambda i: distance[i])
        dropped.update({i: best for i in faces if i != best})
    return dropped


def robust_photo_weights(residuals: np.ndarray, factor: float = 1.5) -> np.ndarray:
    """Weights (F,) in (0, 1]: 1 up to ``factor`` x the median residual, then falling as 1/residual."""
    median = float(np.median(residuals))
    limit = factor * max(median, 1e-12)
    return np.where(residuals <= limit, 1.0, limit / np.maximum(residuals, 1e-12))


def view_weights(angles: np.ndarray, full_weight_degrees: float = 30.0, power: float = 2.0) -> np.ndarray:
    """Weights (F,) in [0, 1] of photos by how far from frontal their face is turned.

    ``angles`` (F, 3) are fitted Euler angles (pitch, yaw, roll) in radians. A face turned by
    ``t`` (cos t = cos pitch * cos yaw) up to ``full_weight_degrees`` weighs 1, beyond that
    ``(cos t / cos full_weight_degrees) ** power``: the landmark detector's error grows fast
    towards profile (docs/fitting.md), and it is partly systematic, so more such photos do
    not average it out.
    """
    from facerecon.facemodel.detector_bias import canonical_pitch_yaw
    import torch

    pitch_yaw = canonical_pitch_yaw(torch.as_tensor(np.asarray(angles, np.float64))).numpy()
    cosine = np.cos(pitch_yaw[:, 0]) * np.cos(pitch_yaw[:, 1])
    weights = np.clip(cosine / np.cos(np.radians(full_weight_degrees)), 0.0, 1.0) ** power
    return np.where(np.isfinite(weights), weights, 0.0)


def embedding_distances(embeddings: np.ndarray) -> np.ndarray:
    """Pairwise cosine distances (F, F) in [0, 2] between face-recognition embeddings (F, D)."""
    unit = embeddings / np.maximum(np.linalg.norm(embeddings, axis=1, keepdims=True), 1e-12)
    return np.clip(1.0 - unit @ unit.T, 0.0, 2.0)


def albedo_distances(albedo: np.ndarray, visible: np.ndarray | None = None, min_points: int = 100) -> np.ndarray:
    """Pairwise distances (F, F) between per-photo skin albedos (F, S, 3), colour-balanced.

    The overall colour and brightness of a fitted albedo trade against the light's (a warm
    lamp, a dark exposure); the pattern (brows, lips, cheeks against forehead) belongs to the
    person. So each albedo is scaled by its median per channel, and each pair is balanced by
    the median per-channel ratio of its points before comparing. The distance is the median
    over the S points of the mean absolute channel difference, symmetrised, so an occluder or
    a highlight over part of one photo decides neither the balance nor the distance.

    ``visible`` (F, S) bool limits each pair to the points both photos saw (a photo's albedo
    where it saw no skin is only its prior); pairs sharing fewer than ``min_points`` use all.
    """
    scaled = albedo / np.maximum(np.median(albedo, axis=1, keepdims=True), 1e-6)
    n = len(scaled)
    both = np.ones((n, n, scaled.shape[1]), bool) if visible is None else visible[:, None] & visible[None]
    both |= (both.sum(axis=2) < min_points)[..., None]
    out = np.zeros((n, n))
    for i in range(n):  # F rows of (F, S, 3) work each, not one (F, F, S, 3) array
        mask = both[i][..., None]  # (F, S, 1)
        quotient = np.where(mask, scaled[i][None] / np.maximum(scaled, 1e-6), np.nan)
        ratio = np.nanmedian(quotient, axis=1, keepdims=True)  # (F, 1, 3)
        difference = np.abs(scaled[i][None] / np.maximum(ratio, 1e-6) - scaled).mean(axis=-1)
        out[i] = np.nanmedian(np.where(both[i], difference, np.nan), axis=1)
    return 0.5 * (out + out.T)


@dataclass
class RecognitionCheck:
    """Outcome of :func:`recognition_check` over F faces.

    Attributes:
        keep: (F,) bool, the faces that show the album's person.
        distance: (F,) Euclidean distance of each face's embedding to the album's consensus
            (the mean embedding of the faces within the threshold of the most typical face,
            the face itself left out of the mean).
        reasons: {face index: why it was excluded, with the rule's numbers}.
        threshold: the distance threshold used.
    """

    keep: np.ndarray
    distance: np.ndarray
    reasons: dict[int, str]
    threshold: float


def recognition_check(embeddings: np.ndarray, photo_of_face: list, threshold: float) -> RecognitionCheck:
    """Which faces (embeddings (F, D)) show the album's person, with face recognition.

    The most typical face (smallest median distance to the others) starts the consensus;
    every face within ``threshold`` of it joins, and the consensus is their mean. A face is
    kept when its distance to the consensus (without itself) is at most ``threshold``; of
    several kept faces of one photo (``photo_of_face`` (F,) ids) only the closest stays. With
    fewer than three faces there is no majority to call anyone a stranger: all are kept,
    still one per photo.
    """
    from facerecon.aggregation.recognition import euclidean_distances

    embeddings = np.asarray(embeddings, np.float64)
    n = len(embeddings)
    if n == 0:
        return RecognitionCheck(np.zeros(0, bool), np.zeros(0), {}, threshold)
    pairwise = euclidean_distances(embeddings)
    if n < 3:
        members = np.ones(n, bool)
    else:
        off_diagonal = np.where(np.eye(n, dtype=bool), np.nan, pairwise)
        medoid = int(np.argmin(np.nanmedian(off_diagonal, axis=1)))
        members = pairwise[medoid] <= threshold
    total, count = embeddings[members].sum(0), int(members.sum())
    distance = np.empty(n)
    for i in range(n):  # F small vectors: leave-one-out means
        own = members[i] and count > 1
        centre = (total - embeddings[i]) / (count - 1) if own else total / count
        distance[i] = np.linalg.norm(embeddings[i] - centre)
    keep = distance <= threshold if n >= 3 else np.ones(n, bool)
    reasons = {i: f"face-recognition distance {distance[i]:.2f} to the album's consensus > threshold {threshold:.2f}"
               for i in np.flatnonzero(~keep)}
    for i, best in one_face_per_photo(keep, photo_of_face, distance).items():
        keep[i] = False
        reasons[i] = (f"another face of this photo is closer to the album's consensus (face-recognition "
                      f"distance {distance[best]:.2f} vs {distance[i]:.2f}); one face per photo")
    return RecognitionCheck(keep, distance, reasons, threshold)
