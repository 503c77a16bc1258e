"""A prior for blendshape expressions (ARKit-style weights in [0, 1], e.g. ICT-FaceKit).

Paper 000's coefficient prior (eq. 5, w_beta = 0.8 times w_coef = 3e-4) was set for the PCA
expression coefficients of a BFM-type model, whose unit is one standard deviation of a large
expression space. A blendshape weight of 1 is a full expression (an eye closed, the jaw fully
open); under eq. 5 it costs less than a tenth of a pixel of landmark error, so a fit is free to
turn on any combination of blendshapes to chase detector noise or an identity the model
cannot express, including pairs that contradict each other (looking up and down at once).

This prior makes expressions earn their place:

* an L1 term (sparsity: a face uses few blendshapes, each only as much as the photo shows),
* an L2 term (no blendshape at full strength without strong evidence),
* an opposing-pair term: the product of the weights of contradicting blendshapes
  (:mod:`facerecon.facemodel.blendshape_pairs`), zero as soon as either is off,
* optionally a pull of selected weights towards observed values (gaze from the iris points).

All terms are per face, (B,), in the units of the fit's total loss.
"""

from __future__ import annotations

import torch


def blendshape_prior(weights: torch.Tensor, pairs: torch.Tensor, l1: float, l2: float, opposing: float
                     ) -> torch.Tensor:
    """Sparsity, size and contradiction cost of blendshape weights.

    Args:
        weights: (B, K) blendshape weights (clamped to [0, 1] by the fit).
        pairs: (P, 2) int64 indices of opposing blendshapes (P may be 0).
        l1, l2, opposing: term weights.

    Returns:
        (B,) ``l1 * sum|w| + l2 * sum w^2 + opposing * sum_pairs w_a w_b``.
    """
    value = l1 * weights.abs().sum(dim=1) + l2 * (weights ** 2).sum(dim=1)
    if pairs.numel():
        value = value + opposing * (weights[:, pairs[:, 0]].clamp_min(0) * weights[:, pairs[:, 1]].clamp_min(0)).sum(1)
    return value


def observed_weight_prior(weights: torch.Tensor, index: torch.Tensor, observed: torch.Tensor,
                          strength: float) -> torch.Tensor:
    """Pull selected weights towards observed values (e.g. gaze blendshapes from the irises).

    Args:
        weights: (B, K); index: (G,) int64 columns of ``weights``; observed: (B, G) targets, NaN
            where nothing was observed (no pull); strength: term weight.

    Returns:
        (B,) ``strength * sum_g (w_g - observed_g)^2`` over the observed entries.
    """
    if not index.numel():
        return weights.new_zeros(weights.shape[0])
    chosen = weights[:, index]
    seen = torch.isfinite(observed)
    difference = torch.where(seen, chosen - torch.nan_to_num(observed), torch.zeros_like(chosen))
    return strength * (difference ** 2).sum(dim=1)
