"""Paper 003's metrics: SIDE and MAD for depth and normals, SSIM for renders against photos.

* SIDE (scale-invariant depth error, Eigen et al. 2014, as paper 003 / Unsup3D use it):
  ``sqrt(mean(D^2) - mean(D)^2)`` with ``D = log d_pred - log d_true`` over the pixels both
  depth maps cover; invariant to a global scale of the predicted depth.
* MAD (mean angle deviation): mean angle in degrees between predicted and true unit normals.
* SSIM (Wang et al. 2004): Gaussian window (11 px, sigma 1.5), C1 = 0.01^2, C2 = 0.03^2 for
  values in [0, 1], per channel, the SSIM map averaged over a mask.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def side(pred_depth: torch.Tensor, true_depth: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(B,) SIDE of depth maps (B, H, W) > 0 over ``mask`` (B, H, W) bool (NaN where empty)."""
    m = mask & (pred_depth > 0) & (true_depth > 0)
    pred, true = pred_depth.double(), true_depth.double()  # differences of logs near log(1000 mm)
    diff = torch.where(m, torch.log(pred.clamp_min(1e-9)) - torch.log(true.clamp_min(1e-9)), torch.zeros_like(pred))
    n = m.sum((1, 2)).double()
    mean = diff.sum((1, 2)) / n.clamp_min(1)
    var = (((diff - mean[:, None, None]) ** 2) * m).sum((1, 2)) / n.clamp_min(1)  # two-pass: no cancellation
    return torch.where(n > 0, var.sqrt(), torch.full_like(mean, math.nan)).to(pred_depth.dtype)


def mad(pred_normals: torch.Tensor, true_normals: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(B,) mean angle (degrees) between unit normals (B, H, W, 3) over ``mask`` (B, H, W)."""
    cos = (F.normalize(pred_normals, dim=-1) * F.normalize(true_normals, dim=-1)).sum(-1).clamp(-1, 1)
    angle = torch.rad2deg(torch.acos(cos))
    n = mask.sum((1, 2)).to(angle.dtype)
    return torch.where(n > 0, (angle * mask).sum((1, 2)) / n, torch.full_like(n, math.nan))


def _gaussian_window(size: int = 11, sigma: float = 1.5, device=None, dtype=torch.float32) -> torch.Tensor:
    x = torch.arange(size, device=device, dtype=dtype) - (size - 1) / 2
    g = torch.exp(-x ** 2 / (2 * sigma ** 2))
    g = g / g.sum()
    return (g[:, None] * g[None, :])[None, None]


def ssim(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """(B,) SSIM of images (B, H, W, C) in [0, 1], the map averaged over ``mask`` (B, H, W)
    (all pixels when None)."""
    B, H, W, C = a.shape
    window = _gaussian_window(device=a.device, dtype=a.dtype).expand(C, 1, -1, -1)
    x, y = a.permute(0, 3, 1, 2), b.permute(0, 3, 1, 2)

    def blur(t):
        return F.conv2d(t, window, padding=5, groups=C)

    mx, my = blur(x), blur(y)
    vx, vy, cxy = blur(x * x) - mx ** 2, blur(y * y) - my ** 2, blur(x * y) - mx * my
    c1, c2 = 0.01 ** 2, 0.03 ** 2
    value = ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx ** 2 + my ** 2 + c1) * (vx + vy + c2))
    value = value.mean(1)
    if mask is None:
        return value.mean((1, 2))
    m = mask.to(value.dtype)
    return (value * m).sum((1, 2)) / m.sum((1, 2)).clamp_min(1)
