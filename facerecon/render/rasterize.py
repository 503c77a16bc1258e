"""Batched pure-PyTorch triangle rasterizer (same code on CPU and CUDA).

Screen space: ``(u, v, z)`` per vertex, ``u`` to the right, ``v`` down, pixel centres at
integer coordinates (pixel (row i, col j) is sampled at ``u = j, v = i``), ``z`` the
camera depth (> 0 in front of the camera). A triangle is *front-facing* when it is
counter-clockwise as the image is displayed (rows going down), i.e. when
``(u1 - u0) * (v2 - v0) - (u2 - u0) * (v1 - v0) < 0``.

The method has two stages, in the spirit of nvdiffrast:

1. **Visibility (not differentiable).** Every triangle gets its integer pixel bounding
   box clipped to the image. Triangles are bucketed by box width and height (exact for
   1..4 pixels, then sizes ``1.5 * 2**k`` and ``2**k``); within a bucket all candidate
   pixels of all its triangles form one regular ``(Ky, Kx, M)`` tensor, so the
   per-triangle coefficients broadcast instead of being gathered. Vertex positions are
   snapped to a 1/256-pixel grid and the edge functions ``(C + B * y) + A * x`` are
   evaluated exactly (integer-valued float64); ties (a pixel centre exactly on an edge
   or vertex) follow the top-left rule, so a watertight mesh covers every pixel centre
   exactly once (no holes, no double coverage). The z-buffer is resolved with
   ``scatter_reduce(..., "amin")`` (one call per bucket into the same buffer) on an
   int64 key ``(0x7fffffff - float32 bits of 1/z) << 32 | triangle index``; the
   winning triangle id is decoded from the low 32 bits. Candidates are processed in
   chunks of at most ``MAX_CANDIDATES_PER_CHUNK`` to bound memory.
2. **Fragments (differentiable).** For each covered pixel the barycentrics and depth
   are recomputed from the winning triangle's three projected vertices, perspective
   correct (screen-space weights divided by z, renormalised). Gradients flow to the
   vertex positions (u, v, z) through the barycentrics and depth, but not through
   coverage/occlusion changes (no silhouette gradients).

Triangles are dropped when any vertex has ``z <= near`` (no clipping), when they have
zero screen area, when a vertex is not finite, or (with culling) when back-facing.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional, Sequence

import torch

__all__ = [
    "Fragments",
    "rasterize",
    "interpolate",
    "interpolate_compact",
    "scatter_to_pixels",
    "rasterize_triangle_ids",
    "fragments_from_triangle_ids",
    "triangle_validity",
    "DEFAULT_NEAR",
]

#: Triangles with any vertex at z <= DEFAULT_NEAR are dropped.
DEFAULT_NEAR = 1e-6

#: Vertex positions are snapped to 1/SUBPIXEL pixel for the coverage test, which is
#: then exact (integer-valued float64) for coordinates within +-4096 px of the centre.
SUBPIXEL = 256

#: Upper bound on candidate pixels processed at once (bounds peak memory, a few tens
#: of bytes per candidate).
MAX_CANDIDATES_PER_CHUNK = 1 << 22

_KEY_EMPTY = torch.iinfo(torch.int64).max
_LOW32 = 0xFFFFFFFF
_KEY_HI_BASE = 0x7FFFFFFF << 32


@dataclass
class Fragments:
    """Per-pixel rasterization result.

    Attributes:
        triangle_id: (B, H, W) int64, index into the triangle list, -1 on background.
        barycentric: (B, H, W, 3) perspective-correct barycentric weights of the
            triangle's three corners (in the order of ``triangles``); differentiable
            w.r.t. the screen vertices; 0 on background.
        depth: (B, H, W) camera z of the surface; differentiable; 0 on background.
        mask: (B, H, W) bool, True where a triangle covers the pixel centre.
    """

    triangle_id: torch.Tensor
    barycentric: torch.Tensor
    depth: torch.Tensor
    mask: torch.Tensor
    # Internal cache (covered-pixel indices and their barycentrics) used by
    # interpolate(); only trusted while the public tensors are the ones it was built
    # for (dataclasses.replace() drops it).
    _compact: Optional[tuple] = field(default=None, init=False, repr=False, compare=False)

    def _compact_view(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(P,) flat covered-pixel indices into B*H*W and their (3, P) barycentrics."""
        c = self._compact
        if (
            c is not None
            and c[0] is self.triangle_id
            and c[1] is self.barycentric
            and c[2] is self.mask
        ):
            return c[3], c[4]
        pix = self.mask.reshape(-1).nonzero().squeeze(1)
        bary = self.barycentric.reshape(-1, 3).index_select(0, pix).t()
        return pix, bary


def _size_classes(max_size: int) -> list[int]:
    sizes = [1, 2, 3, 4]
    p = 4
    while sizes[-1] < max_size:
        sizes.append(p + p // 2)
        sizes.append(2 * p)
        p *= 2
    return sizes


def _gather_corners(screen_vertices: torch.Tensor, tris: torch.Tensor) -> torch.Tensor:
    """(B, N, 3) and (F, 3) long -> (B, F, 3 corners, 3)."""
    B = screen_vertices.shape[0]
    F = tris.shape[0]
    return screen_vertices.index_select(1, tris.reshape(-1)).view(B, F, 3, 3)


def _validity(tv: torch.Tensor, cull_backfaces: bool, near: float) -> tuple[torch.Tensor, torch.Tensor]:
    # Same rules as rasterize_triangle_ids: orientation and degeneracy are decided on
    # the snapped 1/SUBPIXEL grid (snapping commutes with the integer centre shift).
    tv = tv.to(torch.float64)
    u = torch.round(tv[..., 0] * SUBPIXEL)
    v = torch.round(tv[..., 1] * SUBPIXEL)
    z = tv[..., 2]
    cross = (u[..., 1] - u[..., 0]) * (v[..., 2] - v[..., 0]) - (u[..., 2] - u[..., 0]) * (
        v[..., 1] - v[..., 0]
    )
    valid = (z > near).all(-1) & torch.isfinite(cross) & (cross != 0)
    if cull_backfaces:
        valid &= cross < 0
    return valid, cross / (SUBPIXEL * SUBPIXEL)


def triangle_validity(
    screen_vertices: torch.Tensor,
    triangles: torch.Tensor,
    cull_backfaces: bool = True,
    near: float = DEFAULT_NEAR,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Which triangles the rasterizer keeps.

    Args:
        screen_vertices: (B, N, 3) ``(u, v, z)``.
        triangles: (F, 3) integer indices.
        cull_backfaces: drop triangles that are clockwise as displayed.
        near: drop triangles with any vertex at ``z <= near``.

    Returns:
        valid (B, F) bool and the twice-signed screen area (B, F) ``cross`` in pixels²
        (negative for front-facing triangles), both computed on the 1/SUBPIXEL snapped
        vertex positions like the rasterizer. Not differentiable.
    """
    with torch.no_grad():
        tris = triangles.to(device=screen_vertices.device, dtype=torch.long)
        tv = _gather_corners(screen_vertices.detach(), tris)
        return _validity(tv, cull_backfaces, near)


def rasterize_triangle_ids(
    screen_vertices: torch.Tensor,
    triangles: torch.Tensor,
    image_size: Sequence[int],
    cull_backfaces: bool = True,
    near: float = DEFAULT_NEAR,
) -> torch.Tensor:
    """Visibility only: the nearest triangle covering each pixel centre.

    Setup (:func:`_snapped_triangles`: snapping, culling, pixel boxes), bucketing by box size
    (:func:`_bucket_order`), per-triangle edge and depth tables (:func:`_edge_tables`), then one
    kernel, :func:`_raster_bucket`, over each bucket (:func:`_scan_buckets`). The contract it
    implements is spelled out per pixel by :func:`rasterize_triangle_ids_reference`.

    Args:
        screen_vertices: (B, N, 3) ``(u, v, z)`` (see module docstring).
        triangles: (F, 3) int64/int32 vertex indices.
        image_size: (H, W).
        cull_backfaces: drop triangles that are clockwise as displayed.
        near: drop triangles with any vertex at ``z <= near``.

    Returns:
        (B, H, W) int64 triangle index, -1 where no triangle covers the pixel. Equal
        depths are resolved towards the lower triangle index. Not differentiable.
    """
    H, W = int(image_size[0]), int(image_size[1])
    sv = screen_vertices.detach()
    device = sv.device
    B, N = sv.shape[0], sv.shape[1]
    tris = triangles.to(device=device, dtype=torch.long)
    F = tris.shape[0]
    empty = torch.full((B, H, W), -1, dtype=torch.long, device=device)
    if B == 0 or F == 0 or N == 0 or H == 0 or W == 0:
        return empty
    with torch.no_grad():
        rows, keep = _snapped_triangles(sv, tris, H, W, cull_backfaces, near)
        order = _bucket_order(rows, keep, H, W)
        if order is None:
            return empty
        sel, counts, class_list = order
        # A 1-D index_select per row is much faster on CPU than gathering a 2-D table.
        rows = [r.index_select(0, sel) for r in rows]
        bidx = sel // F
        edges, zplane, tl3, irows = _edge_tables(rows, bidx, sel - bidx * F, H, W)
        zbuf = torch.full((B * H * W,), _KEY_EMPTY, dtype=torch.long, device=device)
        _scan_buckets(zbuf, edges, zplane, tl3, irows, counts, class_list, W // 2, H // 2, W)
        tid = torch.where(zbuf == _KEY_EMPTY, -1, zbuf & _LOW32)
    return tid.view(B, H, W)


def _snapped_triangles(sv: torch.Tensor, tris: torch.Tensor, H: int, W: int, cull_backfaces: bool,
                       near: float) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Every (batch item, triangle) as rows of length B*F, and which of them to draw.

    Returns ``[u0, u1, u2, v0, v1, v2, z0, z1, z2, cross, x0, y0, x1, y1]`` and ``keep`` (B*F,) bool.
    Structure-of-arrays layout: one contiguous row per corner coordinate. u, v are snapped to a
    1/SUBPIXEL grid relative to the image centre (``W // 2, H // 2``, an integer shift: small,
    exact coordinates) and kept as integer-valued float64, so edge functions are computed
    exactly; x0..y1 is the integer pixel bounding box clipped to the image.
    """
    f64 = torch.float64
    ox, oy = W // 2, H // 2
    comps = sv.to(f64).permute(2, 0, 1)  # (3, B, N)
    u0, u1, u2, v0, v1, v2, z0, z1, z2 = (
        comps[c].index_select(1, tris[:, k]).reshape(-1) for c in range(3) for k in range(3)
    )
    u0, u1, u2 = (torch.round((u - ox) * SUBPIXEL) for u in (u0, u1, u2))
    v0, v1, v2 = (torch.round((v - oy) * SUBPIXEL) for v in (v0, v1, v2))
    cross = (u1 - u0) * (v2 - v0) - (u2 - u0) * (v1 - v0)
    valid = (z0 > near) & (z1 > near) & (z2 > near) & torch.isfinite(cross) & (cross != 0)
    if cull_backfaces:
        valid &= cross < 0

    # Integer pixel bounding box clipped to the image (in float, NaN-safe clamps).
    def _lo(a, b, c, off, size):
        m = torch.minimum(torch.minimum(a, b), c) / SUBPIXEL + off
        return torch.ceil(m.clamp(-1.0, size + 1.0)).clamp_min(0.0)

    def _hi(a, b, c, off, size):
        m = torch.maximum(torch.maximum(a, b), c) / SUBPIXEL + off
        return torch.floor(m.clamp(-1.0, size + 1.0)).clamp_max(size - 1.0)

    x0, x1 = _lo(u0, u1, u2, ox, W), _hi(u0, u1, u2, ox, W)
    y0, y1 = _lo(v0, v1, v2, oy, H), _hi(v0, v1, v2, oy, H)
    keep = valid & (x1 >= x0) & (y1 >= y0)  # NaN comparisons are False
    return [u0, u1, u2, v0, v1, v2, z0, z1, z2, cross, x0, y0, x1, y1], keep


def _bucket_order(rows: list[torch.Tensor], keep: torch.Tensor, H: int, W: int
                  ) -> tuple[torch.Tensor, list[int], list[int]] | None:
    """Bucket the kept triangles by box size class (width, height).

    Returns ``(sel, counts, class_list)``: (M,) indices b * F + f of the kept triangles in
    bucket order (each bucket a contiguous slice), the triangles per bucket id ``iy * ncls + ix``
    and the size classes; None when nothing is drawn. Dropped triangles go to a last, never
    processed class, so one sort does it.
    """
    x0, y0, x1, y1 = rows[10:14]
    device = keep.device
    classes = torch.tensor(_size_classes(max(H, W)), device=device, dtype=torch.float64)
    ncls = classes.numel()
    nclass2 = ncls * ncls
    combo = torch.searchsorted(classes, (y1 - y0 + 1).nan_to_num(1.0)) * ncls
    combo += torch.searchsorted(classes, (x1 - x0 + 1).nan_to_num(1.0))
    combo = torch.where(keep, combo, nclass2)
    counts = torch.bincount(combo, minlength=nclass2 + 1)[:nclass2].tolist()
    M = sum(counts)
    if M == 0:
        return None
    class_list = [int(c) for c in classes.tolist()]
    remap = _merge_small_buckets(counts, class_list)
    if remap is not None:  # fewer, slightly larger buckets: fewer kernel launches
        lut = torch.tensor(remap + [nclass2], device=device)
        combo = lut.index_select(0, combo)
        counts = torch.bincount(combo, minlength=nclass2 + 1)[:nclass2].tolist()
    sel = torch.sort(combo, stable=True).indices[:M]  # (M,) b * F + f, bucket order
    return sel, counts, class_list


def _edge_tables(rows: list[torch.Tensor], bidx: torch.Tensor, face: torch.Tensor, H: int, W: int):
    """Per-triangle tables of the kernel for M sorted triangles (rows of :func:`_snapped_triangles`).

    Returns ``edges`` (9, M) float64 (C0-2, A0-2, B0-2 of the three sign-adjusted edge
    functions), ``zplane`` (3, M) float32 (1/z at the box corner pixel and its per-pixel x and y
    slopes), ``tl3`` (3, M) bool top-left flags and ``irows`` (xmin, ymin, nx, ny, key base,
    pixel base), as :func:`_raster_bucket` takes them.
    """
    f64 = torch.float64
    ox, oy = W // 2, H // 2
    u0, u1, u2, v0, v1, v2, z0, z1, z2, cr, x0, y0, x1, y1 = rows
    xmin, ymin = x0.long(), y0.long()
    nx = x1.long() - xmin + 1
    ny = y1.long() - ymin + 1

    # Orient every triangle clockwise-as-displayed (positive cross) by swapping
    # corners 1 and 2 of the others; inside points then have all edges >= 0.
    flip = cr < 0
    u1, u2 = torch.where(flip, u2, u1), torch.where(flip, u1, u2)
    v1, v2 = torch.where(flip, v2, v1), torch.where(flip, v1, v2)
    z1, z2 = torch.where(flip, z2, z1), torch.where(flip, z1, z2)
    us = (u0, u1, u2)
    vs = (v0, v1, v2)
    zs = (z0, z1, z2)
    area2 = cr.abs()
    c_rows, a_rows, b_rows, tl_rows = [], [], [], []
    pz = qz = rz = None
    for k in range(3):  # the three edges; edge k goes P -> Q, opposite corner k
        pu, pv = us[(k + 1) % 3], vs[(k + 1) % 3]
        qu, qv = us[(k + 2) % 3], vs[(k + 2) % 3]
        # E_k(x, y) = C + A x + B y = (Q - P) x (X - P); swapping P and Q negates
        # C, A and B exactly, so shared edges are evaluated consistently.
        ce = pu * qv - pv * qu
        ae = pv - qv
        be = qu - pu
        # Top-left rule: dy < 0, or dy == 0 and dx > 0 (dy = -A, dx = B). Exactly
        # one direction of an edge qualifies; every non-degenerate triangle has
        # at least one such edge.
        tl = (ae > 0) | ((ae == 0) & (be > 0))
        # Negate non-top-left edges so that inside <=> (E' >= 0) == tl per edge.
        sgn = tl.to(f64) * 2.0 - 1.0
        c_rows.append(ce * sgn)
        a_rows.append(ae * sgn)
        b_rows.append(be * sgn)
        tl_rows.append(tl)
        # 1/z is affine in screen space: sum_k E_k / (area2 * z_k).
        g = 1.0 / (area2 * zs[k])
        pz = ce * g if pz is None else pz + ce * g
        qz = ae * g if qz is None else qz + ae * g
        rz = be * g if rz is None else rz + be * g
    # The 1/z plane is re-based at the box corner pixel and expressed per pixel, so
    # it can be evaluated in float32 without cancellation: p0 + q * dx + r * dy.
    p0 = pz + qz * ((xmin - ox) * SUBPIXEL).to(f64) + rz * ((ymin - oy) * SUBPIXEL).to(f64)
    edges = torch.stack(c_rows + a_rows + b_rows)  # (9, M) float64: C0-2, A0-2, B0-2
    zplane = torch.stack([p0, qz * SUBPIXEL, rz * SUBPIXEL]).float()  # (3, M)
    tl3 = torch.stack(tl_rows)  # (3, M) bool
    irows = [xmin, ymin, nx, ny, face | _KEY_HI_BASE, bidx * (H * W)]
    return edges, zplane, tl3, irows


def _scan_buckets(zbuf, edges, zplane, tl3, irows, counts: list[int], class_list: list[int], ox: int, oy: int,
                  W: int) -> None:
    """Run :func:`_raster_bucket` over every bucket (in chunks of at most
    ``MAX_CANDIDATES_PER_CHUNK`` candidate pixels), updating the depth-key buffer ``zbuf``."""
    ncls = len(class_list)
    device = zbuf.device
    start = 0
    for cid, cnt in enumerate(counts):
        if cnt == 0:
            continue
        kx = class_list[cid % ncls]
        ky = class_list[cid // ncls]
        step = max(1, MAX_CANDIDATES_PER_CHUNK // (kx * ky))
        ar_x = torch.arange(kx, device=device)[:, None]
        ar_y = torch.arange(ky, device=device)[:, None]
        for s0 in range(start, start + cnt, step):
            sl = slice(s0, min(s0 + step, start + cnt))
            _raster_bucket(
                zbuf, edges[:, sl], zplane[:, sl], tl3[:, sl], [r[sl] for r in irows],
                ar_x, ar_y, ox, oy, W,
            )
        start += cnt


def rasterize_triangle_ids_reference(
    screen_vertices: torch.Tensor,
    triangles: torch.Tensor,
    image_size: Sequence[int],
    cull_backfaces: bool = True,
    near: float = DEFAULT_NEAR,
) -> torch.Tensor:
    """:func:`rasterize_triangle_ids`, one triangle and one pixel centre at a time (slow; for tests
    and for reading). Same arguments and result, the same rules:

    * corners snapped to a 1/SUBPIXEL grid (relative to pixel ``(W // 2, H // 2)``);
    * a triangle is drawn if all its corners lie beyond ``near`` and it is not degenerate
      (and, with ``cull_backfaces``, counter-clockwise as displayed);
    * a pixel centre on an edge belongs to the triangle only for a top-left edge (dy < 0, or
      dy == 0 and dx > 0 with the triangle oriented clockwise as displayed);
    * the nearest triangle wins, by 1/z interpolated affinely in screen space and rounded to
      float32 as the fast path does; equal keys go to the lower triangle index.
    """
    H, W = int(image_size[0]), int(image_size[1])
    ox, oy = W // 2, H // 2
    sv = screen_vertices.detach().to(torch.float64).cpu()
    tris = triangles.to(dtype=torch.long).cpu()
    out = torch.full((sv.shape[0], H, W), -1, dtype=torch.long)
    best = torch.full((sv.shape[0], H, W), -1.0, dtype=torch.float64)
    for b in range(sv.shape[0]):
        for f, corners in enumerate(tris.tolist()):
            (u, v, z) = sv[b, corners].T.tolist()
            u = [round((x - ox) * SUBPIXEL) for x in u]
            v = [round((y - oy) * SUBPIXEL) for y in v]
            cross = (u[1] - u[0]) * (v[2] - v[0]) - (u[2] - u[0]) * (v[1] - v[0])
            if min(z) <= near or cross == 0 or not math.isfinite(cross) or (cull_backfaces and cross > 0):
                continue
            if cross < 0:  # orient clockwise as displayed
                u[1], u[2], v[1], v[2], z[1], z[2] = u[2], u[1], v[2], v[1], z[2], z[1]
            for i in range(H):
                for j in range(W):
                    x, y = (j - ox) * SUBPIXEL, (i - oy) * SUBPIXEL
                    inside, invz = True, 0.0
                    for k in range(3):
                        pu, pv, qu, qv = u[(k + 1) % 3], v[(k + 1) % 3], u[(k + 2) % 3], v[(k + 2) % 3]
                        e = (qu - pu) * (y - pv) - (qv - pv) * (x - pu)
                        top_left = (pv - qv > 0) or (pv == qv and qu - pu > 0)
                        inside &= e > 0 or (e == 0 and top_left)
                        invz += e / (abs(cross) * z[k])
                    if not inside:
                        continue
                    key = float(torch.tensor(max(invz, 0.0), dtype=torch.float32))
                    if key > best[b, i, j]:
                        best[b, i, j], out[b, i, j] = key, f
    return out


def _merge_small_buckets(counts: list[int], class_list: list[int], min_share: float = 0.02):
    """Remap bucket ids so that buckets with few candidates join a larger one.

    Bucket id ``iy * ncls + ix`` has size (class_list[iy], class_list[ix]). Buckets
    holding less than ``min_share`` of all candidate pixels move to the smallest large
    bucket that contains them; the remaining small ones are merged into one bucket of
    their maximal size when that at most triples their work. Returns a list mapping old
    to new ids, or None when nothing changes.
    """
    ncls = len(class_list)

    def area(cid):
        return class_list[cid // ncls] * class_list[cid % ncls]

    work = {cid: cnt * area(cid) for cid, cnt in enumerate(counts) if cnt}
    total = sum(work.values())
    big = [cid for cid, w in work.items() if w >= min_share * total]
    remap = list(range(len(counts)))
    leftovers = []
    for cid in work:
        if cid in big:
            continue
        iy, ix = divmod(cid, ncls)
        targets = [t for t in big if t // ncls >= iy and t % ncls >= ix]
        if targets:
            remap[cid] = min(targets, key=area)
        else:
            leftovers.append(cid)
    if len(leftovers) > 1:
        union = max(c // ncls for c in leftovers) * ncls + max(c % ncls for c in leftovers)
        if sum(counts[c] for c in leftovers) * area(union) <= 3 * sum(work[c] for c in leftovers):
            for c in leftovers:
                remap[c] = union
    return None if remap == list(range(len(counts))) else remap


def _raster_bucket(zbuf, edges, zplane, tl3, irows, ar_x, ar_y, ox, oy, W):
    """Test the (Ky, Kx) candidate pixels of a bucket of M triangles, update zbuf.

    edges: (9, M) float64 rows C0-2, A0-2, B0-2 of the three (sign-adjusted) edge
    functions on the snapped grid; zplane: (3, M) float32 1/z plane (value at the box
    corner, per-pixel x and y slopes); tl3: (3, M) bool top-left flags; irows: (M,)
    rows xmin, ymin, nx, ny, key base, pixel base; ar_x (Kx, 1), ar_y (Ky, 1) offsets.
    Candidates are laid out (Ky, Kx, M) so that the long triangle axis is innermost
    (vectorised broadcasting).
    """
    xm, ym, nxs, nys, keybase, pixbase = irows
    dx = torch.minimum(ar_x, nxs - 1)  # (Kx, M) offsets clamped into the box
    dy = torch.minimum(ar_y, nys - 1)  # (Ky, M)
    xs, ys = xm + dx, ym + dy
    # Pixel centres on the snapped grid. Padding candidates (beyond the box) get NaN:
    # every edge test on them fails, and every triangle has an edge that must pass.
    xf = torch.where(ar_x < nxs, ((xs - ox) * SUBPIXEL).to(torch.float64), float("nan"))
    yf = torch.where(ar_y < nys, ((ys - oy) * SUBPIXEL).to(torch.float64), float("nan"))
    c, a, b = edges[0:3, None, :], edges[3:6, None, :], edges[6:9, None, :]
    # (C + B y) + A x for the three edges at once: exact (integer-valued float64).
    e = (c + b * yf)[:, :, None, :] + (a * xf)[:, None, :, :]  # (3, Ky, Kx, M)
    inside = ((e >= 0) == tl3[:, None, None, :]).all(0)  # (Ky, Kx, M)
    del e
    invz = (zplane[0] + zplane[2] * dy.to(torch.float32))[:, None, :] + (
        zplane[1] * dx.to(torch.float32)
    )[None, :, :]
    bits = invz.clamp_min_(0.0).view(torch.int32).to(torch.long)
    key = torch.where(inside, keybase - (bits << 32), _KEY_EMPTY)
    pix = (pixbase + ys * W)[:, None, :] + xs[None, :, :]  # (Ky, Kx, M)
    zbuf.scatter_reduce_(0, pix.reshape(-1), key.reshape(-1), reduce="amin", include_self=True)


def _gather_rows(table: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """1-D gather ``table[index]`` (1-D index_select is the fast path on CPU)."""
    return table.index_select(0, index)


class _PerspectiveBarycentrics(torch.autograd.Function):
    """Perspective-correct barycentrics and depth of pixels inside given triangles.

    The backward pass is written by hand (first order only) with 1-D gathers and
    scatters on structure-of-arrays rows, which is several times faster on CPU than
    autograd through per-corner slicing.

    forward(screen_vertices (B, N, 3), vid (3, P) int64 flat vertex index into B*N per
    corner, px (P,), py (P,) pixel centres) -> barycentric (3, P), depth (P,)
    """

    @staticmethod
    def forward(ctx, screen_vertices, vid, px, py):
        B, N, _ = screen_vertices.shape
        flat = vid.reshape(-1)
        P = vid.shape[1]
        coords = screen_vertices.reshape(B * N, 3).t()  # (3, B*N) view
        # Corner coordinates relative to the pixel centre (better conditioned), (3, P).
        u = _gather_rows(coords[0].contiguous(), flat).view(3, P) - px
        v = _gather_rows(coords[1].contiguous(), flat).view(3, P) - py
        z = _gather_rows(coords[2].contiguous(), flat).view(3, P)
        # e_k = c_{k+1} x c_{k+2}: screen-space barycentrics up to a common factor.
        e = torch.stack([u[1] * v[2] - v[1] * u[2], u[2] * v[0] - v[2] * u[0], u[0] * v[1] - v[0] * u[1]])
        w = e / z
        s = w.sum(0)
        bary = w / s
        depth = e.sum(0) / s  # 1 / sum_k(l_k / z_k)
        ctx.save_for_backward(vid, u, v, z, w, bary, s, depth)
        ctx.shape = (B, N)
        return bary, depth

    @staticmethod
    def backward(ctx, g_bary, g_depth):
        vid, u, v, z, w, bary, s, depth = ctx.saved_tensors
        B, N = ctx.shape
        # bary = w / s, depth = sum(e) / s with s = sum(w), w = e / z.
        g_w = torch.zeros_like(w) if g_bary is None else g_bary - (g_bary * bary).sum(0)
        if g_depth is not None:
            g_w = g_w - g_depth * depth
        g_w = g_w / s
        g_e = g_w / z
        if g_depth is not None:
            g_e = g_e + g_depth / s
        g_z = -g_w * w / z
        # e_k = u_{k+1} v_{k+2} - v_{k+1} u_{k+2}
        g_u = torch.stack([g_e[2] * v[1] - g_e[1] * v[2], g_e[0] * v[2] - g_e[2] * v[0], g_e[1] * v[0] - g_e[0] * v[1]])
        g_v = torch.stack([g_e[1] * u[2] - g_e[2] * u[1], g_e[2] * u[0] - g_e[0] * u[2], g_e[0] * u[1] - g_e[1] * u[0]])
        flat = vid.reshape(-1)
        out = torch.zeros(3, B * N, dtype=w.dtype, device=w.device)
        for c, g in enumerate((g_u, g_v, g_z)):
            out[c].index_add_(0, flat, g.reshape(-1))
        return out.t().reshape(B, N, 3), None, None, None


class _BarycentricInterpolation(torch.autograd.Function):
    """out (C, P) = sum_k bary[k] * attributes[vid[k]], hand-written backward.

    forward(attributes (B, N, C), vid (3, P) flat indices into B*N, bary (3, P)).
    Works channel by channel on (P,) rows (bounded temporaries, 1-D gathers).
    """

    @staticmethod
    def forward(ctx, attributes, vid, bary):
        B, N, C = attributes.shape
        P = vid.shape[1]
        cols = attributes.reshape(B * N, C).t()  # (C, B*N) view
        bary = bary.to(attributes.dtype)
        out = torch.empty(C, P, dtype=attributes.dtype, device=attributes.device)
        for c in range(C):
            col = cols[c].contiguous()
            torch.mul(_gather_rows(col, vid[0]), bary[0], out=out[c])
            out[c].addcmul_(_gather_rows(col, vid[1]), bary[1])
            out[c].addcmul_(_gather_rows(col, vid[2]), bary[2])
        ctx.save_for_backward(attributes, vid, bary)
        return out

    @staticmethod
    def backward(ctx, g_out):
        attributes, vid, bary = ctx.saved_tensors
        B, N, C = attributes.shape
        g_out = g_out.contiguous()
        need_attr, need_bary = ctx.needs_input_grad[0], ctx.needs_input_grad[2]
        g_attr = g_bary = None
        cols = attributes.reshape(B * N, C).t()
        if need_attr:
            acc = torch.zeros(C, B * N, dtype=g_out.dtype, device=g_out.device)
            flat = vid.reshape(-1)
        if need_bary:
            g_bary = torch.zeros_like(bary)
        for c in range(C):
            gc = g_out[c]
            if need_attr:
                acc[c].index_add_(0, flat, (bary * gc).reshape(-1))
            if need_bary:
                col = cols[c].contiguous()
                for k in range(3):
                    g_bary[k].addcmul_(_gather_rows(col, vid[k]), gc)
        if need_attr:
            g_attr = acc.t().reshape(B, N, C)
        return g_attr, None, g_bary


def _corner_index(triangles: torch.Tensor, face: torch.Tensor, batch: torch.Tensor, n: int) -> torch.Tensor:
    """(3, P) flat indices into B*n of the corners of triangle ``face`` of item ``batch``."""
    offset = batch * n
    out = torch.empty(3, face.numel(), dtype=torch.long, device=face.device)
    for k in range(3):
        torch.add(triangles[:, k].contiguous().index_select(0, face), offset, out=out[k])
    return out


class _ScatterToPixels(torch.autograd.Function):
    """out = base (or 0) with out[pix[p], c] = values[c, p]; 1-D index ops per channel.

    forward(values (C, P), pix (P,), num_pixels, base (num_pixels, C) or None)
    -> (num_pixels, C).
    """

    @staticmethod
    def forward(ctx, values, pix, num_pixels, base):
        C = values.shape[0]
        if base is None:
            out = torch.zeros(num_pixels * C, dtype=values.dtype, device=values.device)
        else:
            out = base.reshape(-1).to(values.dtype).clone()
        flat_idx = [pix * C + c for c in range(C)]
        for c in range(C):
            out.index_copy_(0, flat_idx[c], values[c])
        ctx.save_for_backward(*flat_idx)
        ctx.has_base = base is not None
        ctx.base_meta = None if base is None else (base.shape, base.dtype)
        return out.view(num_pixels, C)

    @staticmethod
    def backward(ctx, g_out):
        flat_idx = ctx.saved_tensors
        g = g_out.reshape(-1)
        g_values = g_base = None
        if ctx.needs_input_grad[0]:
            g_values = torch.stack([g.index_select(0, idx) for idx in flat_idx])
        if ctx.has_base and ctx.needs_input_grad[3]:
            g_base = g.clone()
            for idx in flat_idx:
                g_base.index_fill_(0, idx, 0.0)
            g_base = g_base.view(ctx.base_meta[0]).to(ctx.base_meta[1])
        return g_values, None, None, g_base


def scatter_to_pixels(
    pix: torch.Tensor, values: torch.Tensor, num_pixels: int, base: Optional[torch.Tensor] = None
) -> torch.Tensor:
    """Write per-covered-pixel values into a channels-last pixel buffer (differentiable).

    Args:
        pix: (P,) int64 flat pixel indices (distinct).
        values: (C, P) channel-major values.
        num_pixels: total pixel count B*H*W.
        base: optional values for the other pixels, anything reshapeable to
            (num_pixels, C) (not modified); zeros when None.

    Returns:
        (num_pixels, C), differentiable w.r.t. ``values`` and ``base``.
    """
    return _ScatterToPixels.apply(values, pix, num_pixels, base)


def fragments_from_triangle_ids(
    screen_vertices: torch.Tensor, triangles: torch.Tensor, triangle_id: torch.Tensor
) -> Fragments:
    """Differentiable barycentrics and depth for given per-pixel triangle ids.

    Args:
        screen_vertices: (B, N, 3) ``(u, v, z)``, may require grad.
        triangles: (F, 3) integer vertex indices.
        triangle_id: (B, H, W) int64, -1 on background.

    Returns:
        :class:`Fragments`; barycentric (B, H, W, 3) and depth (B, H, W) are
        perspective-correct and differentiable w.r.t. ``screen_vertices``.
    """
    B, H, W = triangle_id.shape
    N = screen_vertices.shape[1]
    dtype, device = screen_vertices.dtype, screen_vertices.device
    tris = triangles.to(device=device, dtype=torch.long)
    tid = triangle_id.reshape(-1)
    mask = tid >= 0
    pix = mask.nonzero().squeeze(1)  # (P,)
    face = tid.index_select(0, pix)
    hw = H * W
    b = pix // hw
    rem = pix - b * hw
    py = rem // W
    px = rem - py * W
    vid = _corner_index(tris, face, b, N)  # (3, P)
    bary, depth = _PerspectiveBarycentrics.apply(screen_vertices, vid, px.to(dtype), py.to(dtype))
    bary_full = scatter_to_pixels(pix, bary, B * hw)
    depth_full = torch.zeros(B * hw, dtype=dtype, device=device)
    depth_full.index_copy_(0, pix, depth)
    frags = Fragments(
        triangle_id=triangle_id,
        barycentric=bary_full.view(B, H, W, 3),
        depth=depth_full.view(B, H, W),
        mask=mask.view(B, H, W),
    )
    frags._compact = (frags.triangle_id, frags.barycentric, frags.mask, pix, bary)
    return frags


def rasterize(
    screen_vertices: torch.Tensor,
    triangles: torch.Tensor,
    image_size: Sequence[int],
    cull_backfaces: bool = True,
    near: float = DEFAULT_NEAR,
) -> Fragments:
    """Rasterize a batch of meshes that share one triangle list.

    Args:
        screen_vertices: (B, N, 3) ``(u, v, z)`` as returned by
            :func:`facerecon.render.camera.project_points`.
        triangles: (F, 3) int64/int32 vertex indices.
        image_size: (H, W).
        cull_backfaces: drop triangles that are clockwise as displayed (default).
        near: triangles with any vertex at ``z <= near`` are dropped.

    Returns:
        :class:`Fragments` with (B, H, W) triangle ids, (B, H, W, 3) perspective-correct
        barycentrics, (B, H, W) depth and mask. Barycentrics and depth are
        differentiable w.r.t. ``screen_vertices``; coverage is not.
    """
    if screen_vertices.dim() != 3 or screen_vertices.shape[-1] != 3:
        raise ValueError(f"screen_vertices must be (B, N, 3), got {tuple(screen_vertices.shape)}")
    if triangles.dim() != 2 or triangles.shape[-1] != 3:
        raise ValueError(f"triangles must be (F, 3), got {tuple(triangles.shape)}")
    tid = rasterize_triangle_ids(screen_vertices, triangles, image_size, cull_backfaces, near)
    return fragments_from_triangle_ids(screen_vertices, triangles, tid)


def interpolate_compact(
    attributes: torch.Tensor, triangles: torch.Tensor, fragments: Fragments
) -> tuple[torch.Tensor, torch.Tensor]:
    """Like :func:`interpolate` but only for covered pixels, channel-major.

    Returns:
        pix (P,) int64 flat indices into B*H*W of the covered pixels and values (C, P).
    """
    B, H, W = fragments.triangle_id.shape
    if attributes.dim() != 3 or attributes.shape[0] != B:
        raise ValueError(f"attributes must be (B={B}, N, C), got {tuple(attributes.shape)}")
    N = attributes.shape[1]
    tris = triangles.to(device=attributes.device, dtype=torch.long)
    pix, bary = fragments._compact_view()  # (P,), (3, P)
    face = fragments.triangle_id.reshape(-1).index_select(0, pix)
    vid = _corner_index(tris, face, pix // (H * W), N)
    return pix, _BarycentricInterpolation.apply(attributes, vid, bary)


def interpolate(
    attributes: torch.Tensor, triangles: torch.Tensor, fragments: Fragments
) -> torch.Tensor:
    """Interpolate per-vertex attributes with the fragments' barycentrics.

    Args:
        attributes: (B, N, C) per-vertex values (N may differ from the rasterized
            mesh's vertex count when ``triangles`` indexes another array, e.g. UVs).
        triangles: (F, 3) integer indices into ``attributes`` (same F as rasterized).
        fragments: from :func:`rasterize`.

    Returns:
        (B, H, W, C), zeros on background. Differentiable w.r.t. ``attributes`` and,
        through ``fragments.barycentric``, the vertex positions.
    """
    B, H, W = fragments.triangle_id.shape
    pix, vals = interpolate_compact(attributes, triangles, fragments)
    return scatter_to_pixels(pix, vals, B * H * W).view(B, H, W, -1)
