"""Image-level losses and regularisers of paper 000 (Deng et al. 2019), sec. 4.

Every function returns one value per batch item, shape (B,), so callers can weight,
mask or sum them; none reduces over the batch.
"""

from __future__ import annotations

import torch

#: Loss weights of paper 000 sec. 4.3 (w_photo, w_lan, w_per, w_coef, w_tex) and eq. 5
#: (omega_alpha, omega_beta, omega_gamma for identity, expression, albedo coefficients).
PAPER000_WEIGHTS = {
    "photo": 1.9,
    "landmark": 1.6e-3,
    "perceptual": 0.2,
    "coefficients": 3e-4,
    "texture": 5.0,
    "reg_identity": 1.0,
    "reg_expression": 0.8,
    "reg_albedo": 1.7e-3,
}

#: iBUG indices of the nose (27-35) and inner mouth (60-67) points, weighted 20 (paper 000 eq. 3).
HEAVY_LANDMARKS_68 = list(range(27, 36)) + list(range(60, 68))


def landmark_weights_68(heavy: float = 20.0, dtype=torch.float32, device=None,
                        indices: list[int] = HEAVY_LANDMARKS_68) -> torch.Tensor:
    """Per-landmark weights (68,) of paper 000 eq. 3: ``heavy`` on ``indices`` (by default the nose
    and inner mouth), else 1."""
    weights = torch.ones(68, dtype=dtype, device=device)
    weights[indices] = heavy
    return weights


def photometric_loss(
    rendered: torch.Tensor, target: torch.Tensor, face_mask: torch.Tensor, attention: torch.Tensor | None = None
) -> torch.Tensor:
    """Skin-attention photometric loss, paper 000 eq. 2.

    sum_i A_i ||I_i - I'_i||_2 / sum_i A_i over the reprojected face region M.

    Args:
        rendered: (B, H, W, 3) rendered image I'.
        target: (B, H, W, 3) photo I (same value range as ``rendered``).
        face_mask: (B, H, W) bool or float, the rendered face region M (z-buffer visible).
        attention: (B, H, W) skin attention A in [0, 1]; None means A = 1.

    Returns:
        (B,) loss; 0 for an item whose face region is empty.
    """
    weight = face_mask.to(rendered.dtype)
    if attention is not None:
        weight = weight * attention.to(rendered.dtype)
    # epsilon inside the sqrt keeps the gradient finite where the residual is exactly 0
    residual = torch.sqrt(((target - rendered) ** 2).sum(dim=-1) + 1e-8)
    numerator = (weight * residual).flatten(1).sum(dim=1)
    denominator = weight.flatten(1).sum(dim=1)
    return numerator / denominator.clamp_min(1e-6)


def landmark_loss(
    predicted: torch.Tensor, target: torch.Tensor, weights: torch.Tensor | None = None,
    valid: torch.Tensor | None = None,
) -> torch.Tensor:
    """Weighted squared landmark distance, paper 000 eq. 3: (1/N) sum_n w_n ||q_n - q'_n||^2.

    Args:
        predicted: (B, L, 2) projected model landmarks (pixels).
        target: (B, L, 2) detected landmarks (pixels).
        weights: (L,) per-landmark weights, or (B, L) per face (e.g. times contour
            visibility); None means 1. The loss is the mean over all L landmarks.
        valid: (B, L) bool, landmarks to use (e.g. detected), or float weights in [0, 1] (e.g.
            visibility); the loss is then the weighted mean sum(valid * d^2) / sum(valid)
            (sum clamped to >= 1). None means all.

    Returns:
        (B,) loss in squared pixels.
    """
    sq = ((predicted - target) ** 2).sum(dim=-1)
    if weights is not None:
        sq = sq * weights
    if valid is None:
        return sq.mean(dim=1)
    valid = valid.to(sq.dtype)
    return (sq * valid).sum(dim=1) / valid.sum(dim=1).clamp_min(1.0)


def coefficient_regularizer(
    identity: torch.Tensor, expression: torch.Tensor, albedo: torch.Tensor | None,
    weights: dict[str, float] = PAPER000_WEIGHTS,
) -> torch.Tensor:
    """Paper 000 eq. 5: w_a ||alpha||^2 + w_b ||beta||^2 + w_g ||delta||^2.

    Args:
        identity: (B, K_id); expression: (B, K_exp); albedo: (B, K_alb) or None.

    Returns:
        (B,) regulariser value.
    """
    value = weights["reg_identity"] * (identity**2).sum(dim=1) + weights["reg_expression"] * (expression**2).sum(dim=1)
    if albedo is not None and albedo.shape[1]:
        value = value + weights["reg_albedo"] * (albedo**2).sum(dim=1)
    return value


def texture_flatness(albedo: torch.Tensor, skin_vertices: torch.Tensor) -> torch.Tensor:
    """Paper 000 eq. 6: sum over RGB of the variance of the albedo over the skin region.

    Args:
        albedo: (B, N, 3) per-vertex reflectance.
        skin_vertices: (R,) int64 vertex indices of the skin region.

    Returns:
        (B,) loss.
    """
    skin = albedo[:, skin_vertices]
    return skin.var(dim=1, unbiased=False).sum(dim=-1)


def landmark_trust(photometric: torch.Tensor, reference: float, power: float = 2.0,
                   minimum: float = 0.01) -> torch.Tensor:
    """How far to trust detected landmarks once the photometric term is on, per face.

    A landmark detector is off by a few per cent of the eye distance whatever the photo, while
    the photometric error says how well the rendered face explains this photo: on a photo that
    the model reproduces much better than a typical in-the-wild photo (``reference``, in the
    units of :func:`photometric_loss`), the image is the better witness and the landmark term
    is scaled down; at or above the reference it keeps its full weight. Detached: a weight, not
    something to optimise.

    Args:
        photometric: (B,) photometric error (eq. 2).
        reference, power, minimum: scale = clamp((photometric / reference) ** power, minimum, 1).

    Returns:
        (B,) scale in [minimum, 1].
    """
    ratio = photometric.detach().clamp_min(0.0) / reference
    return (ratio ** power).clamp(minimum, 1.0)
