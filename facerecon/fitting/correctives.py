"""Paper 004's final level: geometry and reflectance correctives fitted after the base fit.

The base level is the face model's fit (:class:`~facerecon.fitting.optimize.FaceFitter`). The
final level adds per-vertex corrections to its geometry and reflectance (paper 004 eqs. 1-2)::

    v^f = v^b + F_g,    r^f = r^b + F_r

either *free-form* (every vertex of the rendered face region has its own offsets: a face model
without a corrective space) or in a *learned* linear space, ``F = delta @ Theta``, whose bases
Theta a face model may carry (:class:`~facerecon.facemodel.corrective_space.CorrectiveSpace`,
learned by :func:`facerecon.fitting.corrective_learning.learn_corrective_space`).

:class:`CorrectiveFitter` keeps the base parameters fixed and optimises the correctives with
Adam at the crop size on

    w_photo * photometric(final render; skin-weighted, below) + w_lan * trust * landmarks(final)
    + w_smo * E_smo(F_g) + w_sta * E_sta(F_g) + w_ref * E_ref(r^f) + w_glo * E_glo(r^f)
    [+ w_prior * ||delta||^2 in a learned space]

with paper 004's regularisers (:mod:`facerecon.losses.correctives`). The photometric weight of a
pixel is where paper 004's fig. 12 goes wrong (occluders painted into the reflectance): where the
model expects skin a pixel counts with A exp(-(r_b / outlier_scale)^2), A the detect stage's skin
attention and r_b its error at the base level (hair, glasses and hands that the skin model
rejects, and skin-coloured occluders the base level cannot explain at all, barely count, so the
regularisers fill them in from the surrounding skin); on the brows, eyes and lips, whose colour
is not skin colour by nature, with 1. The landmark term is the base fit's (detector-bias
corrected targets, its final trust).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from facerecon.errors import InputError
from facerecon.fitting.adam import Adam, LambdaSchedule
from facerecon.fitting.camera import crop_intrinsics, model_to_camera
from facerecon.fitting.optimize import FaceFitter, FaceTargets, _resize
from facerecon.losses.correctives import (
    SPARSITY_BETA,
    SPARSITY_P,
    chromaticity_weights,
    laplacian_smoothness,
    mesh_edges,
    random_vertex_pairs,
    reflectance_sparsity,
    skin_constancy,
    stabilization,
    vertex_degrees,
)
from facerecon.losses.hybrid import photometric_loss
from facerecon.render.camera import project_points, scale_intrinsics
from facerecon.render.shading import vertex_normals

LEVELS = ("base", "final")
#: the final level's terms as reported (fits.h5 ``losses``): names that no base-fit term uses
LOSS_NAMES = {"smoothness": "corrective_smoothness", "stabilization": "corrective_stabilization",
              "sparsity": "reflectance_sparsity", "constancy": "skin_constancy", "prior": "corrective_prior",
              "total": "corrective_total"}
#: the base-fit parameters the corrective level starts from
BASE_PARAMETERS = ("identity", "expression", "albedo", "sh", "angles", "translation")


@dataclass
class CorrectiveSettings:
    """Options of the corrective level (weights in units of the base fit's total loss).

    The regulariser weights were chosen on real photos (docs/fitting.md, "Correctives").

    Raises:
        InputError: a field out of range.
    """

    steps: int = 80  # Adam steps at the crop size
    patience: int = 15
    tolerance: float = 2e-4
    warmup_steps: int = 10
    geometry_step: float = 0.05  # Adam step of a free-form geometry offset, mm
    reflectance_step: float = 0.01  # Adam step of a free-form reflectance offset
    coefficient_step: float = 0.05  # Adam step of a learned-space coefficient
    photo: float = 1.9  # paper 000's w_photo
    landmark: float = 1.6e-3  # paper 000's w_lan (times the base fit's final landmark trust)
    smoothness: float = 0.01  # eq. 12, geometry in mm
    stabilization: float = 0.002  # eq. 15, geometry in mm
    sparsity: float = 0.1  # eq. 13 on the final reflectance
    constancy: float = 1.0  # eq. 14 on the final reflectance
    coefficient_prior: float = 1e-3  # ||delta||^2 in a learned space (coefficients ~ N(0, 1))
    # on the skin region a pixel also counts with exp(-(r / outlier_scale)^2), r = its RGB error at the
    # base level: what the skin colour model takes for skin but the base level cannot explain at all
    # (blond hair, a hand) is left to the regularisers; 0 = off
    outlier_scale: float = 0.25
    beta: float = SPARSITY_BETA
    p: float = SPARSITY_P
    skin_samples: int = 6  # eq. 14's |G_i|
    seed: int = 0  # of eq. 14's random pairs

    def __post_init__(self) -> None:
        for name in ("steps", "warmup_steps", "skin_samples", "seed"):
            value = getattr(self, name)
            if not (isinstance(value, int) and value >= 0):
                raise InputError(f"corrective setting {name} must be a whole number >= 0")
        if not (isinstance(self.patience, int) and self.patience >= 1):
            raise InputError("corrective setting patience must be a whole number >= 1")
        for name in ("tolerance", "geometry_step", "reflectance_step", "coefficient_step", "photo", "landmark",
                     "smoothness", "stabilization", "sparsity", "constancy", "coefficient_prior", "outlier_scale",
                     "beta"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise InputError(f"corrective setting {name} must be a number >= 0")
        if not 0 < self.p <= 2:
            raise InputError("corrective setting p must be in (0, 2]")

    def to_dict(self) -> dict:
        return dict(self.__dict__)


@dataclass
class CorrectiveResult:
    """Per-face results of the corrective level, arrays with a leading batch dimension B.

    geometry, reflectance: (B, N, 3) the corrections F_g (mm, canonical frame) and F_r;
    coefficients: the learned space's ``geometry`` (B, C_g) and ``reflectance`` (B, C_r)
    coefficients (empty for free-form correctives); losses: name -> (B,), every photometric report
    of both levels on the same render (``photometric_base`` / ``photometric_final``: the optimised
    skin-weighted error; ``photometric_face_*``: unweighted over the rendered face;
    ``photometric_trusted_*`` / ``photometric_untrusted_*``: unweighted over the pixels the skin
    weighting trusts (>= 0.5) / does not), the landmark term of both and the final level's
    regularisers (:data:`LOSS_NAMES`); failed: (B,) the final level equals the base;
    landmark_error_px / dense_error_px: (B,) the final geometry's reprojection errors (crop px);
    stopped: a stop request ended the optimisation early.
    """

    geometry: np.ndarray
    reflectance: np.ndarray
    coefficients: dict[str, np.ndarray]
    losses: dict[str, np.ndarray]
    failed: np.ndarray
    steps: int
    landmark_error_px: np.ndarray | None = None
    dense_error_px: np.ndarray | None = None
    stopped: bool = False


@dataclass
class _Batch:
    """What the corrective terms of one batch hold fixed (B faces at the crop size S)."""

    vertices: torch.Tensor  # (B, N, 3) base geometry, canonical frame
    albedo: torch.Tensor  # (B, N, 3) base reflectance
    angles: torch.Tensor
    translation: torch.Tensor
    sh: torch.Tensor
    intrinsics: torch.Tensor  # (B, 3, 3) of the crop (landmarks are in crop pixels)
    crops: torch.Tensor  # (B, R, R, 3) at the render size R (the crop size S in a fit)
    pixel_weight: torch.Tensor  # (B, R, R) skin-weighted photometric weight
    landmarks68: torch.Tensor
    dense: torch.Tensor | None
    trust: torch.Tensor  # (B,)
    edge_weights: torch.Tensor  # (B, E) chromaticity weights of eq. 13
    render_intrinsics: torch.Tensor | None = None  # (B, 3, 3) at the crops' size (None: intrinsics)


class CorrectiveFitter:
    """Fits the final level of a batch of base fits (see the module docstring).

    Args:
        base: the base level's fitter (model, rendered region, landmark terms, renderer).
        regions: the face model's regions (``photometric``: where correctives live; ``skin``:
            eq. 14's mask and where the skin attention weights the photometric term).
        settings: :class:`CorrectiveSettings`.
        space: a learned corrective space (geometry (C_g, N, 3), reflectance (C_r, N, 3) arrays);
            None: free-form correctives.
    """

    def __init__(self, base: FaceFitter, regions: dict[str, np.ndarray], settings: CorrectiveSettings | None = None,
                 space=None):
        self.base = base
        self.model = base.model
        self.settings = settings or CorrectiveSettings()
        m = self.model
        device, dtype = m.mean_shape.device, m.mean_shape.dtype
        n = m.n_vertices
        support = torch.zeros(n, dtype=torch.bool, device=device)
        support[torch.as_tensor(regions["photometric"], dtype=torch.int64, device=device)] = True
        self.support = support
        self.support_index = torch.nonzero(support)[:, 0]
        self.edges = mesh_edges(m.triangles)  # smoothness over the whole mesh: F = 0 outside the support
        self.degree = vertex_degrees(self.edges, n).to(device)
        self.photo_edges = mesh_edges(base.photo_triangles)
        skin = torch.as_tensor(regions["skin"], dtype=torch.int64, device=device)
        self.n_skin = int(skin.numel())
        self.skin_pairs = random_vertex_pairs(skin, self.settings.skin_samples, self.settings.seed)
        #: 1 on the skin region, 0 on brows, eyes, lips: where the skin attention weights pixels
        self.skin_indicator = torch.zeros(n, 3, dtype=dtype, device=device)
        self.skin_indicator[skin] = 1.0
        self.space = None
        if space is not None:
            geometry = torch.as_tensor(np.asarray(space.geometry), dtype=dtype, device=device)
            reflectance = torch.as_tensor(np.asarray(space.reflectance), dtype=dtype, device=device)
            if geometry.shape[1:] != (n, 3) or reflectance.shape[1:] != (n, 3):
                raise InputError(f"corrective space bases must be (C, {n}, 3)")
            self.space = (geometry.reshape(geometry.shape[0], -1), reflectance.reshape(reflectance.shape[0], -1))

    @property
    def kind(self) -> str:
        """``"learned"`` with a corrective space, else ``"free"``."""
        return "free" if self.space is None else "learned"

    # ------------------------------------------------------------------ fixed parts
    def prepare(self, params: dict[str, torch.Tensor], targets: FaceTargets, trust: torch.Tensor,
                render_size: int | None = None, debias: bool = True) -> _Batch:
        """The batch's fixed parts from base parameters (B, ...) and the targets (model dtype).

        The base geometry, reflectance and light keep the parameters' gradients (R-Net training
        backpropagates the final level into the base level); the pixel and edge weights are constants.

        Args:
            render_size: size (px) the final level is rendered and compared at (None: the crop size);
                landmarks stay in crop pixels.
            debias: use the base fit's detector-bias corrected landmark targets (the fit); training
                compares with the raw detections, as its base-level loss does.
        """
        m, cfg = self.model, self.settings
        b, crop = targets.crops.shape[0], targets.size
        size = crop if render_size is None else int(render_size)
        verts = m.shape(params["identity"].expand(b, -1), params["expression"])
        albedo = m.albedo(params["albedo"])
        k = crop_intrinsics(crop, b, dtype=verts.dtype, device=verts.device)
        k_render = k if size == crop else scale_intrinsics(k, size / crop)
        crops = _resize(targets.crops, size)
        with torch.no_grad():
            cam = model_to_camera(verts.detach(), params["angles"].detach(), params["translation"].detach())
            # where the model expects skin, at the base geometry: weight pixels by the attention there
            renderer = self.base._renderer(size)
            out = renderer.render(cam, self.base.photo_triangles, k_render, self.skin_indicator.expand(b, -1, -1), None)
            expects_skin = out.image[..., 0].clamp(0.0, 1.0)
            trusted = _resize(targets.attention[..., None], size)[..., 0].to(cam.dtype)
            if cfg.outlier_scale > 0:
                base = renderer.render(cam, self.base.photo_triangles, k_render, albedo.detach(),
                                       params["sh"].detach())
                residual = (base.image - crops).norm(dim=-1)
                trusted = trusted * torch.exp(-(residual / cfg.outlier_scale) ** 2)
            pixel_weight = 1.0 - expects_skin * (1.0 - trusted)
            # eq. 13's chromaticity weights: the photo's colour at every vertex's projection (base level)
            uv = project_points(cam, k)[..., :2]
            grid = (2.0 * uv + 1.0) / crop - 1.0
            colors = F.grid_sample(targets.crops.permute(0, 3, 1, 2), grid[:, :, None], mode="bilinear",
                                   padding_mode="border", align_corners=False)[..., 0].transpose(1, 2)
            visible = out.vertex_visibility
            edge_weights = chromaticity_weights(colors, self.photo_edges, visible, cfg.beta)
            if debias:
                targets = self._landmark_targets(targets, params["angles"])
        return _Batch(verts, albedo, params["angles"], params["translation"], params["sh"], k, crops,
                      pixel_weight, targets.landmarks68, targets.dense, trust.to(verts.dtype), edge_weights, k_render)

    def _landmark_targets(self, targets: FaceTargets, angles: torch.Tensor) -> FaceTargets:
        """The landmark targets the base fit ended with: detector-bias corrected at its pose."""
        base = self.base
        if base.settings.detector_bias_iterations > 0 and self.model.has_detector_bias:
            return base._debiased(targets, angles)
        return targets

    def on_mesh(self, values: torch.Tensor) -> torch.Tensor:
        """(B, S, 3) values on the support -> (B, N, 3), zero elsewhere."""
        full = values.new_zeros(values.shape[0], self.model.n_vertices, 3)
        return full.index_add(1, self.support_index, values)

    def fields(self, variables: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """(F_g, F_r), (B, N, 3) each, of the optimised ``variables``."""
        if self.space is None:
            return self.on_mesh(variables["geometry"]), self.on_mesh(variables["reflectance"])
        geometry_basis, reflectance_basis = self.space
        b = variables["geometry"].shape[0]
        return ((variables["geometry"] @ geometry_basis).reshape(b, -1, 3),
                (variables["reflectance"] @ reflectance_basis).reshape(b, -1, 3))

    # ------------------------------------------------------------------ the loss
    def terms(self, batch: _Batch, geometry: torch.Tensor, reflectance: torch.Tensor,
              coefficients: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        """Every term (B,) of the final level with corrections F_g, F_r (B, N, 3); ``total`` weighted.

        ``coefficients``: the learned space's coefficients (their prior is added), or None.
        """
        cfg, base = self.settings, self.base
        verts = batch.vertices + geometry
        cam = model_to_camera(verts, batch.angles, batch.translation)
        normals = vertex_normals(cam, self.model.triangles)
        landmark = base._landmark68_term(cam, normals, batch.intrinsics, batch.landmarks68)
        if base.use_dense and batch.dense is not None:
            landmark = landmark + base.settings.dense_weight * base._dense_landmark_term(
                cam, normals, batch.intrinsics, batch.dense)
        albedo = batch.albedo + reflectance
        size = batch.crops.shape[1]
        k_render = batch.intrinsics if batch.render_intrinsics is None else batch.render_intrinsics
        out = base._renderer(size).render(cam, base.photo_triangles, k_render, albedo, batch.sh)
        terms = {
            "photometric": photometric_loss(out.image, batch.crops, out.mask, batch.pixel_weight),
            "photometric_face": photometric_loss(out.image.detach(), batch.crops, out.mask),
            # reports, not optimised: the error where the skin weighting trusts the photo (>= 0.5) and
            # where it does not (< 0.5: occluders, hair, shadows on the skin region)
            "photometric_trusted": photometric_loss(out.image.detach(), batch.crops,
                                                    out.mask & (batch.pixel_weight >= 0.5)),
            "photometric_untrusted": photometric_loss(out.image.detach(), batch.crops,
                                                      out.mask & (batch.pixel_weight < 0.5)),
            "landmark": landmark,
            "smoothness": laplacian_smoothness(geometry, self.edges, self.degree),
            "stabilization": stabilization(geometry, self.support),
            "sparsity": reflectance_sparsity(albedo, self.photo_edges, batch.edge_weights, cfg.p),
            "constancy": skin_constancy(albedo, self.skin_pairs, self.n_skin),
        }
        total = (cfg.photo * terms["photometric"] + cfg.landmark * batch.trust * landmark
                 + cfg.smoothness * terms["smoothness"] + cfg.stabilization * terms["stabilization"]
                 + cfg.sparsity * terms["sparsity"] + cfg.constancy * terms["constancy"])
        if coefficients is not None:
            terms["prior"] = sum((c ** 2).sum(dim=1) for c in coefficients.values())
            total = total + cfg.coefficient_prior * terms["prior"]
        terms["total"] = total
        return terms

    # ------------------------------------------------------------------ optimisation
    def _variables(self, b: int, dtype, device) -> dict[str, torch.Tensor]:
        if self.space is None:
            shape = (b, int(self.support_index.numel()), 3)
            return {"geometry": torch.zeros(shape, dtype=dtype, device=device),
                    "reflectance": torch.zeros(shape, dtype=dtype, device=device)}
        return {"geometry": torch.zeros(b, self.space[0].shape[0], dtype=dtype, device=device),
                "reflectance": torch.zeros(b, self.space[1].shape[0], dtype=dtype, device=device)}

    def _steps(self) -> dict[str, float]:
        cfg = self.settings
        if self.space is None:
            return {"geometry": cfg.geometry_step, "reflectance": cfg.reflectance_step}
        return {"geometry": cfg.coefficient_step, "reflectance": cfg.coefficient_step}

    def fit(self, targets: FaceTargets, parameters: dict[str, np.ndarray], trust: np.ndarray | None = None,
            failed: np.ndarray | None = None, should_stop=None,
            start: dict[str, np.ndarray] | None = None) -> CorrectiveResult:
        """Fit the final level of every face of ``targets`` from its base ``parameters`` (B, ...).

        Args:
            targets: the batch the base level was fitted to.
            parameters: the base fit's parameters (:data:`BASE_PARAMETERS`), (B, ...) arrays.
            trust: (B,) the base fit's final landmark trust (None: 1).
            failed: (B,) faces whose base fit failed: left at zero correction.
            should_stop: polled between steps; a stop ends the optimisation early (the best
                correctives so far are returned).
            start: a learned space's starting coefficients ``geometry`` (B, C_g) and ``reflectance``
                (B, C_r) (a network's prediction; with ``settings.steps = 0`` the result); None: zero.
        """
        cfg, m = self.settings, self.model
        device, dtype = m.mean_shape.device, m.mean_shape.dtype
        targets = targets.to(device=device, dtype=dtype)
        b = targets.crops.shape[0]
        params = {n: torch.as_tensor(np.asarray(parameters[n]), dtype=dtype, device=device) for n in BASE_PARAMETERS}
        trust_t = torch.ones(b, dtype=dtype, device=device) if trust is None else \
            torch.as_tensor(np.nan_to_num(np.asarray(trust, np.float64), nan=1.0), dtype=dtype, device=device)
        frozen = torch.zeros(b, dtype=torch.bool, device=device) if failed is None else \
            torch.as_tensor(np.asarray(failed, bool), device=device)
        # a failed base fit has nothing to correct: give it a harmless copy of a live face's parameters
        finite = torch.stack([torch.isfinite(t.reshape(b, -1)).all(dim=1) for t in params.values()]).all(dim=0)
        frozen = frozen | ~finite
        if frozen.all():
            return self._empty(b, frozen)
        donor = int(torch.nonzero(~frozen)[0])
        params = {n: torch.where(frozen.view(-1, *[1] * (t.dim() - 1)), t[donor:donor + 1], t)
                  for n, t in params.items()}
        batch = self.prepare(params, targets, trust_t)
        variables = self._variables(b, dtype, device)
        with torch.no_grad():  # the base level: zero correctives
            base_terms = self.terms(batch, *self.fields(variables), self._prior_of(variables))
        if start is not None:
            if self.space is None:
                raise InputError("starting coefficients need a learned corrective space")
            variables = {n: torch.as_tensor(np.asarray(start[n]), dtype=dtype, device=device).reshape(t.shape).clone()
                         for n, t in variables.items()}
        variables = {n: t.requires_grad_(True) for n, t in variables.items()}
        stopped = [False]
        steps_done = self._optimise(batch, variables, frozen, cfg.steps, should_stop, stopped)
        with torch.no_grad():
            geometry, reflectance = self.fields(variables)
            final = self.terms(batch, geometry, reflectance, self._prior_of(variables))
            bad = ~torch.isfinite(final["total"]) | frozen
            geometry = torch.where(bad[:, None, None], torch.zeros_like(geometry), geometry)
            reflectance = torch.where(bad[:, None, None], torch.zeros_like(reflectance), reflectance)
            errors = self._landmark_errors(batch, geometry, targets)
        losses = {f"{name}_base": v for name, v in base_terms.items() if name.startswith("photometric")}
        losses |= {f"{name}_final": torch.where(bad, torch.full_like(v, math.nan), v)
                   for name, v in final.items() if name.startswith("photometric")}
        losses |= {"landmark_base": base_terms["landmark"], "landmark_final": final["landmark"],
                   "corrective_total_base": base_terms["total"]}
        losses |= {LOSS_NAMES[name]: v for name, v in final.items() if name in LOSS_NAMES}
        coefficients = {} if self.space is None else {
            n: torch.where(bad[:, None], torch.zeros_like(v), v).detach().cpu().numpy() for n, v in variables.items()}
        return CorrectiveResult(geometry.cpu().numpy(), reflectance.cpu().numpy(), coefficients,
                                {n: v.detach().cpu().numpy() for n, v in losses.items()}, bad.cpu().numpy(),
                                steps_done, *errors, stopped=stopped[0])

    def _landmark_errors(self, batch: _Batch, geometry: torch.Tensor, raw: FaceTargets
                         ) -> tuple[np.ndarray, np.ndarray]:
        """(B,) mean 68-point and dense reprojection errors (crop px) of the final geometry against the
        detector's own (uncorrected) landmarks, as :class:`~facerecon.fitting.optimize.FitResult` has them."""
        m = self.model
        cam = model_to_camera(batch.vertices + geometry, batch.angles, batch.translation)
        proj = project_points(m.landmark_points(cam), batch.intrinsics)[..., :2]
        error = (proj - raw.landmarks68).norm(dim=-1).mean(dim=1)
        dense = torch.full_like(error, math.nan)
        if m.dense_triangle is not None and raw.dense is not None:
            dense_proj = project_points(m.dense_points(cam), batch.intrinsics)[..., :2]
            dense = (dense_proj - raw.dense).norm(dim=-1).mean(dim=1)
        return error.cpu().numpy(), dense.cpu().numpy()

    def _prior_of(self, variables: dict[str, torch.Tensor]) -> dict[str, torch.Tensor] | None:
        return None if self.space is None else variables

    def _empty(self, b: int, failed: torch.Tensor) -> CorrectiveResult:
        n = self.model.n_vertices
        nan = np.full(b, np.nan)
        return CorrectiveResult(np.zeros((b, n, 3), np.float32), np.zeros((b, n, 3), np.float32), {},
                                {"photometric_base": nan, "photometric_final": nan}, failed.cpu().numpy(), 0, nan, nan)

    def _optimise(self, batch: _Batch, variables: dict[str, torch.Tensor], frozen: torch.Tensor, steps: int,
                  should_stop=None, stopped: list[bool] | None = None) -> int:
        """Adam on ``variables`` (in place: they end at each face's best step); returns the steps taken.
        A stop request ends it early and sets ``stopped[0]``."""
        if steps <= 0:
            return 0
        cfg = self.settings
        scales = self._steps()
        optimizer = Adam([{"params": [t], "lr": scales[n]} for n, t in variables.items()])
        schedule = LambdaSchedule(
            optimizer, lambda i: min(1.0, (i + 1) / (cfg.warmup_steps + 1)) *
            (0.05 + 0.95 * 0.5 * (1.0 + math.cos(math.pi * min(i, steps) / steps))))
        b = frozen.shape[0]
        best_value = torch.full((b,), math.inf, dtype=batch.vertices.dtype, device=frozen.device)
        best = {n: t.detach().clone() for n, t in variables.items()}
        stale = torch.zeros(b, dtype=torch.int64, device=frozen.device)
        done = 0
        for step in range(steps):
            if should_stop is not None and should_stop():
                if stopped is not None:
                    stopped[0] = True
                break
            terms = self.terms(batch, *self.fields(variables), self._prior_of(variables))
            total = terms["total"]
            with torch.no_grad():
                value = torch.where(torch.isfinite(total), total.detach(), torch.full_like(total, math.inf))
                improved = (value < best_value * (1.0 - cfg.tolerance)) & ~frozen
                better = value < best_value
                for n, t in variables.items():
                    best[n] = torch.where(better.view(-1, *[1] * (t.dim() - 1)), t.detach(), best[n])
                best_value = torch.where(better, value, best_value)
                stale = torch.where(improved, torch.zeros_like(stale), stale + 1)
            live = (~frozen & torch.isfinite(total)).to(total.dtype)
            optimizer.zero_grad(set_to_none=True)
            (torch.where(torch.isfinite(total), total, torch.zeros_like(total)) * live).sum().backward()
            optimizer.step()
            schedule.step()
            done = step + 1
            if bool(((stale >= cfg.patience) | frozen).all()):
                break
        with torch.no_grad():
            # the last step is scored too: keep it where it is the best
            terms = self.terms(batch, *self.fields(variables), self._prior_of(variables))
            value = terms["total"]
            better = torch.isfinite(value) & (value < best_value)
            for n, t in variables.items():
                t.copy_(torch.where(better.view(-1, *[1] * (t.dim() - 1)), t, best[n]))
        return done
