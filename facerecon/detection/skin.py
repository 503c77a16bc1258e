"""Skin-colour posterior and the skin attention mask of paper 000 (sec. 4.1.1).

Paper 000 weights its photometric loss with a per-pixel skin probability P from a naive
Bayes classifier over two Gaussian mixtures (skin, non-skin) and sets the attention
``A = 1 where P > 0.5, else P``. The mixtures here are the 16-kernel RGB models with
diagonal covariances published by Jones and Rehg (IJCV 2002), shipped as package data
``facerecon/data/skin_gmm_jones_rehg.json``.

Posterior, for an RGB value x::

    P(skin | x) = p(x | skin) P(skin) / (p(x | skin) P(skin) + p(x | non-skin) (1 - P(skin)))

Prior: ``P(skin) = 0.5`` by default (:data:`DEFAULT_SKIN_PRIOR`). The mask is computed on
aligned face crops, where skin covers roughly half of the pixels, so equal priors are a
fair description of the data it sees; it also makes ``P > 0.5`` exactly the
likelihood-ratio test ``p(x | skin) > p(x | non-skin)``, i.e. the classifier the mixtures
define on their own. A prior of 0.1 (skin's share of generic web photos, mostly
background) would leave only about a fifth of the astronaut's face above 0.5, against
96 % with 0.5. Callers can pass another prior.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

DEFAULT_SKIN_PRIOR = 0.5
DATA_FILE = "skin_gmm_jones_rehg.json"


@dataclass(frozen=True, eq=False)
class DiagonalGMM:
    """A Gaussian mixture with diagonal covariances.

    Attributes:
        means: (K, D) float64.
        variances: (K, D) float64.
        weights: (K,) float64 (normalised to sum to 1).
    """

    means: np.ndarray
    variances: np.ndarray
    weights: np.ndarray

    def log_density(self, x: np.ndarray) -> np.ndarray:
        """Log density at points ``x`` (N, D) -> (N,) float64 (reference implementation)."""
        x = np.asarray(x, dtype=np.float64)
        d = x[:, None, :] - self.means[None]                           # (N, K, D)
        logp = (-0.5 * (d * d / self.variances).sum(axis=2)
                - 0.5 * np.log(2.0 * np.pi * self.variances).sum(axis=1) + np.log(self.weights))
        peak = logp.max(axis=1, keepdims=True)
        return (peak + np.log(np.exp(logp - peak).sum(axis=1, keepdims=True)))[:, 0]

    @functools.cached_property
    def level_tables(self) -> np.ndarray:
        """(D, K, 256) float32: per channel, component and 8-bit level, that channel's share
        of the component's log density (the log weight folded into channel 0). A diagonal
        Gaussian's log density is the sum of its channels' terms, so 8-bit pixels need
        only three table look-ups per component."""
        levels = np.arange(256, dtype=np.float64)
        tables = (-0.5 * (levels[None, None, :] - self.means.T[:, :, None]) ** 2 / self.variances.T[:, :, None]
                  - 0.5 * np.log(2.0 * np.pi * self.variances.T)[:, :, None])
        tables[0] += np.log(self.weights)[:, None]
        return np.ascontiguousarray(tables, dtype=np.float32)

    def log_density_uint8(self, x: np.ndarray) -> np.ndarray:
        """Log density at 8-bit points ``x`` (N, D) uint8 -> (N,) float32 (exact up to float32
        rounding, via :attr:`level_tables`; components along the first axis so the
        log-sum-exp reductions run over contiguous rows)."""
        tables = self.level_tables
        logp = tables[0].take(x[:, 0], axis=1)                      # (K, N)
        for channel in range(1, x.shape[1]):
            logp += tables[channel].take(x[:, channel], axis=1)
        peak = logp.max(axis=0)
        logp -= peak
        np.exp(logp, out=logp)
        return peak + np.log(logp.sum(axis=0))


@dataclass(frozen=True)
class SkinModel:
    """Skin and non-skin colour mixtures over RGB in 0..255."""

    skin: DiagonalGMM
    non_skin: DiagonalGMM
    source: str = ""


def _gmm_from_json(entry: dict) -> DiagonalGMM:
    means = np.asarray(entry["mean_rgb"], dtype=np.float64)
    variances = np.asarray(entry["diag_cov_rgb"], dtype=np.float64)
    weights = np.asarray(entry["weight"], dtype=np.float64)
    if means.shape != variances.shape or means.shape[0] != weights.shape[0] or means.shape[1] != 3:
        raise ValueError("inconsistent skin mixture shapes")
    if (variances <= 0).any() or (weights <= 0).any():
        raise ValueError("skin mixture variances and weights must be positive")
    return DiagonalGMM(means, variances, weights / weights.sum())


def load_skin_model(path: str | Path | None = None) -> SkinModel:
    """Read the mixtures from ``path`` (default: the packaged data file)."""
    path = Path(path) if path is not None else packaged_model_path()
    data = json.loads(path.read_text(encoding="utf-8"))
    return SkinModel(_gmm_from_json(data["skin"]), _gmm_from_json(data["non_skin"]), data.get("reference", ""))


def packaged_model_path() -> Path:
    """Path of the packaged mixture file."""
    return Path(__file__).resolve().parents[1] / "data" / DATA_FILE


@functools.lru_cache(maxsize=1)
def default_skin_model() -> SkinModel:
    """The packaged Jones-Rehg model (loaded once)."""
    return load_skin_model()


def skin_posterior(rgb: np.ndarray, prior: float = DEFAULT_SKIN_PRIOR, model: SkinModel | None = None) -> np.ndarray:
    """Per-pixel P(skin | colour).

    Args:
        rgb: (..., 3) RGB values in 0..255 (uint8 or float).
        prior: P(skin), in (0, 1).
        model: mixtures (default :func:`default_skin_model`).
    Returns:
        (...) float32 posterior in [0, 1].
    """
    if not 0.0 < prior < 1.0:
        raise ValueError("prior must be in (0, 1)")
    model = model or default_skin_model()
    rgb = np.asarray(rgb)
    flat = rgb.reshape(-1, 3)
    if flat.dtype == np.uint8:
        log_ratio = model.skin.log_density_uint8(flat) - model.non_skin.log_density_uint8(flat)
    else:
        log_ratio = model.skin.log_density(flat) - model.non_skin.log_density(flat)
    log_ratio = log_ratio + (np.log(prior) - np.log1p(-prior))
    post = 0.5 * (1.0 + np.tanh(0.5 * np.clip(log_ratio, -80.0, 80.0)))  # stable sigmoid
    return post.astype(np.float32).reshape(rgb.shape[:-1])


def skin_attention(posterior: np.ndarray) -> np.ndarray:
    """Paper 000's attention: 1 where ``posterior > 0.5``, else the posterior (same shape, float32)."""
    p = np.asarray(posterior, dtype=np.float32)
    return np.where(p > 0.5, np.float32(1.0), p)


def skin_attention_image(rgb: np.ndarray, prior: float = DEFAULT_SKIN_PRIOR,
                         model: SkinModel | None = None) -> np.ndarray:
    """Attention mask of an (H, W, 3) RGB image as (H, W) float32 in [0, 1]."""
    return skin_attention(skin_posterior(rgb, prior, model))
