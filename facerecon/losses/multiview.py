"""Multi-view geometry consistency losses of paper 001 (Shang et al. 2020, MGCNet), sec. 3.4-3.8.

Views of one face are rendered with their own predicted geometry and pose; a *target* view t
and a *source* view s are related by the relative pose of the two predicted head poses. With
the camera convention of :mod:`facerecon.fitting.camera` (``v_cam = R X + t`` for canonical
model points ``X``), a target camera-frame point maps to the source camera frame as
``v_s = R_rel v_t + t_rel`` with ``R_rel = R_s R_t^T`` and ``t_rel = t_s - R_rel t_t``
(sec. 3.2 gives the corresponding formula for its own pose convention).

* covisible map (sec. 3.4): vertices visible in both views are *covisible points*, triangles
  with a covisible corner are *covisible triangles*, and a target pixel is covisible when the
  triangle it shows is covisible;
* view synthesis (eq. 2): ``p_s ~ K_s [R_rel | t_rel] D_t(p_t) K_t^-1 p_t``, then bilinear
  sampling of the source image / depth map at ``p_s``;
* pixel consistency (eq. 3), dense depth consistency with scale rectification (eq. 4) and
  the landmark epipolar loss (eq. 5); target pixels whose warped sample leaves the source
  view's rendered face (silhouettes) are left out of eqs. 3 and 4 like non-covisible ones;
* combined (eq. 6): ``L = w_2D L_2D + w_mul (w_pixel L_pixel + w_depth L_depth + w_epi L_epi)``
  with the paper's weights in :data:`PAPER001_WEIGHTS`.

All functions are pure and vectorised over a batch of P view pairs (no loops over pixels,
vertices or triangles); they run unchanged on CPU and CUDA and should be called in float32
(autocast off). Units: pixels for image coordinates, the camera frame's unit (mm here) for
depth. Every loss returns one value per pair, shape (P,).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from facerecon.render.camera import project_points, scale_intrinsics
from facerecon.render.rasterize import Fragments, rasterize

#: Paper 001 sec. 3.8 (eq. 6): w_mul = 1.0 (w_2D = 1.0 is the hybrid loss as it is),
#: w_pixel = 0.15, w_depth = 1e-4, w_epi = 1e-3.
PAPER001_WEIGHTS = {"multiview": 1.0, "pixel": 0.15, "depth": 1e-4, "epipolar": 1e-3}

#: Views whose relative translation is much shorter than this (camera-frame units, mm) have
#: no defined epipolar geometry; see :func:`essential_matrix`.
MIN_BASELINE = 1.0


def view_pairs(groups: int, views: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """All ordered (target, source) pairs inside groups of ``views`` consecutive batch items.

    Returns:
        target, source: (P,) int64 batch indices, P = groups * views * (views - 1); every view
        of a group is the target once for each other view of its group.
    """
    eye = torch.eye(views, dtype=torch.bool, device=device)
    t_local, s_local = torch.nonzero(~eye, as_tuple=True)  # (V (V-1),)
    base = torch.arange(groups, device=device)[:, None] * views
    return (base + t_local).reshape(-1), (base + s_local).reshape(-1)


def relative_pose(rotation_t: torch.Tensor, translation_t: torch.Tensor, rotation_s: torch.Tensor,
                  translation_s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Relative pose target -> source from two head poses (sec. 3.2).

    Args:
        rotation_t, rotation_s: (P, 3, 3) model-to-camera rotations of the two views.
        translation_t, translation_s: (P, 3) translations.

    Returns:
        R_rel (P, 3, 3) and t_rel (P, 3) with ``v_s = R_rel v_t + t_rel``.
    """
    rotation = rotation_s @ rotation_t.transpose(1, 2)
    translation = translation_s - (rotation @ translation_t[..., None])[..., 0]
    return rotation, translation


def resize_images(images: torch.Tensor, size: int) -> torch.Tensor:
    """(B, S, S, C) -> (B, size, size, C), area averaging (identity when already that size)."""
    if images.shape[1] == size and images.shape[2] == size:
        return images
    return F.interpolate(images.permute(0, 3, 1, 2), size=(size, size), mode="area").permute(0, 2, 3, 1)


def vertex_visibility(triangle_id: torch.Tensor, triangles: torch.Tensor, n_vertices: int) -> torch.Tensor:
    """(B, N) bool: the vertex is a corner of a triangle that won at least one pixel.

    Args:
        triangle_id: (B, H, W) int64 from the rasterizer, -1 on background.
        triangles: (F, 3) vertex indices of the rasterized triangle list.
    """
    b = triangle_id.shape[0]
    f = triangles.shape[0]
    tid = triangle_id.reshape(b, -1)
    shown = torch.zeros(b, f + 1, dtype=torch.bool, device=tid.device)
    shown.scatter_(1, torch.where(tid < 0, f, tid), True)  # background -> spare column f
    corners = triangles.to(tid.device).t().reshape(1, -1).expand(b, -1)  # (B, 3F)
    flags = shown[:, :f].to(torch.uint8).repeat(1, 3)
    visible = torch.zeros(b, n_vertices, dtype=torch.uint8, device=tid.device)
    visible.scatter_reduce_(1, corners, flags, reduce="amax")
    return visible.bool()


def covisible_map(triangle_id_t: torch.Tensor, triangles: torch.Tensor, visible_t: torch.Tensor,
                  visible_s: torch.Tensor) -> torch.Tensor:
    """Covisible map C_s of the target view (sec. 3.4, Fig. 2).

    Args:
        triangle_id_t: (P, H, W) target triangle ids (-1 on background).
        triangles: (F, 3) vertex indices (the rasterized list).
        visible_t, visible_s: (P, N) bool vertex visibility in the target and source views.

    Returns:
        (P, H, W) bool: the pixel shows a triangle with at least one vertex visible in both views.
    """
    covisible_points = visible_t & visible_s
    tris = triangles.to(triangle_id_t.device)
    p, f = triangle_id_t.shape[0], tris.shape[0]
    covisible_triangles = covisible_points[:, tris].any(dim=-1)  # (P, F)
    background = torch.zeros(p, 1, dtype=torch.bool, device=triangle_id_t.device)
    covisible_triangles = torch.cat([covisible_triangles, background], dim=1)  # id -1 -> column F
    tid = torch.where(triangle_id_t < 0, f, triangle_id_t).reshape(p, -1)
    return covisible_triangles.gather(1, tid).reshape(triangle_id_t.shape)


def pixel_rays(height: int, width: int, intrinsics: torch.Tensor) -> torch.Tensor:
    """(B, H, W, 3) ``K^-1 [u, v, 1]`` for every pixel centre (depth-1 points)."""
    dtype, device = intrinsics.dtype, intrinsics.device
    v, u = torch.meshgrid(torch.arange(height, dtype=dtype, device=device),
                          torch.arange(width, dtype=dtype, device=device), indexing="ij")
    pixels = torch.stack([u, v, torch.ones_like(u)], dim=-1).reshape(1, -1, 3)
    rays = pixels @ torch.linalg.inv(intrinsics).transpose(1, 2)
    return rays.reshape(-1, height, width, 3)


def warp_to_source(depth_t: torch.Tensor, intrinsics_t: torch.Tensor, rotation: torch.Tensor,
                   translation: torch.Tensor, intrinsics_s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Eq. 2: where each target pixel's surface point lands in the source image.

    Args:
        depth_t: (P, H, W) target depth map D_t (0 on background).
        intrinsics_t, intrinsics_s: (P, 3, 3) of the target and source images (same size).
        rotation, translation: (P, 3, 3), (P, 3) relative pose target -> source.

    Returns:
        coords (P, H, W, 2) source pixel coordinates (u, v) and z_s (P, H, W) source depth of
        the point.
    """
    p, h, w = depth_t.shape
    points = pixel_rays(h, w, intrinsics_t) * depth_t[..., None]  # (P, H, W, 3) target frame
    moved = points.reshape(p, -1, 3) @ rotation.transpose(1, 2) + translation[:, None, :]
    z = moved[..., 2]
    # points at or behind the source camera get a harmless divisor (finite values and
    # gradients); callers drop them with z_s > 0
    z_safe = torch.where(z > 1e-6, z, torch.ones_like(z))
    homogeneous = torch.cat([moved[..., :2] / z_safe[..., None], torch.ones_like(z[..., None])], dim=-1)
    uv = (homogeneous @ intrinsics_s.transpose(1, 2))[..., :2]
    return uv.reshape(p, h, w, 2), z.reshape(p, h, w)


def inside_image(coords: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """(P, H, W) bool: source coordinates within the pixel-centre grid."""
    u, v = coords[..., 0], coords[..., 1]
    return (u >= 0) & (u <= width - 1) & (v >= 0) & (v <= height - 1)


def bilinear_sample(values: torch.Tensor, coords: torch.Tensor) -> torch.Tensor:
    """Bilinear sampling of (P, H, W, C) ``values`` at (P, H', W', 2) pixel ``coords``.

    Differentiable w.r.t. both; outside the image the border value is repeated.
    """
    h, w = values.shape[1], values.shape[2]
    scale = torch.tensor([2.0 / max(w - 1, 1), 2.0 / max(h - 1, 1)], dtype=coords.dtype, device=coords.device)
    grid = coords * scale - 1.0
    sampled = F.grid_sample(values.permute(0, 3, 1, 2), grid, mode="bilinear", padding_mode="border",
                            align_corners=True)
    return sampled.permute(0, 2, 3, 1)


def pixel_consistency(image_t: torch.Tensor, synthesized: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Eq. 3: mean over covisible pixels of |I~_t^s - I_t| (L1 over the colour channels).

    Args:
        image_t: (P, H, W, C) target input image I_t.
        synthesized: (P, H, W, C) source image sampled at the warped coordinates, I~_t^s.
        weight: (P, H, W) covisible map C_s (bool or float).

    Returns:
        (P,) loss; 0 for a pair without covisible pixels.
    """
    weight = weight.to(image_t.dtype)
    residual = (synthesized - image_t).abs().sum(dim=-1)
    return (weight * residual).flatten(1).sum(1) / weight.flatten(1).sum(1).clamp_min(1.0)


def source_coverage(mask_s: torch.Tensor, coords: torch.Tensor) -> torch.Tensor:
    """(P, H, W) bool: the bilinear footprint of each warped sample lies inside the image and
    entirely on the source view's rendered surface ``mask_s`` (P, H, W).

    Samples that straddle the source silhouette mix face and background; they are left out
    of the pixel and depth terms together with the non-covisible pixels.
    """
    h, w = mask_s.shape[1:]
    coverage = bilinear_sample(mask_s.to(coords.dtype)[..., None], coords.detach())[..., 0]
    return (coverage > 1.0 - 1e-4) & inside_image(coords, h, w)


def synthesize_depth(depth_s: torch.Tensor, coords: torch.Tensor, intrinsics_s: torch.Tensor,
                     rotation: torch.Tensor, translation: torch.Tensor) -> torch.Tensor:
    """Target depth map D~_t^s synthesized from the source depth map (sec. 3.6), (P, H, W).

    The source depth is sampled bilinearly at the warped coordinates, lifted to a source
    camera-frame point and moved back to the target frame; its z is the synthesized depth.
    Only meaningful where :func:`source_coverage` holds.

    Args:
        depth_s: (P, H, W) source depth map.
        coords: (P, H, W, 2) from :func:`warp_to_source`.
        intrinsics_s: (P, 3, 3); rotation, translation: relative pose target -> source.
    """
    p, h, w = depth_s.shape
    depth = bilinear_sample(depth_s[..., None], coords)[..., 0]
    ones = torch.ones_like(coords[..., :1])
    rays = torch.cat([coords, ones], dim=-1).reshape(p, -1, 3) @ torch.linalg.inv(intrinsics_s).transpose(1, 2)
    points_s = rays * depth.reshape(p, -1, 1)
    # back to the target frame: v_t = R^T (v_s - t); only z is needed
    points_t = (points_s - translation[:, None, :]) @ rotation
    return points_t[..., 2].reshape(p, h, w)


def depth_consistency(depth_t: torch.Tensor, synthesized: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Eq. 4: scale-rectified dense depth consistency.

    ``S = sum C D_t / sum C D~`` and ``L = (1/|C|) sum C |S D~ - D_t|``; the ratio S removes a
    global scale between the synthesized and the target depth (crops make depth defined up to
    scale), so ``L(D_t, c D~) = L(D_t, D~)`` for any c > 0.

    Args:
        depth_t: (P, H, W) target depth map D_t.
        synthesized: (P, H, W) synthesized target depth D~_t^s.
        weight: (P, H, W) covisible (and valid) pixels C_s.

    Returns:
        (P,) loss in depth units; 0 for a pair without covisible pixels.
    """
    weight = weight.to(depth_t.dtype)
    synthesized = synthesized * weight  # masked-out samples may be garbage: keep them out of S
    count = weight.flatten(1).sum(1)
    scale = (weight * depth_t).flatten(1).sum(1) / synthesized.flatten(1).sum(1).clamp_min(1e-6)
    residual = (scale[:, None, None] * synthesized - depth_t).abs() * weight
    return residual.flatten(1).sum(1) / count.clamp_min(1.0)


def skew(vectors: torch.Tensor) -> torch.Tensor:
    """(P, 3) -> (P, 3, 3) cross-product matrices ``[t]_x``."""
    x, y, z = vectors.unbind(-1)
    zero = torch.zeros_like(x)
    return torch.stack([torch.stack([zero, -z, y], -1), torch.stack([z, zero, -x], -1),
                        torch.stack([-y, x, zero], -1)], dim=-2)


def essential_matrix(rotation: torch.Tensor, translation: torch.Tensor, min_baseline: float = MIN_BASELINE
                     ) -> torch.Tensor:
    """``E = [t]_x R`` (sec. 3.7) for the relative pose target -> source, (P, 3, 3).

    The epipolar distance does not depend on the length of t, so t is normalised; a soft
    normalisation ``t / sqrt(|t|^2 + min_baseline^2)`` lets the loss fade out (with bounded
    gradients) for views whose camera centres (nearly) coincide, where the epipolar geometry
    is undefined (e.g. an untrained network predicting one pose for every view).
    """
    length = torch.sqrt((translation ** 2).sum(-1, keepdim=True) + min_baseline ** 2)
    return skew(translation / length) @ rotation


def fundamental_matrix(intrinsics_t: torch.Tensor, intrinsics_s: torch.Tensor, rotation: torch.Tensor,
                       translation: torch.Tensor, min_baseline: float = MIN_BASELINE) -> torch.Tensor:
    """``F = K_s^-T E K_t^-1`` (P, 3, 3): ``p_s^T F p_t = 0`` for corresponding pixels."""
    essential = essential_matrix(rotation, translation, min_baseline)
    return torch.linalg.inv(intrinsics_s).transpose(1, 2) @ essential @ torch.linalg.inv(intrinsics_t)


def epipolar_loss(points_t: torch.Tensor, points_s: torch.Tensor, fundamental: torch.Tensor,
                  weights: torch.Tensor | None = None, symmetric: bool = False) -> torch.Tensor:
    """Eq. 5: sum over landmark pairs of the distance of p' to the epipolar line of p.

    ``|p'^T F p| / sqrt((F p)_1^2 + (F p)_2^2)`` in pixels of the source image (F from
    :func:`fundamental_matrix`, so the distance is in pixels rather than normalised
    coordinates). ``symmetric=True`` adds the distance of p to the epipolar line of p' (the
    symmetric epipolar distance the paper cites) and halves the sum.

    Args:
        points_t, points_s: (P, L, 2) corresponding landmarks in pixels (target, source).
        fundamental: (P, 3, 3).
        weights: (L,) or (P, L) per-landmark weights; None means 1.

    Returns:
        (P,) loss in pixels (summed over landmarks, as eq. 5).
    """
    ones = torch.ones_like(points_t[..., :1])
    pt = torch.cat([points_t, ones], -1)  # (P, L, 3)
    ps = torch.cat([points_s, ones], -1)
    lines_s = pt @ fundamental.transpose(1, 2)  # F p_t, (P, L, 3)
    algebraic = (ps * lines_s).sum(-1)
    distance = algebraic.abs() / torch.sqrt((lines_s[..., :2] ** 2).sum(-1) + 1e-20)
    if symmetric:
        lines_t = ps @ fundamental  # F^T p_s
        distance = 0.5 * (distance + algebraic.abs() / torch.sqrt((lines_t[..., :2] ** 2).sum(-1) + 1e-20))
    if weights is not None:
        distance = distance * weights
    return distance.sum(-1)


def multiview_losses(vertices_cam: torch.Tensor, triangles: torch.Tensor, images: torch.Tensor,
                     landmarks: torch.Tensor, rotation: torch.Tensor, translation: torch.Tensor,
                     intrinsics: torch.Tensor, views: int, render_size: int,
                     landmark_weights: torch.Tensor | None = None, rasterizer=None,
                     fragments: Fragments | None = None) -> dict[str, torch.Tensor]:
    """All paper-001 terms for a batch made of groups of ``views`` consecutive views of one face.

    Args:
        vertices_cam: (B, N, 3) each view's predicted mesh in its camera frame.
        triangles: (F, 3) triangles to rasterize (e.g. the face region).
        images: (B, S, S, 3) input crops in [0, 1].
        landmarks: (B, L, 2) detected landmarks (crop pixels).
        rotation, translation: (B, 3, 3), (B, 3) predicted model-to-camera poses.
        intrinsics: (B, 3, 3) of the crops.
        views: views per group (B must be a multiple); render_size: side of the depth maps.
        landmark_weights: (L,) weights of the epipolar term; None means 1 (as the paper).
        rasterizer: ``(screen_vertices, triangles) -> Fragments`` at ``render_size``, e.g.
            ``MeshRenderer(...).rasterize`` to use its backend; None: the torch rasterizer.
        fragments: the rasterization of ``vertices_cam`` / ``triangles`` at ``render_size`` with
            ``intrinsics`` scaled to it (e.g. the photometric loss's ``RenderOutput.fragments``
            of the same step), reused instead of rasterizing again; None: rasterized here.

    Returns:
        dict of (P,) tensors over all ordered pairs (see :func:`view_pairs`): ``pixel`` (eq. 3),
        ``depth`` (eq. 4), ``epipolar`` (eq. 5) and ``covisible`` (fraction of target face
        pixels covisible; a diagnostic, not differentiable).
    """
    b, n = vertices_cam.shape[:2]
    if b % views:
        raise ValueError(f"batch of {b} is not made of groups of {views} views")
    size = images.shape[1]
    k_render = scale_intrinsics(intrinsics, render_size / size)
    if fragments is None:
        screen = project_points(vertices_cam, k_render)
        fragments = (rasterize(screen, triangles, (render_size, render_size)) if rasterizer is None
                     else rasterizer(screen, triangles))
    visible = vertex_visibility(fragments.triangle_id, triangles, n)
    t, s = view_pairs(b // views, views, vertices_cam.device)
    rel_r, rel_t = relative_pose(rotation[t], translation[t], rotation[s], translation[s])
    covisible = covisible_map(fragments.triangle_id[t], triangles, visible[t], visible[s])
    coords, z_s = warp_to_source(fragments.depth[t], k_render[t], rel_r, rel_t, k_render[s])
    usable = covisible & source_coverage(fragments.mask[s], coords) & (z_s > 1e-6)
    small = resize_images(images, render_size)
    pixel = pixel_consistency(small[t], bilinear_sample(small[s], coords), usable)
    depth_synth = synthesize_depth(fragments.depth[s], coords, k_render[s], rel_r, rel_t)
    depth = depth_consistency(fragments.depth[t], depth_synth, usable)
    fundamental = fundamental_matrix(intrinsics[t], intrinsics[s], rel_r, rel_t)
    epipolar = epipolar_loss(landmarks[t], landmarks[s], fundamental, landmark_weights)
    faces = fragments.mask[t].flatten(1).sum(1).clamp_min(1)
    fraction = (covisible.flatten(1).sum(1) / faces).to(pixel.dtype)
    return {"pixel": pixel, "depth": depth, "epipolar": epipolar, "covisible": fraction}


def combine(terms: dict[str, torch.Tensor], weights: dict[str, float]) -> torch.Tensor:
    """Eq. 6 multi-view part: ``w_mul (w_pixel L_pixel + w_depth L_depth + w_epi L_epi)``, a scalar
    (each term averaged over its pairs)."""
    return weights["multiview"] * (weights["pixel"] * terms["pixel"].mean() + weights["depth"] *
                                   terms["depth"].mean() + weights["epipolar"] * terms["epipolar"].mean())
