"""LAP (paper 003), optimisation route: a person's canonical depth and albedo from an album.

Paper 003 learns networks that aggregate a photo collection into one ID-consistent canonical
depth map and albedo image (Unsup3D's factors, sec. 3), reconstruct every photo from them with
its own viewpoint and light, and then personalise them per photo. Without trained networks we
solve the same unknowns by optimisation over the album:

1. **Aggregate** (sec. 4.1): one canonical depth map ``d`` and albedo image ``a`` on a frontal
   grid (:class:`CanonicalGrid`), shared by all photos, plus each photo's viewpoint (head
   rotation, translation) and SH light, minimising for every photo the relaxed consistency loss
   (eq. 5, :func:`relaxed_nll`) of its render and, with ``a`` and ``d`` mirrored (eq. 2, weak
   symmetry), of the flipped render, each with its own confidence map ``sigma`` / ``sigma'``
   (eq. 3's Laplacian likelihood). Eyes, brows and mouth count ``relaxed_weight`` (0.3, the
   paper's example value), the rest of the visible face 1.
2. **Personalise** (sec. 4.2): per photo, a depth and an albedo residual on top of the canonical
   face (the attribute the refining network would add), fitted to that photo alone with eq. 3.

What is model-free and what is not: the depth and albedo are free per grid point (any face
that is a height field over the frontal grid, no basis, no 3DMM prior in the loss). The 3DMM
(the album's ``joint`` aggregate) provides the starting point only: the initial depth (its
neutral identity, rasterised onto the grid), the grid's face mask, the canonical position of
the 51 inner landmarks used as a weak anchor (the networks of the paper learn the
correspondence instead), the initial viewpoints and lights. The regularisers the networks
give implicitly are explicit here: a thin-plate smoothness of the depth and a total-variation
of the albedo; the personal residuals are additionally kept sparse (L1).

Conventions: model frame (mm, +x to the face's left as seen by a viewer... i.e. image right in
a frontal view, +y up, +z out of the face), the fitting camera of
:mod:`facerecon.fitting.camera`; grid row ``i`` is ``y = y_top - i * step``, column ``j`` is
``x = -x_half + j * step`` (symmetric about ``x = 0``, so mirroring is ``flip(-1)``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import cv2
import numpy as np
import torch
import torch.nn.functional as F

from facerecon.fitting.camera import crop_intrinsics, model_to_camera
from facerecon.render.camera import project_points
from facerecon.render.rasterize import interpolate, rasterize
from facerecon.render.renderer import MeshRenderer
from facerecon.render.shading import sh_irradiance, vertex_normals

#: inner iBUG landmarks (no jaw line): the weak anchor of the viewpoints
INNER_LANDMARKS = list(range(17, 68))
#: canonical grid points whose surface normal is more than ~70 degrees from the front are dropped
MIN_FRONT_FACING = 0.34
#: iBUG landmark groups whose regions the relaxed consistency loss down-weights (paper 003 sec. 4.1)
RELAXED_GROUPS = (list(range(17, 22)), list(range(22, 27)), list(range(36, 42)), list(range(42, 48)),
                  list(range(48, 60)))


@dataclass(frozen=True)
class CanonicalGrid:
    """The frontal grid of the canonical depth and albedo: ``size`` x ``size`` points, ``step``
    mm apart, columns symmetric about ``x = 0``, row 0 at ``y = y_top``."""

    size: int = 128
    x_half: float = 98.0
    y_top: float = 104.0

    @property
    def step(self) -> float:
        return 2.0 * self.x_half / (self.size - 1)

    def xy(self, device=None, dtype=torch.float32) -> torch.Tensor:
        """(R, R, 2) model (x, y) of every grid point, mm."""
        r = torch.arange(self.size, device=device, dtype=dtype)
        x = -self.x_half + r * self.step
        y = self.y_top - r * self.step
        return torch.stack(torch.meshgrid(y, x, indexing="ij")[::-1], dim=-1)

    def uv(self) -> np.ndarray:
        """(R*R, 2) texture coordinates of the grid points (OBJ convention: v up)."""
        r = np.arange(self.size, dtype=np.float32) / (self.size - 1)
        u, v = np.meshgrid(r, 1.0 - r)
        return np.stack([u.ravel(), v.ravel()], axis=1)

    def to_dict(self) -> dict:
        return {"size": self.size, "x_half": self.x_half, "y_top": self.y_top, "step": self.step}


def grid_vertices(grid: CanonicalGrid, depth: torch.Tensor) -> torch.Tensor:
    """(B, R*R, 3) model-frame vertices of depth maps (B, R, R) (mm)."""
    xy = grid.xy(depth.device, depth.dtype).expand(depth.shape[0], -1, -1, -1)
    return torch.cat([xy, depth[..., None]], dim=-1).reshape(depth.shape[0], -1, 3)


def grid_triangles(valid: torch.Tensor) -> torch.Tensor:
    """(F, 3) int64 triangles over the cells whose four corners are ``valid`` (R, R) bool,
    counter-clockwise seen from the front (+z)."""
    R = valid.shape[0]
    idx = torch.arange(R * R, device=valid.device).view(R, R)
    a, b, c, d = idx[:-1, :-1], idx[:-1, 1:], idx[1:, :-1], idx[1:, 1:]
    cell = valid[:-1, :-1] & valid[:-1, 1:] & valid[1:, :-1] & valid[1:, 1:]
    first = torch.stack([a[cell], c[cell], d[cell]], dim=1)
    second = torch.stack([a[cell], d[cell], b[cell]], dim=1)
    return torch.cat([first, second])


def rasterise_heightfield(vertices: torch.Tensor, triangles: torch.Tensor, attributes: torch.Tensor,
                          grid: CanonicalGrid) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Front-most surface of a mesh sampled on the grid (orthographic view along -z).

    Args:
        vertices: (N, 3) model frame, mm; triangles: (F, 3); attributes: (N, C).

    Returns:
        depth (R, R) model z (mm, 0 where uncovered), covered (R, R) bool, attributes (R, R, C).
    """
    distance = 1.0e5  # a far pinhole is orthographic to ~0.1 px; z and attributes are interpolated
    R = grid.size
    cam = vertices[None] * torch.tensor([1.0, -1.0, -1.0], device=vertices.device) + \
        torch.tensor([0.0, 0.0, distance], device=vertices.device)
    focal = distance / grid.step
    k = torch.tensor([[focal, 0.0, grid.x_half / grid.step], [0.0, focal, grid.y_top / grid.step], [0.0, 0.0, 1.0]],
                     device=vertices.device, dtype=vertices.dtype)[None]
    frags = rasterize(project_points(cam, k), triangles, (R, R), cull_backfaces=True)
    values = interpolate(torch.cat([vertices[None, :, 2:], attributes[None]], dim=-1), triangles, frags)[0]
    return values[..., 0], frags.mask[0], values[..., 1:]


@dataclass
class LapSettings:
    """Unknowns, loss weights and step counts of the optimisation route (docs/aggregation.md)."""

    grid_size: int = 128
    render_size: int = 128  #: side of the crops the losses compare (the crops are resized)
    aggregate_steps: int = 120
    personal_steps: int = 50
    relaxed_weight: float = 0.3  #: M_re of eyes, brows and mouth (paper 003 sec. 4.1)
    flip_weight: float = 1.0  #: weight of the flipped render's loss (eq. 2)
    landmark_weight: float = 2e-3  #: per squared pixel (at 128 px) of the inner landmarks
    smooth_weight: float = 0.2  #: thin-plate smoothness of the depth (per mm^2 of second difference)
    albedo_tv_weight: float = 0.02
    #: the album size the smoothness and total-variation weights are set for: the photo terms
    #: are averaged over the album, so with P photos the two priors weigh prior_photos / P times
    #: as much (the evidence of a sum over photos; fewer photos, smoother face). 0 = fixed weights
    prior_photos: float = 8.0
    personal_l1_weight: float = 0.05  #: sparsity of the personal residuals (per mm of depth, per unit of albedo)
    confidence_cells: int = 16  #: side of the (image-space) confidence maps, bilinearly upsampled
    min_sigma: float = 0.01
    lr_depth: float = 0.5  #: mm per step (Adam)
    lr_albedo: float = 0.01
    lr_pose: float = 2e-3
    lr_translation: float = 0.5
    lr_light: float = 0.01
    lr_sigma: float = 0.05

    def to_dict(self) -> dict:
        return dict(self.__dict__)


@dataclass
class LapPhotos:
    """One album's photos as the optimisation sees them (P photos, crop side S).

    crops: (P, S, S, 3) in [0, 1]; attention: (P, S, S) skin attention in [0, 1];
    landmarks68: (P, 68, 2) crop px; angles, translation: (P, 3) the 3DMM fit's pose;
    sh: (P, 27) its SH light.
    """

    crops: torch.Tensor
    attention: torch.Tensor
    landmarks68: torch.Tensor
    angles: torch.Tensor
    translation: torch.Tensor
    sh: torch.Tensor


@dataclass
class LapResult:
    """The canonical face, per-photo viewpoints and lights, and the personalised faces.

    depth: (R, R) model z, mm; albedo: (R, R, 3) in [0, 1]; valid: (R, R) bool (the face);
    angles, translation: (P, 3); sh: (P, 27); sigma, sigma_flip: (P, c, c) confidence maps;
    personal_depth: (P, R, R) and personal_albedo: (P, R, R, 3) the personalised faces
    (canonical plus residual); landmarks: (68, 2) canonical (x, y) of the iBUG points;
    losses: per-photo scores (P,) each.
    """

    grid: CanonicalGrid
    depth: torch.Tensor
    albedo: torch.Tensor
    valid: torch.Tensor
    angles: torch.Tensor
    translation: torch.Tensor
    sh: torch.Tensor
    sigma: torch.Tensor
    sigma_flip: torch.Tensor
    personal_depth: torch.Tensor
    personal_albedo: torch.Tensor
    landmarks: torch.Tensor
    losses: dict[str, np.ndarray] = field(default_factory=dict)

    @property
    def triangles(self) -> torch.Tensor:
        return grid_triangles(self.valid)


# --------------------------------------------------------------------------- losses


def relaxed_nll(rendered: torch.Tensor, photo: torch.Tensor, sigma: torch.Tensor, weight: torch.Tensor
                ) -> torch.Tensor:
    """Eqs. 3 / 5 of paper 003: the Laplacian negative log-likelihood of the photo under the
    render with per-pixel confidence, averaged with the attention ``weight``.

    Args:
        rendered, photo: (B, H, W, 3); sigma: (B, H, W) > 0; weight: (B, H, W) >= 0 (the
        attention mask M_re: 0 off the face, relaxed parts lower).

    Returns:
        (B,) ``sum(w * (ln(sqrt2 sigma) + sqrt2 |I^ - I| / sigma)) / sum(w)``, ``|.|`` the mean
        absolute difference over the channels.
    """
    residual = (rendered - photo).abs().mean(-1)
    nll = torch.log(math.sqrt(2.0) * sigma) + math.sqrt(2.0) * residual / sigma
    return (weight * nll).sum((1, 2)) / weight.sum((1, 2)).clamp_min(1e-6)


def thin_plate(depth: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """(B,) mean squared second differences (mm^2) of depth maps (B, R, R) inside ``valid`` (R, R)."""
    dx = depth[:, :, 2:] - 2 * depth[:, :, 1:-1] + depth[:, :, :-2]
    dy = depth[:, 2:] - 2 * depth[:, 1:-1] + depth[:, :-2]
    mx = (valid[:, 2:] & valid[:, 1:-1] & valid[:, :-2]).float()
    my = (valid[2:] & valid[1:-1] & valid[:-2]).float()
    return ((dx ** 2 * mx).sum((1, 2)) + (dy ** 2 * my).sum((1, 2))) / (mx.sum() + my.sum()).clamp_min(1)


def total_variation(image: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """(B,) mean absolute neighbour difference of images (B, R, R, C) inside ``valid`` (R, R)."""
    dx = (image[:, :, 1:] - image[:, :, :-1]).abs().sum(-1)
    dy = (image[:, 1:] - image[:, :-1]).abs().sum(-1)
    mx = (valid[:, 1:] & valid[:, :-1]).float()
    my = (valid[1:] & valid[:-1]).float()
    return ((dx * mx).sum((1, 2)) + (dy * my).sum((1, 2))) / (mx.sum() + my.sum()).clamp_min(1)


def sample_grid(maps: torch.Tensor, grid: CanonicalGrid, points: torch.Tensor) -> torch.Tensor:
    """Bilinear values of maps (B, R, R) at model (x, y) points (K, 2): (B, K)."""
    u = (points[:, 0] + grid.x_half) / (2 * grid.x_half) * 2 - 1
    v = (grid.y_top - points[:, 1]) / (2 * grid.x_half) * 2 - 1
    where = torch.stack([u, v], dim=-1)[None, None].expand(maps.shape[0], -1, -1, -1)
    return F.grid_sample(maps[:, None], where, align_corners=True)[:, 0, 0]


def polygon_masks(landmarks68: np.ndarray, size: int, groups=RELAXED_GROUPS, dilate: float = 0.04) -> np.ndarray:
    """(P, size, size) float: 1 inside the convex hull of each landmark group (crop px, scaled to
    ``size``), grown by ``dilate`` x the face size."""
    out = np.zeros((len(landmarks68), size, size), np.uint8)
    for p, points in enumerate(landmarks68):
        grow = max(1, int(round(dilate * np.ptp(points[:, 0]))))
        for group in groups:
            hull = cv2.convexHull(np.round(points[group]).astype(np.int32))
            cv2.fillConvexPoly(out[p], hull, 1)
        out[p] = cv2.dilate(out[p], np.ones((2 * grow + 1, 2 * grow + 1), np.uint8))
    return out.astype(np.float32)


# --------------------------------------------------------------------------- the optimiser


class LapOptimiser:
    """Aggregate-then-personalise over one album on ``device``; see the module docstring.

    Args:
        tensors: the face model's tensors (start only: neutral shape, albedo, regions).
        regions: the face model's named vertex regions (``photometric``, ``eyes``, ...).
        settings: :class:`LapSettings`.
    """

    def __init__(self, tensors, regions: dict, settings: LapSettings | None = None):
        self.tensors = tensors
        self.regions = regions
        self.settings = settings or LapSettings()
        self.grid = CanonicalGrid(self.settings.grid_size)
        self.renderer = MeshRenderer(image_size=(self.settings.render_size,) * 2, backend="torch")

    # ------------------------------------------------------------------ start from the 3DMM
    def initial_face(self, identity: torch.Tensor, albedo_coefficients: torch.Tensor
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Depth (R, R), model albedo (R, R, 3), valid (R, R) and canonical landmarks (68, 2) of
        the 3DMM's neutral face with ``identity`` (K_id,) and ``albedo_coefficients`` (K_alb,)."""
        t = self.tensors
        dev = t.mean_shape.device
        with torch.no_grad():
            neutral = t.shape(identity[None], torch.zeros(1, t.n_expression, device=dev))[0]
            colours = t.albedo(albedo_coefficients[None])[0].clamp(0, 1)
            region = torch.zeros(neutral.shape[0], dtype=torch.bool, device=dev)
            region[torch.as_tensor(self.regions["photometric"], device=dev)] = True
            tris = t.triangles.to(dev)
            face_tris = tris[region[tris].all(1)]
            depth, covered, attrs = rasterise_heightfield(neutral, face_tris, colours, self.grid)
            # the model's eye and mouth openings are holes of its face region: a canonical depth
            # map covers them (smoothly filled; the photos decide their albedo and shape)
            valid = fill_holes(covered)
            valid = _erode(valid & valid.flip(-1))  # symmetric, so that the mirrored face is defined
            depth = harmonic_fill(depth, covered & valid, valid)
            # a height field samples steep sides badly (saw-toothed silhouettes): drop the outer
            # parts that turn more than ~70 degrees away from the front
            steep = depth_normals(self.grid, depth)[..., 2] < MIN_FRONT_FACING
            valid = _erode(valid & fill_holes(valid & ~steep & ~steep.flip(-1)))  # the nose stays
            attrs = torch.stack([harmonic_fill(attrs[..., ch], covered & valid, valid) for ch in range(3)], -1)
            landmarks = t.landmark_points(neutral[None])[0][:, :2]
        return depth * valid, attrs * valid[..., None], valid, landmarks

    def _photo_tensors(self, photos: LapPhotos):
        s = self.settings.render_size
        size = photos.crops.shape[1]
        crops = F.interpolate(photos.crops.permute(0, 3, 1, 2), size=(s, s), mode="bilinear", antialias=True,
                              align_corners=False).permute(0, 2, 3, 1).clamp(0, 1)
        attention = F.interpolate(photos.attention[:, None], size=(s, s), mode="bilinear", antialias=True,
                                  align_corners=False)[:, 0]
        scale = s / size
        landmarks = (photos.landmarks68 + 0.5) * scale - 0.5
        parts = torch.as_tensor(polygon_masks(landmarks.cpu().numpy(), s), device=crops.device)
        face = torch.maximum(attention, parts)
        relax = 1.0 - (1.0 - self.settings.relaxed_weight) * parts
        return crops, face * relax, face, landmarks

    def _render(self, depth, albedo, tris, angles, translation, sh):
        verts = grid_vertices(self.grid, depth)
        cam = model_to_camera(verts, angles, translation)
        k = crop_intrinsics(self.settings.render_size, depth.shape[0], device=depth.device)
        return self.renderer.render(cam, tris, k, albedo.reshape(depth.shape[0], -1, 3), sh), cam, k

    def _landmark_loss(self, depth, landmarks_xy, angles, translation, target):
        z = sample_grid(depth, self.grid, landmarks_xy[INNER_LANDMARKS])
        points = torch.cat([landmarks_xy[INNER_LANDMARKS][None].expand(depth.shape[0], -1, -1), z[..., None]], -1)
        k = crop_intrinsics(self.settings.render_size, depth.shape[0], device=depth.device)
        uv = project_points(model_to_camera(points, angles, translation), k)[..., :2]
        scale = (self.settings.render_size / 128.0) ** 2
        return ((uv - target[:, INNER_LANDMARKS]) ** 2).sum(-1).mean(-1) / scale

    def _sigma(self, log_sigma):
        s = self.settings.render_size
        up = F.interpolate(log_sigma[:, None], size=(s, s), mode="bilinear", align_corners=False)[:, 0]
        return up.exp() + self.settings.min_sigma

    def photo_albedo(self, depth, valid, model_albedo, photos: LapPhotos, crops, tris) -> torch.Tensor:
        """(R, R, 3) albedo seen in the photos: each grid point's colour in every photo that sees it
        squarely, divided by the photo's shading, averaged (weights: facing cosine^2); the 3DMM
        albedo where no photo sees the point."""
        with torch.no_grad():
            P = crops.shape[0]
            out, cam, k = self._render(depth.expand(P, -1, -1), model_albedo.expand(P, -1, -1, -1), tris,
                                       photos.angles, photos.translation, photos.sh)
            normals = vertex_normals(cam, tris)
            uv = project_points(cam, k)[..., :2]
            s = self.settings.render_size
            where = (uv + 0.5) / s * 2 - 1
            seen = F.grid_sample(crops.permute(0, 3, 1, 2), where[:, None], align_corners=False)[:, :, 0]
            seen = seen.permute(0, 2, 1)  # (P, N, 3)
            irradiance = sh_irradiance(normals, photos.sh).clamp_min(0.05)
            facing = (-(normals * F.normalize(cam, dim=-1)).sum(-1)).clamp_min(0)
            weight = facing ** 2 * out.vertex_visibility.float() * valid.reshape(1, -1).float()
            albedo = (seen / irradiance * weight[..., None]).sum(0) / weight.sum(0).clamp_min(1e-6)[:, None]
            known = weight.sum(0) > 0.05
            flat = torch.where(known[:, None], albedo.clamp(0, 1), model_albedo.reshape(-1, 3))
            return flat.reshape(model_albedo.shape) * valid[..., None]

    # ------------------------------------------------------------------ the two steps
    def run(self, photos: LapPhotos, identity: torch.Tensor, albedo_coefficients: torch.Tensor,
            should_stop=None) -> LapResult:
        """Aggregate, then personalise; see the module docstring."""
        st = self.settings
        dev = self.tensors.mean_shape.device
        depth0, model_albedo, valid, landmarks_xy = self.initial_face(identity, albedo_coefficients)
        tris = grid_triangles(valid)
        crops, relaxed, face, target = self._photo_tensors(photos)
        albedo0 = self.photo_albedo(depth0, valid, model_albedo, photos, crops, tris)
        P = crops.shape[0]
        c = st.confidence_cells
        depth = depth0[None].clone().requires_grad_(True)
        albedo = albedo0[None].clone().requires_grad_(True)
        angles = photos.angles.clone().requires_grad_(True)
        translation = photos.translation.clone().requires_grad_(True)
        sh = photos.sh.clone().requires_grad_(True)
        log_sigma = torch.full((P, c, c), math.log(0.05), device=dev, requires_grad=True)
        log_sigma_flip = torch.full((P, c, c), math.log(0.05), device=dev, requires_grad=True)
        optimiser = torch.optim.Adam([
            {"params": [depth], "lr": st.lr_depth}, {"params": [albedo], "lr": st.lr_albedo},
            {"params": [angles], "lr": st.lr_pose}, {"params": [translation], "lr": st.lr_translation},
            {"params": [sh], "lr": st.lr_light}, {"params": [log_sigma, log_sigma_flip], "lr": st.lr_sigma}])
        vmask = valid.float()
        prior_scale = st.prior_photos / P if st.prior_photos > 0 else 1.0
        for _step in range(st.aggregate_steps):
            if should_stop is not None and should_stop():
                break
            optimiser.zero_grad(set_to_none=True)
            d = depth * vmask
            a = albedo.clamp(0, 1)
            both_d = torch.cat([d, d.flip(-1)]).expand(2, -1, -1).repeat_interleave(P, 0)
            both_a = torch.cat([a, a.flip(-2)]).repeat_interleave(P, 0)
            out, _cam, _k = self._render(both_d, both_a, tris, angles.repeat(2, 1), translation.repeat(2, 1),
                                         sh.repeat(2, 1))
            weight = relaxed.repeat(2, 1, 1) * out.mask.float()
            nll = relaxed_nll(out.image, crops.repeat(2, 1, 1, 1),
                              self._sigma(torch.cat([log_sigma, log_sigma_flip])), weight)
            loss = nll[:P].mean() + st.flip_weight * nll[P:].mean()
            loss = loss + st.landmark_weight * self._landmark_loss(d.expand(P, -1, -1), landmarks_xy, angles,
                                                                    translation, target).mean()
            loss = loss + prior_scale * (st.smooth_weight * thin_plate(d, valid).sum() +
                                         st.albedo_tv_weight * total_variation(a, valid).sum())
            loss.backward()
            optimiser.step()
        depth_c = (depth * vmask).detach()[0]
        albedo_c = (albedo.clamp(0, 1) * vmask[..., None]).detach()[0]
        angles, translation, sh = angles.detach(), translation.detach(), sh.detach()

        # personalise: per-photo residuals on the canonical face, each photo alone (eq. 3)
        delta_d = torch.zeros(P, *depth_c.shape, device=dev, requires_grad=True)
        delta_a = torch.zeros(P, *albedo_c.shape, device=dev, requires_grad=True)
        log_sigma_p = log_sigma.detach().clone().requires_grad_(True)
        optimiser = torch.optim.Adam([{"params": [delta_d], "lr": st.lr_depth},
                                      {"params": [delta_a], "lr": st.lr_albedo},
                                      {"params": [log_sigma_p], "lr": st.lr_sigma}])
        for _step in range(st.personal_steps):
            if should_stop is not None and should_stop():
                break
            optimiser.zero_grad(set_to_none=True)
            d = (depth_c + delta_d) * vmask
            a = (albedo_c + delta_a).clamp(0, 1)
            out, _cam, _k = self._render(d, a, tris, angles, translation, sh)
            nll = relaxed_nll(out.image, crops, self._sigma(log_sigma_p), face * out.mask.float())
            loss = nll.sum() + st.landmark_weight * self._landmark_loss(d, landmarks_xy, angles, translation,
                                                                         target).sum()
            loss = loss + st.smooth_weight * thin_plate(delta_d * vmask, valid).sum() + \
                st.albedo_tv_weight * total_variation(delta_a, valid).sum()
            loss = loss + st.personal_l1_weight * ((delta_d.abs() * vmask).sum((1, 2)) +
                                                   (delta_a.abs().sum(-1) * vmask).sum((1, 2))).sum() / vmask.sum()
            loss.backward()
            optimiser.step()
        personal_depth = ((depth_c + delta_d) * vmask).detach()
        personal_albedo = ((albedo_c + delta_a).clamp(0, 1) * vmask[..., None]).detach()
        result = LapResult(self.grid, depth_c, albedo_c, valid, angles, translation, sh, log_sigma.detach().exp(),
                           log_sigma_flip.detach().exp(), personal_depth, personal_albedo, landmarks_xy.detach())
        result.losses = self.scores(result, photos, (crops, face))
        return result

    def scores(self, result: LapResult, photos: LapPhotos, prepared: tuple | None = None) -> dict[str, np.ndarray]:
        """Per photo: ``photometric_canonical`` and ``photometric_personal``, the mean absolute RGB
        difference over the face pixels (attention-weighted) of the canonical and the
        personalised render."""
        if prepared is None:
            crops, _relaxed, face, _target = self._photo_tensors(photos)
        else:  # (crops, face) as run() already resized them
            crops, face = prepared
        P = crops.shape[0]
        tris = result.triangles
        with torch.no_grad():
            out_c, _, _ = self._render(result.depth.expand(P, -1, -1), result.albedo.expand(P, -1, -1, -1), tris,
                                       result.angles, result.translation, result.sh)
            out_p, _, _ = self._render(result.personal_depth, result.personal_albedo, tris, result.angles,
                                       result.translation, result.sh)
        scores = {}
        for name, out in (("photometric_canonical", out_c), ("photometric_personal", out_p)):
            w = face * out.mask.float()
            err = (out.image - crops).abs().mean(-1)
            scores[name] = ((w * err).sum((1, 2)) / w.sum((1, 2)).clamp_min(1e-6)).cpu().numpy()
        return scores

    def render_photos(self, result: LapResult, personal: bool, size: int | None = None) -> "torch.Tensor":
        """(P, S, S, 3) renders of the canonical (or personalised) face with each photo's viewpoint
        and light, and (P, S, S) masks, at ``size`` (default: the render size)."""
        P = result.angles.shape[0]
        renderer = self.renderer if size is None else MeshRenderer(image_size=(size, size), backend="torch")
        depth = result.personal_depth if personal else result.depth.expand(P, -1, -1)
        albedo = result.personal_albedo if personal else result.albedo.expand(P, -1, -1, -1)
        s = renderer.image_size[0]
        with torch.no_grad():
            cam = model_to_camera(grid_vertices(self.grid, depth), result.angles, result.translation)
            out = renderer.render(cam, result.triangles, crop_intrinsics(s, P, device=depth.device),
                                  albedo.reshape(P, -1, 3), result.sh)
        return out.image.clamp(0, 1), out.mask


def fill_holes(mask: torch.Tensor) -> torch.Tensor:
    """(R, R) bool mask with every region not connected to the border filled."""
    from scipy.ndimage import binary_fill_holes

    return torch.as_tensor(binary_fill_holes(mask.cpu().numpy()), device=mask.device)


def harmonic_fill(values: torch.Tensor, known: torch.Tensor, inside: torch.Tensor, iterations: int = 400
                  ) -> torch.Tensor:
    """(R, R) map with its values at ``inside & ~known`` replaced by the smooth (harmonic)
    interpolation of the ``known`` ones (Jacobi iterations of the 4-neighbour average)."""
    unknown = inside & ~known
    if not bool(unknown.any()):
        return values
    out = torch.where(known, values, values[known].mean())
    weight = inside.float()
    kernel = torch.tensor([[0.0, 1.0, 0.0], [1.0, 0.0, 1.0], [0.0, 1.0, 0.0]], device=values.device)[None, None]
    count = F.conv2d(weight[None, None], kernel, padding=1)[0, 0].clamp_min(1)
    for _ in range(iterations):
        mean = F.conv2d((out * weight)[None, None], kernel, padding=1)[0, 0] / count
        out = torch.where(unknown, mean, out)
    return out


def _erode(mask: torch.Tensor, steps: int = 1) -> torch.Tensor:
    """Binary erosion of an (R, R) mask by ``steps`` grid points (4-neighbourhood)."""
    m = mask
    for _ in range(steps):
        pad = F.pad(m[None, None].float(), (1, 1, 1, 1))[0, 0]
        m = m & (pad[:-2, 1:-1] > 0) & (pad[2:, 1:-1] > 0) & (pad[1:-1, :-2] > 0) & (pad[1:-1, 2:] > 0)
    return m


def depth_normals(grid: CanonicalGrid, depth: torch.Tensor) -> torch.Tensor:
    """(R, R, 3) unit model-frame normals of a depth map (R, R) by central differences."""
    dzdx = torch.zeros_like(depth)
    dzdy = torch.zeros_like(depth)
    dzdx[:, 1:-1] = (depth[:, 2:] - depth[:, :-2]) / (2 * grid.step)
    dzdy[1:-1] = -(depth[2:] - depth[:-2]) / (2 * grid.step)  # rows go down in y
    return F.normalize(torch.stack([-dzdx, -dzdy, torch.ones_like(depth)], dim=-1), dim=-1)
