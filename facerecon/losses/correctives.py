"""Regularisers of paper 004's corrective level (Tewari et al. 2018, "Self-supervised multi-level
face model learning", sec. 6.2): per-vertex geometry and reflectance correctives on a mesh.

A corrective is a per-vertex field F (B, N, C) added to the base level's geometry (mm) or
reflectance ([0, 1] RGB). The mesh enters through its unique undirected edges (E, 2)
(:func:`mesh_edges`), which give every vertex its 1-ring neighbourhood N_i. Every function
returns one value per batch item, shape (B,), and is differentiable w.r.t. the fields.
"""

from __future__ import annotations

import torch

#: paper 004 eq. 13's constants: the chromaticity weights' sharpness beta and the norm's exponent p
SPARSITY_BETA = 50.0
SPARSITY_P = 0.9


def mesh_edges(triangles: torch.Tensor, keep: torch.Tensor | None = None) -> torch.Tensor:
    """Unique undirected edges (E, 2) int64 of a triangle list (F, 3), each as (i, j) with i < j,
    sorted. ``keep``: (N,) bool, only edges with both ends kept."""
    tris = triangles.to(torch.int64)
    pairs = torch.cat([tris[:, [0, 1]], tris[:, [1, 2]], tris[:, [2, 0]]], dim=0)
    pairs = torch.sort(pairs, dim=1).values
    edges = torch.unique(pairs, dim=0)
    if keep is not None:
        edges = edges[keep[edges[:, 0]] & keep[edges[:, 1]]]
    return edges


def vertex_degrees(edges: torch.Tensor, n_vertices: int) -> torch.Tensor:
    """(N,) number of 1-ring neighbours |N_i| of every vertex, as float (0 for isolated vertices)."""
    degree = torch.zeros(n_vertices, dtype=torch.float64, device=edges.device)
    ones = torch.ones(edges.shape[0], dtype=torch.float64, device=edges.device)
    return degree.index_add(0, edges[:, 0], ones).index_add(0, edges[:, 1], ones)


def laplacian_smoothness(field: torch.Tensor, edges: torch.Tensor, degree: torch.Tensor) -> torch.Tensor:
    """Paper 004 eq. 12 (without its weight): (1/N) sum_i (1/|N_i|) sum_{j in N_i} ||F_i - F_j||^2.

    Every undirected edge (i, j) appears in both 1-rings, so it counts ||F_i - F_j||^2 (1/|N_i| +
    1/|N_j|). N is the number of vertices with at least one neighbour.

    Args:
        field: (B, N, C) per-vertex correction (geometry in mm, or reflectance).
        edges: (E, 2) int64 from :func:`mesh_edges`.
        degree: (N,) from :func:`vertex_degrees` on the same edges.

    Returns:
        (B,) loss.
    """
    diff = field[:, edges[:, 0]] - field[:, edges[:, 1]]  # (B, E, C)
    inverse = torch.where(degree > 0, 1.0 / degree.clamp_min(1.0), torch.zeros_like(degree)).to(field.dtype)
    edge_weight = inverse[edges[:, 0]] + inverse[edges[:, 1]]  # (E,)
    count = (degree > 0).sum().clamp_min(1).to(field.dtype)
    return ((diff ** 2).sum(dim=-1) * edge_weight).sum(dim=1) / count


def chromaticity(colors: torch.Tensor, eps: float = 1e-3) -> torch.Tensor:
    """RGB chromaticity c / (r + g + b) of colours (..., 3) >= 0 (``eps`` keeps black finite)."""
    colors = colors.clamp_min(0.0)
    return colors / (colors.sum(dim=-1, keepdim=True) + eps)


def chromaticity_weights(colors: torch.Tensor, edges: torch.Tensor, visible: torch.Tensor | None = None,
                         beta: float = SPARSITY_BETA) -> torch.Tensor:
    """The constant weights w_ij = exp(-beta ||chroma(I(u_i)) - chroma(I(u_j))||_2) of paper 004
    eq. 13: neighbours of the same input chromaticity are likely to share their reflectance.

    Args:
        colors: (B, N, 3) the photo's colour at every vertex's projection (the previous iterate's).
        edges: (E, 2).
        visible: (B, N) bool, vertices the photo shows; an edge with a hidden end has no evidence
            of a reflectance edge and gets weight 1. None: all visible.
        beta: sharpness (paper: 50).

    Returns:
        (B, E) weights in (0, 1], detached.
    """
    with torch.no_grad():
        chroma = chromaticity(colors)
        distance = (chroma[:, edges[:, 0]] - chroma[:, edges[:, 1]]).norm(dim=-1)
        weights = torch.exp(-beta * distance)
        if visible is not None:
            seen = visible[:, edges[:, 0]] & visible[:, edges[:, 1]]
            weights = torch.where(seen, weights, torch.ones_like(weights))
    return weights


def reflectance_sparsity(reflectance: torch.Tensor, edges: torch.Tensor, weights: torch.Tensor,
                         p: float = SPARSITY_P, eps: float = 1e-6) -> torch.Tensor:
    """Paper 004 eq. 13 (without its weight): (1/N) sum_i sum_{j in N_i} w_ij ||r_i - r_j||_2^p.

    Each undirected edge is in two 1-rings and counts twice. ``||d||^p`` is evaluated as
    ``(||d||^2 + eps)^(p/2) - eps^(p/2)``: 0 for equal neighbours, with a finite gradient there.

    Args:
        reflectance: (B, N, 3) the final level's reflectance r^f (base + corrective).
        edges: (E, 2); weights: (B, E) from :func:`chromaticity_weights`.
        p: the norm's exponent (paper: 0.9; < 1 favours few, sharp reflectance edges).

    Returns:
        (B,) loss.
    """
    diff = reflectance[:, edges[:, 0]] - reflectance[:, edges[:, 1]]
    norm_p = ((diff ** 2).sum(dim=-1) + eps) ** (0.5 * p) - eps ** (0.5 * p)
    n = torch.unique(edges).numel()
    return 2.0 * (weights.to(reflectance.dtype) * norm_p).sum(dim=1) / max(n, 1)


def random_vertex_pairs(vertices: torch.Tensor, samples: int = 6, seed: int = 0) -> torch.Tensor:
    """(|M| samples, 2) int64 pairs (i, j) with j drawn at random from ``vertices`` (M,) for every
    i in M: paper 004 eq. 14's G_i. Fixed by ``seed`` (a fit repeats exactly)."""
    generator = torch.Generator().manual_seed(seed)
    count = vertices.numel()
    picks = torch.randint(0, count, (count, samples), generator=generator).to(vertices.device)
    first = vertices[:, None].expand(count, samples).reshape(-1)
    return torch.stack([first, vertices[picks].reshape(-1)], dim=1).to(torch.int64)


def skin_constancy(reflectance: torch.Tensor, pairs: torch.Tensor, n_skin: int) -> torch.Tensor:
    """Paper 004 eq. 14 (without its weight): (1/|M|) sum_i sum_{j in G_i} ||r_i - r_j||^2 over a
    skin mask M without facial-hair areas: the whole skin has one reflectance.

    Args:
        reflectance: (B, N, 3); pairs: (P, 2) from :func:`random_vertex_pairs`; n_skin: |M|.

    Returns:
        (B,) loss.
    """
    diff = reflectance[:, pairs[:, 0]] - reflectance[:, pairs[:, 1]]
    return (diff ** 2).sum(dim=(1, 2)) / max(int(n_skin), 1)


def stabilization(field: torch.Tensor, support: torch.Tensor | None = None) -> torch.Tensor:
    """Paper 004 eq. 15 (without its weight): (1/N) sum_i ||F_i||^2, the corrected geometry stays
    near the base level. ``support``: (N,) bool, the vertices that count (None: all)."""
    squared = (field ** 2).sum(dim=-1)
    if support is None:
        return squared.mean(dim=1)
    return squared[:, support].mean(dim=1)
