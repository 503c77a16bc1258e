"""Losses and weights of paper 002 (Deng et al. 2022, diffuse + specular albedo), sec. 4.1.

Every function returns one value per batch item, shape (B,) (or a per-pixel weight map), so
callers can weight, mask or sum them. The photometric loss of eq. 8 is assembled from
:func:`facerecon.losses.hybrid.photometric_loss` by the fitter; here are its skin confidence
(eq. 9), the light part of the uniform loss (eq. 13), the inner-mouth loss (eq. 11) and the
landmark weights of eq. 10.
"""

from __future__ import annotations

import torch

from facerecon.losses.hybrid import PAPER000_WEIGHTS, landmark_weights_68

#: Loss weights of paper 002 sec. 4.1 mapped onto paper 000's names: w_photo 1.92, w_lmk 1.8e-3,
#: w_id 0.2 (perceptual), w_reg 5e-4 (coefficients); the uniform loss (5.0) takes the place of
#: paper 000's texture term; eq. 12's prior has equal weights on the identity, albedo and
#: expression coefficients (paper 000's relative weights are kept: they suit our model's
#: coefficient scales, see docs/fitting.md). The inner-mouth weight 1.3e-3 is
#: ``FitSettings.inner_mouth_weight``.
PAPER002_WEIGHTS = {**PAPER000_WEIGHTS, "photo": 1.92, "landmark": 1.8e-3, "coefficients": 5e-4}

#: iBUG indices weighted 20 by paper 002 eq. 10: the eyebrows (17-26) and the outer mouth (48-59).
HEAVY_LANDMARKS_68_PAPER002 = list(range(17, 27)) + list(range(48, 60))


def landmark_weights_68_paper002(heavy: float = 20.0, dtype=torch.float32, device=None) -> torch.Tensor:
    """Per-landmark weights (68,) of paper 002 eq. 10: 20 on eyebrows and outer mouth, else 1."""
    return landmark_weights_68(heavy, dtype, device, indices=HEAVY_LANDMARKS_68_PAPER002)


def skin_confidence(probability: torch.Tensor) -> torch.Tensor:
    """Paper 002 eq. 9: C = 1 where the skin probability p > 0.5, else p. Any shape."""
    return torch.where(probability > 0.5, torch.ones_like(probability), probability)


def light_chroma(sh: torch.Tensor) -> torch.Tensor:
    """The light part of paper 002 eq. 13: sum over SH coefficients b of the squared spread of
    lambda_b over the colour channels, sum_b sum_c (lambda_{b,c} - mean_c lambda_b)^2.

    Args:
        sh: (B, 27) coloured SH, three blocks of 9 (R, G, B).

    Returns:
        (B,) 0 for a white (grey) light.
    """
    per_channel = sh.reshape(sh.shape[0], 3, 9)
    return ((per_channel - per_channel.mean(dim=1, keepdim=True)) ** 2).sum(dim=(1, 2))


def soft_polygon_mask(polygon: torch.Tensor, xs: torch.Tensor, ys: torch.Tensor, sharpness: float = 2.0
                      ) -> torch.Tensor:
    """Differentiable coverage of a closed polygon on a pixel grid.

    ``sigmoid(sharpness * signed distance)`` to the polygon's boundary, positive inside (even-odd
    rule, not differentiated), so the mask's gradient moves the polygon's vertices.

    Args:
        polygon: (B, K, 2) vertices (x, y) in pixels, in order (either orientation).
        xs: (W,) and ys: (H,) the pixel-centre coordinates of the grid.
        sharpness: 1 / the width of the soft edge in pixels (2: the coverage goes from 12 % to 88 %
            within one pixel of the edge, close to a hard mask, with gradients at the border pixels).

    Returns:
        (B, H, W) coverage in (0, 1).
    """
    b = polygon.shape[0]
    gy, gx = torch.meshgrid(ys, xs, indexing="ij")
    points = torch.stack([gx, gy], dim=-1).reshape(1, -1, 1, 2).to(polygon.dtype)  # (1, P, 1, 2)
    start = polygon[:, None]  # (B, 1, K, 2)
    edge = polygon.roll(-1, dims=1)[:, None] - start
    rel = points - start  # (B, P, K, 2)
    along = ((rel * edge).sum(-1) / (edge * edge).sum(-1).clamp_min(1e-12)).clamp(0.0, 1.0)
    distance = (rel - along[..., None] * edge).norm(dim=-1).min(dim=-1).values  # (B, P)
    with torch.no_grad():
        px, py = points[..., 0], points[..., 1]
        ay, by = start[..., 1], start[..., 1] + edge[..., 1]
        straddles = (ay > py) != (by > py)
        cross_x = start[..., 0] + (py - ay) * edge[..., 0] / torch.where(edge[..., 1] == 0, torch.ones_like(ay),
                                                                         edge[..., 1])
        inside = ((straddles & (px < cross_x)).sum(dim=-1) % 2) == 1
    signed = torch.where(inside, distance, -distance)
    return torch.sigmoid(sharpness * signed).reshape(b, len(ys), len(xs))


def inner_mouth_loss(ring: torch.Tensor, detected: torch.Tensor, margin: int = 3) -> torch.Tensor:
    """Paper 002 eq. 11: ``||A - A^p||_1``, the detected inner-mouth area against the projected one.

    Evaluated on the window of the crop that holds both (every face of the batch shares it), at
    full resolution.

    Args:
        ring: (B, K, 2) the model's inner-lip contour projected into the crop (pixels).
        detected: (B, S, S) detected mouth opening in [0, 1] (pixel centres at integer coordinates).
        margin: pixels added around the window.

    Returns:
        (B,) area difference in pixels of the crop.
    """
    size = detected.shape[-1]
    with torch.no_grad():
        rows = torch.nonzero(detected.amax(dim=(0, 2)) > 0.5).flatten()
        cols = torch.nonzero(detected.amax(dim=(0, 1)) > 0.5).flatten()
        x_lo, y_lo = ring[..., 0].min(), ring[..., 1].min()
        x_hi, y_hi = ring[..., 0].max(), ring[..., 1].max()
        if len(rows):
            y_lo, y_hi = torch.minimum(y_lo, rows.min()), torch.maximum(y_hi, rows.max())
            x_lo, x_hi = torch.minimum(x_lo, cols.min()), torch.maximum(x_hi, cols.max())
        bounds = [int(v) for v in torch.stack([x_lo, x_hi, y_lo, y_hi]).nan_to_num(0).round()]
        x0, x1 = max(0, bounds[0] - margin), min(size, bounds[1] + margin + 1)
        y0, y1 = max(0, bounds[2] - margin), min(size, bounds[3] + margin + 1)
    if x1 <= x0 or y1 <= y0:
        return ring.new_zeros(ring.shape[0])
    xs = torch.arange(x0, x1, dtype=ring.dtype, device=ring.device)
    ys = torch.arange(y0, y1, dtype=ring.dtype, device=ring.device)
    projected = soft_polygon_mask(ring, xs, ys)
    return (projected - detected[:, y0:y1, x0:x1].to(ring.dtype)).abs().flatten(1).sum(dim=1)
