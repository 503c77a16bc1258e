"""Method ``optimize``: per-face analysis-by-synthesis with the hybrid loss of paper 000.

Unknowns per face: identity, expression, albedo coefficients, 27 coloured SH light
coefficients, head rotation (pitch, yaw, roll) and translation. Schedule (coarse to fine):

1. *landmarks*: pose, identity and expression from the 68 (and dense 468) landmarks with
   the coefficient prior;
2. *photometric*: everything, with the skin-attention photometric loss added, rendered at
   a reduced size first (``coarse_size``) and then at the crop size.

Each stage stops early when the batch's loss stops improving. A face whose loss or
parameters become non-finite is reset to its starting point and retried with a smaller
step; after ``max_retries`` it is marked failed and frozen.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from facerecon.errors import InputError
from facerecon.facemodel.blendshape_pairs import opposing_pairs
from facerecon.facemodel.tensors import FaceModelTensors
from facerecon.fitting.adam import Adam, LambdaSchedule
from facerecon.fitting.camera import crop_intrinsics, model_to_camera, pose_from_landmarks
from facerecon.fitting.gaze import gaze_columns
from facerecon.fitting.lbfgs import batched_lbfgs
from facerecon.losses.expression import blendshape_prior, observed_weight_prior
from facerecon.losses.hybrid import (
    PAPER000_WEIGHTS,
    coefficient_regularizer,
    landmark_loss,
    landmark_trust,
    landmark_weights_68,
    photometric_loss,
    texture_flatness,
)
from facerecon.losses.specular import (
    PAPER002_WEIGHTS,
    inner_mouth_loss,
    landmark_weights_68_paper002,
    light_chroma,
    skin_confidence,
)
from facerecon.render.camera import project_points, scale_intrinsics, scale_pixels
from facerecon.render.rasterize import interpolate
from facerecon.render.renderer import MeshRenderer, RenderOutput
from facerecon.detection.landmarks import LIPS_INNER
from facerecon.render.shading import SH_CONSTANTS, SpecularLight, facing_cosine, sh_basis, vertex_normals

#: Landmarks on the face contour slide along the silhouette: weighted by visibility.
JAW_68 = np.arange(0, 17)
#: a stage's loss this many times its first value means the optimisation is diverging
EXPLODING_LOSS_FACTOR = 1e4

PARAMETER_NAMES = ("identity", "expression", "albedo", "sh", "angles", "translation")
#: the unknowns of paper 002's specular shading (``shading="blinn-phong"``): specular albedo
#: coefficients, the direction towards the light (camera frame), its RGB intensity, log shininess
SPECULAR_PARAMETER_NAMES = ("specular", "light_direction", "light_color", "log_shininess")
SHADINGS = ("lambert", "blinn-phong")
LANDMARK_WEIGHTINGS = ("paper000", "paper002")
#: shininess range of the fit (Blinn-Phong exponent): below 2 a lobe is no highlight, above 200 a
#: highlight is smaller than a pixel of the crop
SHININESS_RANGE = (2.0, 200.0)
#: starting light: a little above the camera (y is down in the camera frame), shininess 16
INITIAL_LIGHT_DIRECTION = (0.0, -0.3, -1.0)
INITIAL_SHININESS = 16.0


DETECTOR_BIAS_MODES = ("pose", "full")
SHARED_IDENTITY_PRIORS = ("per_set", "per_photo")
RENDER_BACKENDS = ("torch", "pytorch3d")


def _one_of(choices: tuple[str, ...]) -> str:
    return "one of " + ", ".join(repr(c) for c in choices)


def _check(ok: bool, name: str, expected: str) -> None:
    if not ok:
        raise InputError(f"fit setting {name} must be {expected}")


#: FitSettings overrides that leave only paper 000's eq. 5 prior on the expression (``--no-expression-prior``)
NO_EXPRESSION_PRIOR = {"expression_l1": 0.0, "expression_l2": 0.0, "expression_opposing": 0.0}


@dataclass
class FitSettings:
    """Options of the ``optimize`` method, validated on construction.

    Defaults: paper 000's Lambertian fit with its weights; :func:`blinn_phong_settings` is paper
    002's Blinn-Phong fit as measured best on real data, :func:`paper002_settings` paper 002's exactly
    (docs/fitting.md, "Specular shading").

    Raises:
        InputError: a field out of range or not one of its choices.
    """

    landmark_steps: int = 80  # L-BFGS evaluations per face of the landmark stage
    coarse_steps: int = 200
    fine_steps: int = 25
    coarse_size: int = 112
    learning_rate: float = 0.03
    tolerance: float = 2e-4
    patience: int = 15
    use_dense_landmarks: bool = True
    dense_weight: float = 20.0
    photometric_landmark_scale: float = 1.0  # < 1 lets photometry override landmarks
    # adaptive landmark trust in the photometric stages (docs/fitting.md): the landmark term is
    # scaled by clamp((photometric error / reference) ** power, minimum, 1); reference 0 = off
    landmark_trust_reference: float = 0.15
    landmark_trust_power: float = 2.0
    landmark_trust_minimum: float = 0.01
    warmup_steps: int = 20  # Adam steps over which a photometric stage ramps up its step size
    # detector-bias correction (docs/fitting.md): landmark targets minus the detector's expected
    # offset at the fitted pose, re-estimated this many times after the landmark stage;
    # 0 = raw detections. No effect with a face model that has no detector-bias table.
    detector_bias_iterations: int = 3
    # L-BFGS evaluations of each correction round's landmark stage (it starts next to its answer)
    detector_bias_steps: int = 50
    # "pose": correct only how the offsets change away from a frontal view (a frontal face
    # keeps its detections); "full": also the offsets the table holds for a frontal view
    detector_bias_mode: str = "pose"
    # correct the face-contour landmarks too: off, because a render of a face-only mesh ends at
    # the jaw line where a photo goes on into the neck, so the detector's contour offsets
    # measured on renders do not carry over to photos (contour points also slide, see JAW_68)
    detector_bias_contour: bool = False
    # the prior of an identity shared by B photos (joint aggregation): "per_set" counts it once
    # for the whole set (the MAP estimate from B independent photos), "per_photo" once per photo
    # (as strong as in a single-photo fit)
    shared_identity_prior: str = "per_set"
    exclude_inner_mouth: bool = False
    # "lambert": paper 000's SH Lambertian shading; "blinn-phong": paper 002's diffuse + specular
    # albedo (SH + one Blinn-Phong light), its photometric loss (eq. 8) and uniform loss (eq. 13)
    shading: str = "lambert"
    # paper 002 eq. 8's eta: weight of the full render's error against the skin-weighted diffuse one
    specular_eta: float = 1.0
    # eq. 13's weight (blinn-phong shading; it takes the place of paper 000's texture term)
    uniform_weight: float = 5.0
    # weight of eq. 13's light part (the SH and specular light colours' spread over R, G, B) relative
    # to its albedo part; 1 = the paper, 0 measured better (docs/fitting.md, "Specular shading")
    uniform_light_weight: float = 0.0
    # prior on the specular albedo coefficients (N(0, 1) each), in units of reg_identity
    specular_prior: float = 1.0
    # paper 002 eq. 11: |projected inner-mouth area - detected inner-mouth mask| (pixels at the crop
    # size); 0 = off. Needs the inner-mouth masks in the targets.
    inner_mouth_weight: float = 0.0
    # the 68 landmarks' weights: "paper000" (nose and inner mouth 20) or "paper002" (outer mouth
    # and eyebrows 20)
    landmark_weighting: str = "paper000"
    # blendshape expression prior (models with blendshapes, e.g. ICT; facerecon.losses.expression):
    # L1 and L2 on the weights and the product of opposing pairs, in units of the total loss.
    # Paper 000's eq. 5 prior (reg_expression) was set for PCA coefficients and is kept beside it.
    # (values chosen on real data: docs/fitting.md, "Real data")
    expression_l1: float = 0.002
    expression_l2: float = 0.006
    expression_opposing: float = 0.1
    # pull of the eye-look blendshapes towards the gaze seen in the irises (facerecon.fitting.gaze)
    gaze_prior: float = 0.0
    # the perceptual term (when the fitter has a recognition network) in the coarse stage too; off:
    # only the fine stage, at the crop size, where the face is large enough for the network, and a
    # tenth of the steps (on a CPU the network's forward and backward cost ~40 ms per face and step)
    perceptual_in_coarse: bool = False
    max_retries: int = 1
    weights: dict[str, float] = field(default_factory=lambda: dict(PAPER000_WEIGHTS))
    # the rasterizer of the photometric stages: "torch" (facerecon.render.rasterize) or
    # "pytorch3d"; part of the settings digest, so installing PyTorch3D never changes a stored
    # fit silently. "auto" is resolved here, to the backend it picks in this environment.
    render_backend: str = "torch"

    def __post_init__(self) -> None:
        """Validate every field once, so a typo fails here and not as a silent default later."""
        for name in ("landmark_steps", "coarse_steps", "fine_steps", "warmup_steps", "detector_bias_iterations",
                     "detector_bias_steps", "max_retries"):
            _check(isinstance(getattr(self, name), int) and getattr(self, name) >= 0, name,
                   "a whole number >= 0")
        for name in ("patience", "coarse_size"):
            _check(isinstance(getattr(self, name), int) and getattr(self, name) >= 1, name, "a whole number >= 1")
        _check(math.isfinite(self.learning_rate) and self.learning_rate > 0, "learning_rate", "a number > 0")
        for name in ("tolerance", "dense_weight", "photometric_landmark_scale", "landmark_trust_reference",
                     "landmark_trust_power", "expression_l1", "expression_l2", "expression_opposing", "gaze_prior"):
            value = getattr(self, name)
            _check(math.isfinite(value) and value >= 0, name, "a number >= 0")
        _check(0 < self.landmark_trust_minimum <= 1, "landmark_trust_minimum", "in (0, 1]")
        _check(self.detector_bias_mode in DETECTOR_BIAS_MODES, "detector_bias_mode", _one_of(DETECTOR_BIAS_MODES))
        _check(self.shared_identity_prior in SHARED_IDENTITY_PRIORS, "shared_identity_prior",
               _one_of(SHARED_IDENTITY_PRIORS))
        _check(self.shading in SHADINGS, "shading", _one_of(SHADINGS))
        _check(self.landmark_weighting in LANDMARK_WEIGHTINGS, "landmark_weighting", _one_of(LANDMARK_WEIGHTINGS))
        for name in ("specular_eta", "uniform_weight", "uniform_light_weight", "specular_prior", "inner_mouth_weight"):
            value = getattr(self, name)
            _check(math.isfinite(value) and value >= 0, name, "a number >= 0")
        _check(self.render_backend in RENDER_BACKENDS + ("auto",), "render_backend",
               _one_of(RENDER_BACKENDS + ("auto",)))
        if self.render_backend == "auto":
            self.render_backend = MeshRenderer(backend="auto").backend
        missing = sorted(set(PAPER000_WEIGHTS) - set(self.weights))
        _check(not missing, "weights", f"a value for every term (missing: {', '.join(missing)})")
        bad = sorted(k for k, v in self.weights.items() if not (math.isfinite(v) and v >= 0))
        _check(not bad, "weights", f"finite and >= 0 (not: {', '.join(bad)})")

    def to_dict(self) -> dict:
        return {k: (dict(v) if isinstance(v, dict) else v) for k, v in self.__dict__.items()}

    @property
    def parameter_names(self) -> tuple[str, ...]:
        """The unknowns of the photometric stages with this shading."""
        return PARAMETER_NAMES + (SPECULAR_PARAMETER_NAMES if self.shading == "blinn-phong" else ())


def blinn_phong_settings(**overrides) -> FitSettings:
    """``--shading blinn-phong``: paper 002's fit (Blinn-Phong shading, its loss weights of sec. 4.1,
    landmark weights of eq. 10, inner-mouth loss of eq. 11) without the light part of its uniform
    loss (eq. 13), which measured worse on real data (docs/fitting.md); ``overrides`` replace any field."""
    return FitSettings(**{"shading": "blinn-phong", "weights": dict(PAPER002_WEIGHTS), "landmark_weighting": "paper002",
                          "inner_mouth_weight": 1.3e-3, "uniform_light_weight": 0.0, **overrides})


def paper002_settings(**overrides) -> FitSettings:
    """Paper 002's fit exactly: :func:`blinn_phong_settings` with eq. 13's light part on."""
    return blinn_phong_settings(**{"uniform_light_weight": 1.0, **overrides})


def lambert_settings(**overrides) -> FitSettings:
    """Paper 000's Lambertian fit (``--shading lambert``, the defaults); ``overrides`` replace any field."""
    return FitSettings(**overrides)


#: the fit settings of each ``--shading`` choice
SHADING_PRESETS = {"lambert": lambert_settings, "blinn-phong": blinn_phong_settings}


@dataclass
class FaceTargets:
    """What one batch of faces is fitted to (all on the aligned crop of size S).

    crops: (B, S, S, 3) float in [0, 1]; landmarks68: (B, 68, 2) px; dense: (B, 468, 2) px or
    None; attention: (B, S, S) in [0, 1]; gaze: (B, 8) eye-look blendshape weights observed
    from the irises (:func:`facerecon.fitting.gaze.gaze_weights`) or None; inner_mouth: (B, S, S)
    in [0, 1], the detected mouth opening (the detect stage's ``masks/inner_mouth``) or None.
    """

    crops: torch.Tensor
    landmarks68: torch.Tensor
    dense: torch.Tensor | None
    attention: torch.Tensor
    gaze: torch.Tensor | None = None
    inner_mouth: torch.Tensor | None = None

    @property
    def size(self) -> int:
        return int(self.crops.shape[1])

    def to(self, device=None, dtype: torch.dtype | None = None) -> "FaceTargets":
        """The targets on ``device`` with floating tensors in ``dtype`` (None: unchanged)."""
        def move(x):
            return None if x is None else x.to(device=device, dtype=dtype)

        return FaceTargets(move(self.crops), move(self.landmarks68), move(self.dense), move(self.attention),
                           move(self.gaze), move(self.inner_mouth))


@dataclass
class FitResult:
    """Per-face results, arrays with a leading batch dimension B."""

    parameters: dict[str, np.ndarray]
    losses: dict[str, np.ndarray]
    landmark_error_px: np.ndarray
    dense_error_px: np.ndarray
    failed: np.ndarray
    reasons: list[str]
    steps: dict[str, int]
    stopped: bool = False


@dataclass
class FitState:
    """What one :meth:`FaceFitter.fit` call tracks across its stages, for a batch of B faces.

    Mutable on purpose: the stages update it in place (a face fails, a stop is requested),
    and every later stage sees the change.

    Members:
        failed: (B,) bool, faces frozen out of the optimisation: invalid inputs, or diverged
            more than ``settings.max_retries`` times. Their loss is zeroed, so they move no
            more and do not steer the others.
        retries: (B,) int64, how many times each face was reset to its start after diverging.
        face_weights: (B,) weight of each face's loss (robust down-weighting; ones by default).
        batch_lr_factor: factor on the step sizes of every photometric stage that starts from
            now on. **Batch-level**: :meth:`FaceFitter._reset_faces` halves it, and the running
            stage's step sizes, for the whole batch whenever any one face diverges (Adam's step
            size belongs to a parameter tensor, which holds all B faces). So a diverging face
            slows its batch mates down; fits of a face can differ between batches that contain
            a diverging face and batches that do not.
        should_stop: polled before every loss evaluation; None never stops.
        stopped: a stop was requested: the running stage ended early and the later ones are skipped.
    """

    failed: torch.Tensor
    retries: torch.Tensor
    face_weights: torch.Tensor
    batch_lr_factor: float = 1.0
    should_stop: Callable[[], bool] | None = None
    stopped: bool = False

    def poll_stop(self) -> bool:
        """True (and ``stopped`` set) when ``should_stop`` asks to stop."""
        if self.should_stop is not None and self.should_stop():
            self.stopped = True
        return self.stopped

    def live_weights(self, dtype: torch.dtype) -> torch.Tensor:
        """(B,) each face's loss weight: ``face_weights``, 0 for failed faces."""
        return (~self.failed).to(dtype) * self.face_weights


class _Stopped(Exception):
    """Raised inside an L-BFGS closure when a stop was requested."""


def _sanitize(targets: FaceTargets) -> tuple[FaceTargets, torch.Tensor]:
    """Replace faces with non-finite inputs by a harmless copy of a valid face; (B,) invalid mask.

    Keeps the batch's arithmetic finite, so a non-finite face cannot reach its batch mates
    through what the batch shares: the one L-BFGS over the summed loss when an identity is
    shared, and the photometric stages' divergence check, which would reset the face and halve
    the whole batch's step size (:meth:`FaceFitter._halve_batch_step`). The invalid faces are
    marked failed, so the copy's result is never reported.
    """
    def finite(x):
        return torch.isfinite(x.flatten(1)).all(dim=1)

    valid = finite(targets.crops) & finite(targets.landmarks68) & finite(targets.attention)
    if targets.dense is not None:
        valid &= finite(targets.dense)
    invalid = ~valid
    if not invalid.any() or not valid.any():
        return targets, invalid
    donor = int(torch.nonzero(valid)[0])

    def fix(x):
        return None if x is None else torch.where(invalid.view(-1, *[1] * (x.dim() - 1)), x[donor:donor + 1], x)

    return FaceTargets(fix(targets.crops), fix(targets.landmarks68), fix(targets.dense), fix(targets.attention),
                       fix(targets.gaze), fix(targets.inner_mouth)), invalid


def initial_parameters(model: FaceModelTensors, targets: FaceTargets, specular: bool = False
                       ) -> dict[str, torch.Tensor]:
    """Safe starting point: mean face, neutral expression, white light, PnP pose; with ``specular``
    also the mean specular albedo and a white light a little above the camera (shininess 16).

    Returns (B, ...) tensors on the targets' device in the model's dtype.
    """
    b, device, dtype = targets.crops.shape[0], targets.crops.device, model.mean_shape.dtype
    k = crop_intrinsics(targets.size)[0].numpy()
    points = model.landmark_points(model.mean_shape[None])[0].detach().cpu().numpy()
    angles, translation = pose_from_landmarks(points, targets.landmarks68.detach().cpu().numpy(), k)
    sh = torch.zeros(b, 27, dtype=dtype, device=device)
    sh[:, [0, 9, 18]] = 1.0 / SH_CONSTANTS[0]  # unit ambient irradiance
    params = {
        "identity": torch.zeros(b, model.n_identity, dtype=dtype, device=device),
        "expression": torch.zeros(b, model.n_expression, dtype=dtype, device=device),
        "albedo": torch.zeros(b, model.n_albedo, dtype=dtype, device=device),
        "sh": sh,
        "angles": torch.as_tensor(angles, dtype=dtype, device=device),
        "translation": torch.as_tensor(translation, dtype=dtype, device=device),
    }
    if specular:
        params |= {
            "specular": torch.zeros(b, model.n_specular, dtype=dtype, device=device),
            "light_direction": torch.tensor(INITIAL_LIGHT_DIRECTION, dtype=dtype, device=device).expand(b, 3).clone(),
            "light_color": torch.ones(b, 3, dtype=dtype, device=device),
            "log_shininess": torch.full((b, 1), math.log(INITIAL_SHININESS), dtype=dtype, device=device),
        }
    return params


def specular_light(model: FaceModelTensors, p: dict[str, torch.Tensor]) -> SpecularLight:
    """The Blinn-Phong light of parameters ``p`` (specular coefficients, light direction, colour and log
    shininess, (B, ...) each): colour clamped to >= 0, shininess to :data:`SHININESS_RANGE`."""
    lo, hi = (math.log(v) for v in SHININESS_RANGE)
    return SpecularLight(model.specular(p["specular"]), p["light_direction"], p["light_color"].clamp_min(0.0),
                         p["log_shininess"][:, 0].clamp(lo, hi).exp())


def _resize(images: torch.Tensor, size: int) -> torch.Tensor:
    """(B, S, S, C) -> (B, size, size, C) with area averaging."""
    if images.shape[1] == size:
        return images
    return F.interpolate(images.permute(0, 3, 1, 2), size=(size, size), mode="area").permute(0, 2, 3, 1)


class FaceFitter:
    """Fits batches of faces with one face model on one device."""

    def __init__(self, model: FaceModelTensors, regions: dict[str, np.ndarray], settings: FitSettings | None = None,
                 oval_indices: np.ndarray | None = None, perceptual=None):
        self.model = model
        self.settings = settings or FitSettings()  # validated by FitSettings itself
        device = model.mean_shape.device
        in_region = np.zeros(model.n_vertices, bool)
        in_region[regions["photometric"]] = True
        if self.settings.exclude_inner_mouth and "inner_mouth" in regions:
            # teeth and tongue are not in the face model's albedo space: leave the mouth
            # opening out of the photometric term (landmarks place the lips)
            in_region[regions["inner_mouth"]] = False
        tris = model.triangles.cpu().numpy()
        self.photo_triangles = torch.as_tensor(tris[in_region[tris].all(axis=1)], device=device)
        self.skin = torch.as_tensor(regions["skin"], dtype=torch.int64, device=device)
        self.lm_weights = (landmark_weights_68_paper002 if self.settings.landmark_weighting == "paper002"
                           else landmark_weights_68)(device=device)
        self.specular = self.settings.shading == "blinn-phong"
        #: the dense points of the inner lip contour: the polygon of the inner-mouth loss
        self.inner_lip_ring = torch.as_tensor(LIPS_INNER, dtype=torch.int64, device=device)
        self.contour68 = torch.zeros(68, dtype=torch.bool, device=device)
        self.contour68[JAW_68] = True
        self.use_dense = self.settings.use_dense_landmarks and model.dense_triangle is not None
        self.contour_dense = torch.zeros(468, dtype=torch.bool, device=device)
        if oval_indices is not None:
            self.contour_dense[torch.as_tensor(oval_indices, dtype=torch.int64)] = True
        self.perceptual = perceptual
        self.opposing = torch.as_tensor(opposing_pairs(model.expression_names), device=device)
        self.gaze_index = torch.as_tensor(gaze_columns(model.expression_names), device=device)
        #: optional callable targets -> starting parameters (a trained network, method "network")
        self.predictor = None
        self.renderers: dict[int, MeshRenderer] = {}

    # ------------------------------------------------------------------ model terms
    def _renderer(self, size: int) -> MeshRenderer:
        if size not in self.renderers:
            self.renderers[size] = MeshRenderer(image_size=(size, size), backend=self.settings.render_backend)
        return self.renderers[size]

    def _contour_visibility(self, cam_points: torch.Tensor, cam_normals: torch.Tensor) -> torch.Tensor:
        """(B, L) weight in [0, 1]: how much a contour point faces the camera (detached)."""
        return (facing_cosine(cam_points, cam_normals) * 4.0).clamp(0.0, 1.0).detach()

    def losses(self, p: dict[str, torch.Tensor], targets: FaceTargets, render_size: int | None
               ) -> dict[str, torch.Tensor]:
        """All loss terms (B,) for parameters ``p``; photometric terms only when ``render_size``.

        total = w_coef * coefficients + w_lan * trust * landmark  (paper 000 eq. 1)
                [+ expression prior (blendshape models)]
                [+ w_photo * photometric + w_tex * texture + w_per * perceptual]
        """
        return self.losses_and_render(p, targets, render_size)[0]

    def losses_and_render(self, p: dict[str, torch.Tensor], targets: FaceTargets, render_size: int | None
                          ) -> tuple[dict[str, torch.Tensor], RenderOutput | None]:
        """:meth:`losses` and the photometric render (None without ``render_size``), for callers
        that reuse its rasterization (the multi-view training terms)."""
        out = None
        m, w, cfg = self.model, self.settings.weights, self.settings
        b = targets.crops.shape[0]
        identity = p["identity"].expand(b, -1)
        verts = m.shape(identity, p["expression"])
        cam = model_to_camera(verts, p["angles"], p["translation"])
        k = crop_intrinsics(targets.size, b, dtype=cam.dtype, device=cam.device)
        normals = vertex_normals(cam, m.triangles)

        terms = {"landmark68": self._landmark68_term(cam, normals, k, targets.landmarks68)}
        landmark = terms["landmark68"]
        if self.use_dense and targets.dense is not None:
            terms["landmark_dense"] = self._dense_landmark_term(cam, normals, k, targets.dense)
            landmark = landmark + cfg.dense_weight * terms["landmark_dense"]
        terms["landmark"] = landmark
        terms["coefficients"] = self._coefficient_term(p, identity)
        if m.expression_kind == "blendshape":
            terms["expression_prior"] = self._expression_prior_term(p["expression"], targets.gaze)
        # photometric_landmark_scale < 1 weakens landmarks once the photometric term is on, by a
        # fixed factor; the adaptive landmark trust does so per face
        landmark_weight = w["landmark"] * (cfg.photometric_landmark_scale if render_size is not None else 1.0)
        total = w["coefficients"] * terms["coefficients"]
        if "expression_prior" in terms:
            total = total + terms["expression_prior"]
        if render_size is not None:
            albedo = m.albedo(p["albedo"])
            terms["texture"] = texture_flatness(albedo, self.skin)
            light = specular_light(m, p) if self.specular else None
            out, target = self._render_at(cam, albedo, p["sh"], targets, render_size, light)
            attention = _resize(targets.attention[..., None], render_size)[..., 0]
            # paper 000 eq. 2 on the final render: the photometric error of every shading
            terms["photometric"] = photometric_loss(out.image, target, out.mask, attention)
            # the same without the skin attention, over every rendered pixel (a report, not optimised)
            terms["photometric_face"] = photometric_loss(out.image.detach(), target, out.mask)
            if self.specular:
                total = total + self._specular_terms(terms, p, out, target, attention)
            else:
                total = total + w["photo"] * terms["photometric"] + w["texture"] * terms["texture"]
            if cfg.landmark_trust_reference > 0:
                terms["landmark_trust"] = landmark_trust(terms["photometric"], cfg.landmark_trust_reference,
                                                         cfg.landmark_trust_power, cfg.landmark_trust_minimum)
                landmark_weight = landmark_weight * terms["landmark_trust"]
        total = total + landmark_weight * landmark
        if self.use_dense and targets.inner_mouth is not None and cfg.inner_mouth_weight > 0:
            terms["inner_mouth"] = self._inner_mouth_term(cam, k, targets.inner_mouth)
            total = total + cfg.inner_mouth_weight * terms["inner_mouth"]
        if render_size is not None and self.perceptual is not None and (
                cfg.perceptual_in_coarse or render_size == targets.size):
            landmarks = scale_pixels(targets.landmarks68, render_size / targets.size)
            terms["perceptual"] = self.perceptual(out.image, target, out.mask, landmarks)
            total = total + w["perceptual"] * terms["perceptual"]
        terms["total"] = total
        return terms, out

    def _specular_terms(self, terms: dict[str, torch.Tensor], p: dict[str, torch.Tensor], out: RenderOutput,
                        target: torch.Tensor, attention: torch.Tensor) -> torch.Tensor:
        """Paper 002's photometric (eq. 8) and uniform (eq. 13) losses into ``terms``; returns their
        weighted sum (B,) plus the specular coefficients' prior.

        eq. 8 = sum_M C ||I - I_diffuse|| / sum_M C + eta sum_M ||I - (I_diffuse + I_specular)|| / |M|,
        C the skin confidence (:func:`skin_confidence` of the skin attention), M the rendered pixels
        that the skin attention counts as face (attention > 0.1). eq. 13 = the variance of the diffuse
        albedo over the skin (paper 000's texture term) + the spread of each SH coefficient over the
        colour channels (:func:`light_chroma`) + the same spread of the specular light's colour.
        """
        cfg, w = self.settings, self.settings.weights
        face = out.mask & (attention > 0.1)
        terms["photometric_diffuse"] = photometric_loss(out.diffuse, target, out.mask, skin_confidence(attention))
        terms["photometric_final"] = photometric_loss(out.image, target, face)
        terms["photometric_002"] = terms["photometric_diffuse"] + cfg.specular_eta * terms["photometric_final"]
        # the light part: a white SH light and a white specular light (the specular light's colour
        # is ours, not the paper's: eq. 5 has none; its spread over R, G, B is penalised the same way)
        colour = p["light_color"]
        terms["uniform"] = terms["texture"] + cfg.uniform_light_weight * (
            light_chroma(p["sh"]) + ((colour - colour.mean(dim=1, keepdim=True)) ** 2).sum(dim=1))
        terms["specular_prior"] = (p["specular"] ** 2).sum(dim=1)
        return (w["photo"] * terms["photometric_002"] + cfg.uniform_weight * terms["uniform"]
                + w["coefficients"] * w["reg_identity"] * cfg.specular_prior * terms["specular_prior"])

    def _inner_mouth_term(self, cam: torch.Tensor, k: torch.Tensor, detected: torch.Tensor) -> torch.Tensor:
        """(B,) paper 002 eq. 11: L1 area between the projected inner-lip polygon and the detected mouth
        opening (B, S, S), in pixels of the crop."""
        ring = project_points(self.model.dense_points(cam)[:, self.inner_lip_ring], k)[..., :2]
        return inner_mouth_loss(ring, detected)

    def _landmark68_term(self, cam: torch.Tensor, normals: torch.Tensor, k: torch.Tensor,
                         detected: torch.Tensor) -> torch.Tensor:
        """(B,) paper 000 eq. 3 on the 68 landmarks; contour points weighted by how they face the camera.

        cam, normals: (B, N, 3) camera-frame vertices and normals; k: (B, 3, 3); detected: (B, 68, 2) px.
        """
        points = self.model.landmark_points(cam)
        weights = self.lm_weights.expand(cam.shape[0], 68)
        visibility = self._contour_visibility(points, self.model.landmark_values(normals))
        weights = torch.where(self.contour68, weights * visibility, weights)
        return landmark_loss(project_points(points, k)[..., :2], detected, weights)

    def _dense_landmark_term(self, cam: torch.Tensor, normals: torch.Tensor, k: torch.Tensor,
                             detected: torch.Tensor) -> torch.Tensor:
        """(B,) mean squared distance of the 468 dense landmarks, face-oval points weighted by visibility.

        detected: (B, 468, 2) px; the mean is over the visibility weights.
        """
        points = self.model.dense_points(cam)
        visibility = self._contour_visibility(points, self.model.dense_values(normals))
        weights = torch.where(self.contour_dense, visibility, torch.ones_like(visibility))
        return landmark_loss(project_points(points, k)[..., :2], detected, valid=weights)

    def _expression_prior_term(self, expression: torch.Tensor, gaze: torch.Tensor | None) -> torch.Tensor:
        """(B,) blendshape prior (sparsity, size, opposing pairs) plus the pull of the eye-look
        weights towards the gaze seen in the irises (B, 8) when given; in total-loss units."""
        cfg = self.settings
        value = blendshape_prior(expression, self.opposing, cfg.expression_l1, cfg.expression_l2,
                                 cfg.expression_opposing)
        if gaze is not None and cfg.gaze_prior > 0:
            value = value + observed_weight_prior(expression, self.gaze_index, gaze, cfg.gaze_prior)
        return value

    def _coefficient_term(self, p: dict[str, torch.Tensor], identity: torch.Tensor) -> torch.Tensor:
        """(B,) paper 000 eq. 5; a shared identity's prior counts once per set or once per photo."""
        w, b = self.settings.weights, identity.shape[0]
        if p["identity"].shape[0] == 1 and b > 1 and self.settings.shared_identity_prior == "per_set":
            # one identity seen in b photos: its prior counts once for the set, not once per photo
            w = dict(w, reg_identity=w["reg_identity"] / b)
        return coefficient_regularizer(identity, p["expression"], p["albedo"], w)

    def _render_at(self, cam: torch.Tensor, albedo: torch.Tensor, sh: torch.Tensor | None, targets: FaceTargets,
                   size: int, light: SpecularLight | None = None):
        """Render the photometric region at ``size`` px; returns (RenderOutput, the crops resized to it)."""
        k = scale_intrinsics(crop_intrinsics(targets.size, cam.shape[0], dtype=cam.dtype, device=cam.device),
                             size / targets.size)
        out = self._renderer(size).render(cam, self.photo_triangles, k, albedo, sh, specular=light)
        return out, _resize(targets.crops, size)

    def solve_light(self, p: dict[str, torch.Tensor], targets: FaceTargets, size: int,
                    ridge: float = 1e-2) -> torch.Tensor:
        """Least-squares coloured SH (B, 27) for the current geometry and albedo.

        The shaded colour is linear in the SH coefficients (albedo_c * Y(n) . gamma_c), so
        light has a closed-form ridge solution per face and channel, weighted by the skin
        attention; the ridge pulls towards the current estimate.
        """
        m, b = self.model, targets.crops.shape[0]
        with torch.no_grad():
            verts = m.shape(p["identity"].expand(b, -1), p["expression"])
            cam = model_to_camera(verts, p["angles"], p["translation"])
            out, target = self._render_at(cam, m.albedo(p["albedo"]), None, targets, size)
            basis = sh_basis(out.normals).flatten(1, 2)  # (B, P, 9)
            colour = out.image.flatten(1, 2)  # (B, P, 3) interpolated albedo
            target = target.flatten(1, 2)
            weight = (out.mask.to(colour.dtype) * _resize(targets.attention[..., None], size)[..., 0]).flatten(1)
            design = colour.transpose(1, 2)[..., None] * basis[:, None]  # (B, 3, P, 9)
            wd = design * weight[:, None, :, None]
            normal_matrix = wd.transpose(2, 3) @ design  # (B, 3, 9, 9)
            rhs = (wd * target.transpose(1, 2)[..., None]).sum(dim=2)  # (B, 3, 9)
            current = p["sh"].reshape(b, 3, 9)
            scale = weight.sum(dim=1).clamp_min(1.0)[:, None, None, None] * ridge
            eye = torch.eye(9, dtype=colour.dtype, device=colour.device)
            solved = torch.linalg.solve(normal_matrix + scale * eye, rhs + (scale[..., 0] * current))
            ok = torch.isfinite(solved).all(dim=2, keepdim=True)
            return torch.where(ok, solved, current).reshape(b, 27)

    #: candidate lights of :meth:`solve_specular`: directions towards the light over the front
    #: half-space (camera frame, up to ~60 degrees off the view axis) and shininess values
    SPECULAR_DIRECTIONS = tuple((x, y, -1.0) for y in (-1.5, -1.0, -0.6, -0.3, 0.0, 0.3, 0.6, 1.0)
                                for x in (-1.5, -1.0, -0.6, -0.3, 0.0, 0.3, 0.6, 1.0, 1.5))
    SPECULAR_SHININESS = (8.0, 16.0, 32.0, 64.0)

    def solve_specular(self, p: dict[str, torch.Tensor], targets: FaceTargets, size: int) -> dict[str, torch.Tensor]:
        """Start paper 002's light where the photo's highlights are: the direction, shininess and grey
        intensity that best explain what the diffuse render leaves, by least squares over a grid.

        A Blinn-Phong lobe is narrow, so gradient descent on the light direction only moves a
        highlight that already overlaps the photo's: each candidate (direction x shininess) is
        scored by how much the optimal intensity alpha = <r, S> / <S, S> (alpha >= 0) of its
        specular image S lowers the squared residual r = photo - diffuse render over the rendered
        face (weighted by the skin attention's complement floor, so highlights, which the colour
        model does not call skin, count). Faces whose best candidate explains nothing keep ``p``'s light.

        Returns:
            ``light_direction`` (B, 3), ``light_color`` (B, 3) and ``log_shininess`` (B, 1).
        """
        m, b = self.model, targets.crops.shape[0]
        with torch.no_grad():
            verts = m.shape(p["identity"].expand(b, -1), p["expression"])
            cam = model_to_camera(verts, p["angles"], p["translation"])
            out, target = self._render_at(cam, m.albedo(p["albedo"]), p["sh"], targets, size)
            k = scale_intrinsics(crop_intrinsics(targets.size, b, dtype=cam.dtype, device=cam.device),
                                 size / targets.size)
            t_s = interpolate(m.specular(p["specular"]), self.photo_triangles, out.fragments)  # (B, H, W, 3)
            rows, cols = torch.meshgrid(torch.arange(size, dtype=cam.dtype, device=cam.device),
                                        torch.arange(size, dtype=cam.dtype, device=cam.device), indexing="ij")
            rays = torch.stack([(cols[None] - k[:, 0, 2, None, None]) / k[:, 0, 0, None, None],
                                (rows[None] - k[:, 1, 2, None, None]) / k[:, 1, 1, None, None],
                                torch.ones(b, size, size, dtype=cam.dtype, device=cam.device)], dim=-1)
            view = -rays / rays.norm(dim=-1, keepdim=True)  # (B, H, W, 3) towards the camera
            lights = F.normalize(torch.tensor(self.SPECULAR_DIRECTIONS, dtype=cam.dtype, device=cam.device), dim=-1)
            half = F.normalize(view.flatten(1, 2)[:, :, None] + lights[None, None], dim=-1)  # (B, P, L, 3)
            normals = out.normals.flatten(1, 2)[:, :, None]
            cosine = (normals * half).sum(-1).clamp_min(0) * ((normals * lights[None, None]).sum(-1) > 0)
            phi = torch.tensor(self.SPECULAR_SHININESS, dtype=cam.dtype, device=cam.device)
            lobe = cosine[..., None] ** phi  # (B, P, L, J)
            weight = out.mask.flatten(1).to(cam.dtype)  # (B, P)
            residual = (target - out.image).flatten(1, 2)  # (B, P, 3)
            albedo = t_s.flatten(1, 2)
            numerator = torch.einsum("bp,bpc,bpc,bplj->blj", weight, residual, albedo, lobe)
            denominator = torch.einsum("bp,bpc,bplj->blj", weight, albedo * albedo, lobe * lobe).clamp_min(1e-9)
            gain = (numerator / denominator).clamp_min(0.0)
            explained = (gain * numerator).flatten(1)  # (B, L * J): the drop of the squared residual
            best = explained.argmax(dim=1)
            li, ji = best // len(self.SPECULAR_SHININESS), best % len(self.SPECULAR_SHININESS)
            useful = explained.gather(1, best[:, None])[:, 0] > 0
            intensity = gain.flatten(1).gather(1, best[:, None]).clamp(0.05, 5.0)
            return {
                "light_direction": torch.where(useful[:, None], lights[li], p["light_direction"]),
                "light_color": torch.where(useful[:, None], intensity.expand(b, 3), p["light_color"]),
                "log_shininess": torch.where(useful[:, None], phi[ji].log()[:, None], p["log_shininess"]),
            }

    # ------------------------------------------------------------------ optimisation
    #: Adam step size of each variable as a multiple of ``settings.learning_rate``, so that one
    #: step moves each by a comparable amount (model units: mm for ICT, radians, coefficient
    #: standard deviations, SH coefficients). Hand-set with the default learning rate 0.03 when
    #: the fitter was written (commits 7c4f1c8, 61236e7; no tuning record kept); check changes
    #: with benchmarks/fit.py and tests/test_fit.py.
    ADAM_STEP_SCALES = {"translation": 50.0, "angles": 1.0, "sh": 1.0, "identity": 3.0, "expression": 1.0,
                        "albedo": 3.0, "specular": 3.0, "light_direction": 1.0, "light_color": 1.0,
                        "log_shininess": 2.0}
    #: the same in the photometric stages: landmarks already fixed the pose, so the photometric
    #: stages only refine it (translation 10, angles 0.2)
    PHOTOMETRIC_STEP_SCALES = {**ADAM_STEP_SCALES, "translation": 10.0, "angles": 0.2}

    def _run_stage(self, params: dict[str, torch.Tensor], start: dict[str, torch.Tensor], targets: FaceTargets,
                   names: tuple[str, ...], steps: int, render_size: int | None, state: FitState) -> int:
        """One photometric stage: Adam on ``names`` for at most ``steps`` steps; returns the steps taken.

        Keeps each face's best parameters (a stage never returns a face worse than it was
        given) and stops when every live face has not improved for ``patience`` steps.
        """
        if steps <= 0 or state.stopped:
            return 0
        cfg = self.settings
        scale = self.PHOTOMETRIC_STEP_SCALES if render_size is not None else self.ADAM_STEP_SCALES
        tensors = {n: params[n].detach().clone().requires_grad_(True) for n in names}
        optimizer = Adam(
            [{"params": [tensors[n]], "lr": cfg.learning_rate * scale[n] * state.batch_lr_factor} for n in names])
        # cosine decay to 5 % of the step size: large moves first, then settle
        schedule = LambdaSchedule(
            optimizer, lambda i: min(1.0, (i + 1) / (cfg.warmup_steps + 1)) *
            (0.05 + 0.95 * 0.5 * (1.0 + math.cos(math.pi * min(i, steps) / steps))))
        b = targets.crops.shape[0]
        device = targets.crops.device
        # per face: the best parameters seen (Adam's first steps after a restart can make things
        # worse; a stage never returns a face worse than it was given) and a convergence count
        best_value = torch.full((b,), math.inf, dtype=targets.crops.dtype, device=device)
        best = {n: t.detach().clone() for n, t in tensors.items()}
        stale = torch.zeros(b, dtype=torch.int64, device=device)
        shared = any(t.shape[0] != b for t in tensors.values())
        first_value = torch.full((b,), math.inf, dtype=targets.crops.dtype, device=device)
        done = 0
        for step in range(steps):
            if state.poll_stop():
                break
            current = {**params, **tensors}
            terms = self.losses(current, targets, render_size)
            total = terms["total"]
            bad = ~torch.isfinite(total) & ~state.failed
            for t in tensors.values():
                bad |= ~torch.isfinite(t.detach()).all(dim=1)
            # an exploding loss counts as diverging too, before it overflows
            bad |= (total.detach() > EXPLODING_LOSS_FACTOR * first_value) & ~state.failed
            if bad.any():
                self._reset_faces(bad, tensors, start, optimizer, state)
                continue
            with torch.no_grad():
                value = total.detach()
                first_value = torch.where(torch.isfinite(first_value), first_value, value.abs().clamp_min(1e-6))
                improved = (value < best_value * (1.0 - cfg.tolerance)) & ~state.failed
                if shared:  # one identity for all faces: the best step of the batch as a whole
                    live = ~state.failed
                    better = ((value[live].sum() < best_value[live].sum()) | ~torch.isfinite(best_value[live]).all()
                              ).expand(b)
                else:
                    better = value < best_value
                for n, t in tensors.items():
                    best[n] = torch.where(better[:, None], t.detach(), best[n]) if t.shape[0] == b else \
                        torch.where(better[:1, None], t.detach(), best[n])
                best_value = torch.where(better, value, best_value)
                stale = torch.where(improved, torch.zeros_like(stale), stale + 1)
            total = torch.where(state.failed, torch.zeros_like(total), total)
            active = state.live_weights(total.dtype)
            optimizer.zero_grad(set_to_none=True)
            (total * active).sum().backward()
            optimizer.step()
            schedule.step()
            with torch.no_grad():
                if self.model.expression_kind == "blendshape" and "expression" in tensors:
                    tensors["expression"].clamp_(0.0, 1.0)
            done = step + 1
            if bool(((stale >= cfg.patience) | state.failed).all()):
                break
        for n in names:
            params[n] = best[n]
        return done

    #: The landmark stage's variables and the size of one L-BFGS unit of each, so that a unit
    #: step moves the projected landmarks by a comparable amount for all of them: 0.1 rad
    #: (~6 degrees) of rotation, 10 model units (mm for ICT) of translation, 1 standard deviation
    #: of an identity coefficient, 0.1 of an expression weight (blendshapes span [0, 1]).
    #: Hand-set when the fitter was written (commit 61236e7; no tuning record kept); L-BFGS runs
    #: with lr 1 in these units. Check changes with benchmarks/fit.py and tests/test_fit.py.
    LANDMARK_UNITS = {"angles": 0.1, "translation": 10.0, "identity": 1.0, "expression": 0.1}

    def _landmark_losses(self, params: dict[str, torch.Tensor], scaled: dict[str, torch.Tensor],
                         targets: FaceTargets, state: FitState) -> torch.Tensor:
        """(B,) weighted landmark-stage losses at the scaled variables ``scaled`` (failed faces 0);
        polls ``should_stop`` first."""
        if state.poll_stop():
            raise _Stopped
        current = {**params, **{n: v * self.LANDMARK_UNITS[n] for n, v in scaled.items()}}
        if self.model.expression_kind == "blendshape":
            current["expression"] = current["expression"].clamp(0.0, 1.0)
        total = self.losses(current, targets, None)["total"]
        return total * state.live_weights(total.dtype)

    def _store_landmark_result(self, params: dict[str, torch.Tensor], start: dict[str, torch.Tensor],
                               scaled: dict[str, torch.Tensor]) -> None:
        """Unscale the landmark stage's variables into ``params``; non-finite faces get ``start``."""
        with torch.no_grad():
            for n, v in scaled.items():
                value = v * self.LANDMARK_UNITS[n]
                if n == "expression" and self.model.expression_kind == "blendshape":
                    value = value.clamp(0.0, 1.0)
                bad = ~torch.isfinite(value).all(dim=1)
                params[n] = torch.where(bad[:, None], start[n], value).detach()

    def _run_landmark_stage(self, params: dict[str, torch.Tensor], start: dict[str, torch.Tensor],
                            targets: FaceTargets, steps: int, state: FitState) -> int:
        """Pose, identity and expression from landmarks with L-BFGS.

        Landmark fitting is small and badly conditioned (pitch trades against identity
        modes), where a quasi-Newton method converges in a few dozen evaluations and Adam
        needs hundreds. Every face has its own L-BFGS (:func:`batched_lbfgs`), so a face's fit
        does not depend on the other faces of its batch; a parameter shared by the batch (the
        joint aggregation's identity) couples the faces, and then one L-BFGS over the sum of
        their losses is the right problem.
        """
        if steps <= 0 or state.stopped:
            return 0
        names = tuple(self.LANDMARK_UNITS)
        b = targets.crops.shape[0]
        calls = [0]
        if all(params[n].shape[0] == b for n in names):
            sizes = [params[n].shape[1] for n in names]

            def unpack(x: torch.Tensor) -> dict[str, torch.Tensor]:
                return dict(zip(names, torch.split(x, sizes, dim=1)))

            def evaluate(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
                calls[0] += 1
                x = x.detach().requires_grad_(True)
                total = self._landmark_losses(params, unpack(x), targets, state)
                (gradient,) = torch.autograd.grad(total.sum(), x)
                return total.detach(), gradient

            x0 = torch.cat([params[n] / self.LANDMARK_UNITS[n] for n in names], dim=1).detach()
            try:
                x, evaluations = batched_lbfgs(evaluate, x0, max_evaluations=steps)
            except _Stopped:
                return calls[0]
            self._store_landmark_result(params, start, unpack(x))
            return evaluations
        scaled = {n: (params[n] / self.LANDMARK_UNITS[n]).detach().clone().requires_grad_(True) for n in names}
        optimizer = torch.optim.LBFGS(list(scaled.values()), lr=1.0, max_iter=steps, max_eval=steps,
                                      history_size=30,
                                      tolerance_grad=1e-9, tolerance_change=1e-12, line_search_fn="strong_wolfe")

        def closure():
            calls[0] += 1
            optimizer.zero_grad(set_to_none=True)
            total = self._landmark_losses(params, scaled, targets, state)
            loss = torch.where(torch.isfinite(total), total, torch.zeros_like(total)).sum()
            loss.backward()
            return loss

        try:
            optimizer.step(closure)
        except _Stopped:
            return calls[0]
        self._store_landmark_result(params, start, scaled)
        return calls[0]

    def _reset_faces(self, bad: torch.Tensor, tensors: dict[str, torch.Tensor], start: dict[str, torch.Tensor],
                     optimizer: Adam, state: FitState) -> None:
        """Restart diverged faces ``bad`` (B,) from the safe start; freeze those out of retries.

        Then halve the step size of the whole batch (:meth:`_halve_batch_step`): a batch-level
        coupling, see :attr:`FitState.batch_lr_factor`.
        """
        with torch.no_grad():
            for n, t in tensors.items():
                if t.shape[0] != bad.shape[0]:
                    continue  # shared across faces (joint identity): not one face's to reset
                t[bad] = start[n][bad]
                opt_state = optimizer.state.get(t, {})
                for key in ("exp_avg", "exp_avg_sq"):
                    if key in opt_state:
                        opt_state[key][bad] = 0.0
            state.retries[bad] += 1
            state.failed |= bad & (state.retries > self.settings.max_retries)
        self._halve_batch_step(optimizer, state)

    @staticmethod
    def _halve_batch_step(optimizer: Adam, state: FitState) -> None:
        """Halve the step size of every face of the batch, now and in the later stages.

        Batch-level on purpose (Adam's step size belongs to a parameter tensor that holds all B
        faces): one diverging face slows its batch mates down. Per-face step sizes would need a
        per-row gradient scaling and change every fit that has a divergence in its batch.
        """
        for group in optimizer.param_groups:
            group["lr"] *= 0.5
        state.batch_lr_factor *= 0.5

    def _debiased(self, targets: FaceTargets, angles: torch.Tensor) -> FaceTargets:
        """``targets`` with the detector's expected offsets at poses ``angles`` (B, 3) removed."""
        with torch.no_grad():
            offsets68, offsets_dense = self.model.detector_offsets(
                angles, targets.size, relative_to_frontal=self.settings.detector_bias_mode == "pose")
            if not self.settings.detector_bias_contour:
                offsets68 = torch.where(self.contour68[:, None], torch.zeros_like(offsets68), offsets68)
                if offsets_dense is not None:
                    offsets_dense = torch.where(self.contour_dense[:, None], torch.zeros_like(offsets_dense),
                                                offsets_dense)
        dense = targets.dense
        if dense is not None and offsets_dense is not None:
            dense = dense - offsets_dense
        return FaceTargets(targets.crops, targets.landmarks68 - offsets68, dense, targets.attention, targets.gaze,
                           targets.inner_mouth)

    def fit(self, targets: FaceTargets, shared_identity: bool = False,
            init: dict[str, torch.Tensor] | None = None, face_weights: torch.Tensor | None = None,
            should_stop=None, refit_landmarks: bool = False) -> FitResult:
        """Fit every face of ``targets``; returns per-face parameters and diagnostics.

        Args:
            targets: the batch.
            shared_identity: one identity for all faces (photos of one person, joint
                aggregation); its prior counts once for the set or once per photo, as
                ``settings.shared_identity_prior`` says.
            init: starting parameters (B, ...) instead of the PnP / mean-face start; the
                landmark stage is skipped when given, unless ``refit_landmarks``.
            face_weights: (B,) weights of each face's loss (robust down-weighting).
            should_stop: polled between optimisation steps; when it returns True the fit
                ends early and the result has ``stopped = True`` (not a finished fit).
            refit_landmarks: run the landmark stage (and its detector-bias rounds) from
                ``init`` too: a joint fit solves its shared identity from all photos' landmarks.
        """
        cfg = self.settings
        # the fit runs in the model's dtype (float64 model: float64 fit)
        targets, invalid = _sanitize(targets.to(dtype=self.model.mean_shape.dtype))
        b = targets.crops.shape[0]
        start = initial_parameters(self.model, targets, specular=self.specular)
        if init is not None:
            start = {n: torch.as_tensor(init[n], dtype=start[n].dtype, device=start[n].device).clone()
                     if n in init else start[n] for n in start}
        if shared_identity:
            start["identity"] = start["identity"].mean(dim=0, keepdim=True)
        params = {n: t.clone() for n, t in start.items()}
        device, dtype = targets.crops.device, self.model.mean_shape.dtype
        weights = torch.ones(b, dtype=dtype, device=device) if face_weights is None else \
            torch.as_tensor(face_weights, dtype=dtype, device=device)
        state = FitState(failed=invalid.clone(), retries=torch.zeros(b, dtype=torch.int64, device=device),
                         face_weights=weights, should_stop=should_stop)
        raw_targets = targets
        landmark_stage = init is None or refit_landmarks
        steps = {
            "landmarks": self._run_landmark_stage(params, start, targets, cfg.landmark_steps if landmark_stage else 0,
                                                  state),
        }
        if cfg.detector_bias_iterations > 0 and self.model.has_detector_bias:
            # the detector's offsets depend on the pose, which depends on the corrected
            # landmarks: alternate (a fixed point in a few rounds); without a landmark stage
            # the given pose decides
            rounds = cfg.detector_bias_iterations if landmark_stage else 1
            for _ in range(rounds):
                targets = self._debiased(raw_targets, params["angles"])
                if landmark_stage:
                    steps["landmarks"] += self._run_landmark_stage(params, start, targets, cfg.detector_bias_steps,
                                                                   state)
        coarse = min(cfg.coarse_size, targets.size)
        if cfg.coarse_steps > 0 or cfg.fine_steps > 0:
            params["sh"] = self.solve_light(params, targets, coarse)
            if self.specular and init is None:
                params |= self.solve_specular(params, targets, coarse)
        steps |= {
            "coarse": self._run_stage(params, start, targets, cfg.parameter_names, cfg.coarse_steps, coarse, state),
            "fine": self._run_stage(params, start, targets, cfg.parameter_names, cfg.fine_steps, targets.size, state),
        }
        with torch.no_grad():
            terms = self.losses(params, targets, targets.size)
            params["identity"] = params["identity"].expand(b, -1)
            verts = self.model.shape(params["identity"], params["expression"])
            cam = model_to_camera(verts, params["angles"], params["translation"])
            # reprojection errors against the detector's own landmarks, corrected or not
            proj = project_points(self.model.landmark_points(cam),
                                  crop_intrinsics(targets.size, b, dtype=cam.dtype, device=cam.device))
            error = (proj[..., :2] - raw_targets.landmarks68).norm(dim=-1).mean(dim=1)
            dense_error = torch.full_like(error, float("nan"))
            if self.model.dense_triangle is not None and raw_targets.dense is not None:
                dense_proj = project_points(self.model.dense_points(cam),
                                            crop_intrinsics(targets.size, b, dtype=cam.dtype, device=cam.device))
                dense_error = (dense_proj[..., :2] - raw_targets.dense).norm(dim=-1).mean(dim=1)
            finite = torch.isfinite(terms["total"]) & torch.isfinite(verts).flatten(1).all(dim=1)
            finite &= cam[..., 2].min(dim=1).values > 0
        failed = state.failed | ~finite | invalid
        reasons = []
        for i in range(b):
            if bool(invalid[i]):
                reasons.append("invalid detection (non-finite landmarks or crop)")
            elif not bool(finite[i]):
                reasons.append("optimisation diverged (non-finite result or face behind the camera)")
            elif bool(state.failed[i]):
                reasons.append(f"optimisation diverged {int(state.retries[i])} times")
            else:
                reasons.append("")
        return FitResult(
            parameters={n: t.detach().cpu().numpy() for n, t in params.items()},
            losses={n: t.detach().cpu().numpy() for n, t in terms.items()},
            landmark_error_px=error.cpu().numpy(),
            dense_error_px=dense_error.cpu().numpy(),
            failed=failed.cpu().numpy(),
            reasons=reasons,
            steps=steps,
            stopped=state.stopped,
        )
