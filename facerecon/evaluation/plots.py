"""Plots shared by the evaluation protocols: cumulative error curves and per-vertex heat maps.

Figures are drawn with matplotlib's Agg backend (no display needed) and written atomically.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import torch

from facerecon.io.atomic import atomic_write_bytes
from facerecon.render.renderer import MeshRenderer

NO_VALUE_GRAY = (0.78, 0.78, 0.78)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(figure, path: str | Path, dpi: int | None = None) -> None:
    """Write a matplotlib figure as PNG atomically and close it."""
    plt = _pyplot()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=dpi)
    plt.close(figure)
    atomic_write_bytes(path, buffer.getvalue())


def plot_cumulative_errors(curves: Mapping[str, Sequence[float]], path: str | Path, xlabel: str,
                           ylabel: str = "fraction of subjects", title: str = "") -> None:
    """Cumulative error curves: for each label, the fraction of its values <= x (a step plot;
    the denominator is the number of values of that label)."""
    plt = _pyplot()
    figure, axis = plt.subplots(figsize=(5, 3.4), dpi=120)
    top = 0.0
    for label, values in curves.items():
        values = np.sort(np.asarray([v for v in values if v is not None and np.isfinite(v)], dtype=np.float64))
        if not len(values):
            continue
        top = max(top, float(values[-1]))
        xs = np.concatenate([[0.0], values])
        ys = np.concatenate([[0.0], np.arange(1, len(values) + 1) / len(values)])
        axis.step(xs, ys, where="post", label=f"{label} (n={len(values)})")
    _finish_cumulative(figure, axis, path, top * 1.1 if top > 0 else 1.0, xlabel, ylabel, title,
                       "upper left" if axis.get_legend_handles_labels()[0] else None)


def vertex_colors(values: np.ndarray, vmax: float, cmap: str = "viridis") -> np.ndarray:
    """Per-vertex RGB in [0, 1] from values in [0, vmax] (NaN -> light gray)."""
    from matplotlib import colormaps

    values = np.asarray(values, dtype=np.float64)
    scaled = np.clip(np.nan_to_num(values, nan=0.0) / max(vmax, 1e-12), 0.0, 1.0)
    colors = colormaps[cmap](scaled)[:, :3]
    colors[~np.isfinite(values)] = NO_VALUE_GRAY
    return colors


def render_vertex_values(vertices: np.ndarray, triangles: np.ndarray, values: np.ndarray, vmax: float,
                         size: int = 384, cmap: str = "viridis", focus: np.ndarray | None = None) -> np.ndarray:
    """A frontal image (size, size, 3) uint8 of a canonical mesh (mm, +y up, +z towards the
    viewer) coloured by per-vertex values, with simple headlight shading on white.

    ``focus``: vertex indices the view is framed on (default: the vertices with a value, or
    all when none has one).
    """
    vertices = np.asarray(vertices, dtype=np.float64)
    if focus is None:
        focus = np.flatnonzero(np.isfinite(values))
        if not len(focus):
            focus = np.arange(len(vertices))
    lo, hi = vertices[focus].min(axis=0), vertices[focus].max(axis=0)
    centre = (lo + hi) / 2
    extent = max(hi[0] - lo[0], hi[1] - lo[1], 1e-6)
    distance = 1000.0
    focal = 0.88 * size * distance / extent
    camera = (vertices - centre) * np.array([1.0, -1.0, -1.0]) + np.array([0.0, 0.0, distance + hi[2] - centre[2]])
    k = torch.tensor([[focal, 0.0, (size - 1) / 2], [0.0, focal, (size - 1) / 2], [0.0, 0.0, 1.0]])[None]
    albedo = torch.as_tensor(vertex_colors(values, vmax, cmap), dtype=torch.float32)[None]
    white = torch.ones(1, size, size, 3)
    out = MeshRenderer(image_size=(size, size), backend="torch").render(
        torch.as_tensor(camera, dtype=torch.float32)[None], torch.as_tensor(np.asarray(triangles), dtype=torch.long),
        k.float(), albedo, None, background=white)
    shade = (0.35 + 0.65 * (-out.normals[0, ..., 2]).clamp(0, 1))[..., None]
    image = torch.where(out.mask[0][..., None], out.image[0] * shade, white[0])
    return (image.clamp(0, 1) * 255 + 0.5).to(torch.uint8).numpy()


def plot_heatmaps(panels: Sequence[tuple[str, np.ndarray]], vmax: float, path: str | Path, label: str,
                  cmap: str = "viridis", title: str = "") -> None:
    """Rendered heat maps side by side (one per (title, image) panel) with one colour bar."""
    plt = _pyplot()
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize

    count = max(len(panels), 1)
    figure, axes = plt.subplots(1, count, figsize=(3.0 * count + 0.9, 3.5), dpi=120, squeeze=False)
    for axis, (name, image) in zip(axes[0], panels):
        axis.imshow(image)
        axis.set_title(name, fontsize=9)
    for axis in axes[0]:
        axis.axis("off")
    mappable = ScalarMappable(norm=Normalize(0, vmax), cmap=cmap)
    figure.colorbar(mappable, ax=list(axes[0]), fraction=0.046 if count == 1 else 0.02, pad=0.03, label=label)
    if title:
        figure.suptitle(title, fontsize=10)
    save_figure(figure, path)


def plot_bar_groups(groups: Sequence[str], series: Mapping[str, Sequence[float | None]], path: str | Path,
                    ylabel: str, xlabel: str = "", title: str = "",
                    errors: Mapping[str, Sequence[float | None]] | None = None) -> None:
    """Grouped bar chart: one group per label in ``groups``, one bar per series (values
    aligned with ``groups``; None draws no bar), optional error bars per series, each bar
    labelled with its value."""
    plt = _pyplot()
    figure, axis = plt.subplots(figsize=(5.4, 3.4), dpi=120)
    names = list(series)
    width = 0.8 / max(len(names), 1)
    positions = np.arange(len(groups), dtype=np.float64)
    for i, name in enumerate(names):
        values = [np.nan if v is None else float(v) for v in series[name]]
        spread = None
        if errors and name in errors:
            spread = [0.0 if e is None else float(e) for e in errors[name]]
        xs = positions + (i - (len(names) - 1) / 2) * width
        bars = axis.bar(xs, values, width=width * 0.95, yerr=spread, capsize=3 if spread else 0, label=name)
        for bar, value in zip(bars, values):
            if np.isfinite(value):
                axis.annotate(f"{value:.2f}", (bar.get_x() + bar.get_width() / 2, value), textcoords="offset points",
                              xytext=(0, 2), ha="center", va="bottom", fontsize=7)
    axis.set_xticks(positions)
    axis.set_xticklabels(list(groups), fontsize=8)
    axis.set_ylabel(ylabel)
    if xlabel:
        axis.set_xlabel(xlabel)
    if title:
        axis.set_title(title)
    axis.set_ylim(bottom=0)
    axis.grid(alpha=0.3, axis="y")
    if names:
        axis.legend(fontsize=8)
    figure.tight_layout()
    save_figure(figure, path)


def plot_cumulative_distribution(curves: Mapping[str, np.ndarray], path: str | Path, xlabel: str,
                                 ylabel: str = "fraction of points", title: str = "", x_max: float | None = None,
                                 samples: int = 512) -> None:
    """Cumulative distributions of large value sets (e.g. millions of per-vertex errors):
    each curve is evaluated on ``samples`` evenly spaced x in [0, x_max] (default: the 99th
    percentile of all values, at least 1) instead of one step per value."""
    plt = _pyplot()
    figure, axis = plt.subplots(figsize=(5, 3.4), dpi=120)
    prepared = {}
    for label, values in curves.items():
        values = np.asarray(values, dtype=np.float64).ravel()
        values = np.sort(values[np.isfinite(values)])
        if len(values):
            prepared[label] = values
    if x_max is None:
        tops = [float(np.percentile(v, 99)) for v in prepared.values()]
        x_max = max(tops + [1.0])
    xs = np.linspace(0.0, x_max, samples)
    for label, values in prepared.items():
        ys = np.searchsorted(values, xs, side="right") / len(values)
        axis.plot(xs, ys, label=f"{label} (n={len(values)})")
    _finish_cumulative(figure, axis, path, x_max, xlabel, ylabel, title, "lower right" if prepared else None)


def _finish_cumulative(figure, axis, path: str | Path, x_max: float, xlabel: str, ylabel: str, title: str,
                       legend: str | None) -> None:
    """Axes of a cumulative plot (x from 0 to ``x_max``, fractions 0-1), legend at ``legend``
    (None: no legend), then save."""
    axis.set_xlim(0, x_max)
    axis.set_ylim(0, 1.02)
    axis.set_xlabel(xlabel)
    axis.set_ylabel(ylabel)
    if title:
        axis.set_title(title)
    axis.grid(alpha=0.3)
    if legend:
        axis.legend(loc=legend, fontsize=8)
    figure.tight_layout()
    save_figure(figure, path)
