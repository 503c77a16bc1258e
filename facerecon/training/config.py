"""Training configuration: TOML, validated with one-line messages naming the bad key.

``facerecon train --print-config`` writes :data:`DEFAULT_CONFIG_TEXT`, a fully commented
default; docs/training.md describes every key.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from facerecon.errors import InputError
from facerecon.losses.hybrid import PAPER000_WEIGHTS
from facerecon.losses.multiview import PAPER001_WEIGHTS
from facerecon.losses.specular import PAPER002_WEIGHTS
from facerecon.networks.resnet import ARCHITECTURES
from facerecon.training.augment import AugmentSettings

DEFAULT_CONFIG_TEXT = '''\
# facerecon training configuration (TOML). Paths are relative to this file.

[data]
# Detections files written by `facerecon detect` (aligned crops, landmarks, skin attention),
# and/or image folders, which are detected first into <output>/detections.h5.
detections = []
images = []
# Fraction of faces held out for validation (deterministic; by identity group when grouped,
# else by image).
validation_fraction = 0.1
# Identity groups for multi-view training (paper 001):
#   "none"   - every image on its own; paper 000 training only;
#   "folder" - images in the same sub-folder are one identity (the parent folder of the
#              image's relative path; images at the top of an input folder join no group);
#   "synth"  - the identity recorded by `facerecon synth` in the synth.h5 beside (or in) the
#              image's folder.
group_by = "none"
# Views of one identity per batch entry when grouped (paper 001 uses 3); optim.batch_size
# counts images and must be a multiple of it. Groups with fewer images are not trained on.
views_per_identity = 3

[model]
# Face model: a name in the data directory or a path to a .h5 face model.
face_model = "ict"

[network]
# resnet50 as in paper 000; resnet18 for fast CPU use and tests.
architecture = "resnet50"
# Optional torchvision-layout ImageNet weights you own (the final layer is not loaded).
init = ""

[loss]
# Paper 000 sec. 4.3 weights.
photo = 1.9
landmark = 1.6e-3
coefficients = 3e-4
texture = 5.0
# Dense 468-landmark term (multiplies the mean squared dense error), as in `fit`.
dense = 20.0
# Render size of the photometric term (pixels).
render_size = 112
# "lambert" (paper 000) or "blinn-phong" (paper 002): R-Net also predicts the specular albedo
# coefficients, the light's direction and colour and the shininess, trained with paper 002's
# losses (those of `fit --shading blinn-phong`). With "blinn-phong" the weights above default
# to paper 002's (photo 1.92, landmark 1.8e-3, coefficients 5e-4) unless set here.
shading = "lambert"

[multiview]
# Paper 001 (MGCNet) sec. 3.8 eq. 6 weights; used only when data.group_by is not "none".
# weight = w_mul; pixel consistency (eq. 3, L1 of [0, 1] RGB), dense depth consistency
# (eq. 4, depth in mm) and landmark epipolar loss (eq. 5, pixels summed over 68 points).
weight = 1.0
pixel = 0.15
depth = 1e-4
epipolar = 1e-3
# Depth maps and covisible maps are rendered at loss.render_size.

[optim]
learning_rate = 1e-4   # Adam, paper 000
# Images per step over all processes (a multiple of the process count, and of
# data.views_per_identity when grouped).
batch_size = 8
steps = 1000
seed = 0
# Mixed precision of the network: "auto" (bf16 on CUDA, off on CPU), "off", "bf16", "fp16"
# (fp16 uses a gradient scaler). Rendering and losses always run in float32.
amp = "auto"
# channels_last memory format for the network: "auto" (on for CUDA), "on", "off".
channels_last = "auto"

[augment]
# Random shift (fraction of the crop), scale (+-), rotation (degrees) and horizontal flip
# of training crops; landmarks follow, left and right swap on a flip.
enabled = true
shift = 0.05
scale = 0.1
rotation_degrees = 10.0
flip = true

[cnet]
# Paper 000 sec. 5: train C-Net, the confidence network that aggregates the identity of several
# photos of one person (eq. 7), instead of R-Net. R-Net (rnet_checkpoint) stays frozen; the
# loss is eq. 8: the hybrid loss of every image rendered with the aggregated identity and its
# own expression, albedo, light and pose. Needs data.group_by = "folder" or "synth". When
# enabled, the settings below replace optim.learning_rate, optim.batch_size, optim.steps,
# loss.photo and loss.landmark and data.views_per_identity; use an output.directory of its own.
enabled = false
# A `facerecon train` R-Net checkpoint (its weights are copied into every C-Net checkpoint).
rnet_checkpoint = ""
# Images of one identity aggregated together (paper: 5); groups with fewer are not trained on.
images_per_identity = 5
# Identities per step (paper: batch size 5 = one identity of 5 images).
identities_per_batch = 1
learning_rate = 2e-5   # Adam, paper
steps = 10000          # paper: 10K iterations
# Eq. 8 weights of the multi-image stage (paper: w_lm 1.6e-3, w_photo 1.9, w_id 0.1); the
# regularisers keep loss.coefficients and loss.texture.
photo = 1.9
landmark = 1.6e-3
perceptual = 0.1
# ArcFace IR-ResNet backbone.pth you own for the perceptual (identity) term; without it the
# term is off.
recognition_weights = ""
# Also aggregate the albedo coefficients (not in the paper, which bypasses texture).
aggregate_albedo = false

[lap]
# Paper 003 (LAP), networks route: train the aggregation networks (Phi^d, Phi^a), pose, light
# and confidence networks (Phi^omega, Phi^l, Phi^sigma) and the attribute-refining networks on
# photo collections grouped by person, in the three steps of sec. 4.3 (docs/training.md). Needs
# data.group_by = "folder" or "synth". When enabled, the settings below replace optim.learning_rate,
# optim.batch_size, optim.steps and the [loss]/[multiview]/[augment] settings; use an
# output.directory of its own. Use the checkpoint with `facerecon aggregate --method lap --checkpoint`.
enabled = false
# Network input side and canonical grid side (64 or 128; paper: 128 for aggregation).
image_size = 64
# Channels of the first level of every encoder (paper / Unsup3D: 64), and of the codes x_i.
width = 64
code_size = 256
# Albums (identities) per step, and the album size drawn per album and step: 1 to this (paper: 6).
identities_per_batch = 4
max_album_size = 6
# Steps of the three training steps (sec. 4.3): 1. aggregation + pose/light/confidence networks
# with the relaxed consistency loss (eq. 5, and its flipped version); 2. those frozen, the
# attribute-refining networks with eq. 3; 3. all networks together (both losses).
aggregate_steps = 2000
personalise_steps = 2000
finetune_steps = 1000
learning_rate = 1e-4   # Adam, paper
# M_re of eyes, brows and mouth (paper: e.g. 0.3) and the weight of the flipped render's loss.
relaxed_weight = 0.3
flip_weight = 1.0
# Weak anchor (not in the paper): squared px (at 128 px) between the detected inner landmarks and
# the canonical ones projected with the predicted pose; 0 turns it off.
landmark = 2e-3
# Depth the depth decoder adds to: "mean_face" (the face model's mean face on the grid) or "flat".
depth_template = "mean_face"

[correctives]
# Paper 004 (multi-level face model learning): R-Net also regresses the coefficients delta_g,
# delta_r of a linear corrective level (per-vertex geometry and reflectance corrections on the
# face model's rendered region). Schedule (paper sec. 7): `base_steps` of base-level
# pre-training, then `steps` of fine-tuning with the multi-level loss (the base-level loss plus
# the final level's photometric term and corrective regularisers, as `fit --level final`).
# When enabled these replace optim.learning_rate and optim.steps (total = base_steps + steps).
enabled = false
# "learn": the corrective space Theta is trained with the network (paper), starting from the face
# model's corrective space when it has one, else from smooth random fields with the sizes below;
# "model": the face model's corrective space, fixed (the model needs one).
space = "learn"
geometry_modes = 500      # paper: C = 500 (used when the space is not the model's)
reflectance_modes = 500
base_steps = 200000       # paper: 200k iterations up to the base level
steps = 190000            # paper: 190k iterations of fine-tuning
# "adadelta" (paper; rho 0.95) or "adam". The learning rates are the paper's AdaDelta ones.
optimizer = "adadelta"
base_learning_rate = 0.01        # pre-training
learning_rate = 0.001            # fine-tuning: the network up to the base level
geometry_learning_rate = 0.005   # fine-tuning: geometry head and Theta_g
reflectance_learning_rate = 0.01 # fine-tuning: reflectance head and Theta_r
# A `facerecon train` R-Net checkpoint of the same face model to start from (e.g. paper 000
# training as the base-level pre-training; then set base_steps = 0); "" starts from scratch.
base_checkpoint = ""
# The final level's weights (those of `fit --level final`, docs/fitting.md "Correctives"):
# eq. 12 smoothness, eq. 15 stabilization, eq. 13 reflectance sparsity, eq. 14 skin constancy,
# and the coefficient prior ||delta||^2 that fixes the scale between delta and Theta.
smoothness = 0.01
stabilization = 0.002
sparsity = 0.1
constancy = 1.0
coefficient_prior = 1e-3

[distributed]
# Used when launched by torchrun (WORLD_SIZE > 1): "auto" (nccl on CUDA, gloo on CPU),
# "nccl" or "gloo"; minutes a process waits for the others (e.g. while rank 0 detects faces).
backend = "auto"
timeout_minutes = 60

[output]
directory = "runs/rnet"
checkpoint_every = 200
preview_every = 200
validate_every = 200
'''


def _paper001_weights() -> dict[str, float]:
    return dict(PAPER001_WEIGHTS)


class ConfigError(InputError):
    """A configuration problem, described in one line naming the key."""


@dataclass
class CNetSettings:
    """``[cnet]`` of an enabled C-Net run (paper 000 sec. 5). The run's batch, steps, learning
    rate, loss weights and views per identity in :class:`TrainConfig` already hold the C-Net
    values; these are the rest."""

    rnet_checkpoint: Path
    images_per_identity: int
    identities_per_batch: int
    recognition_weights: Path | None
    aggregated: tuple[str, ...]


@dataclass
class LapTrainSettings:
    """``[lap]`` of an enabled LAP run (paper 003, networks route); the steps of the three
    training steps and the learning rate are also in :class:`TrainConfig` (``steps`` is their sum)."""

    image_size: int
    width: int
    code_size: int
    identities_per_batch: int
    max_album_size: int
    aggregate_steps: int
    personalise_steps: int
    finetune_steps: int
    relaxed_weight: float
    flip_weight: float
    landmark: float
    depth_template: str

    def phase(self, step: int) -> int:
        """Training step (1, 2 or 3 of sec. 4.3) of a 0-based global step."""
        if step < self.aggregate_steps:
            return 1
        return 2 if step < self.aggregate_steps + self.personalise_steps else 3


@dataclass
class CorrectiveTrainSettings:
    """``[correctives]`` of an enabled run (paper 004). The run's ``steps`` in :class:`TrainConfig`
    already hold ``base_steps + steps``; ``learning_rate`` the pre-training rate."""

    space: str
    geometry_modes: int
    reflectance_modes: int
    base_steps: int
    optimizer: str
    base_learning_rate: float
    learning_rate: float
    geometry_learning_rate: float
    reflectance_learning_rate: float
    base_checkpoint: Path | None
    weights: dict[str, float]


@dataclass
class TrainConfig:
    detections: list[Path]
    images: list[Path]
    validation_fraction: float
    face_model: str
    architecture: str
    init: Path | None
    weights: dict[str, float]
    dense_weight: float
    render_size: int
    learning_rate: float
    batch_size: int
    steps: int
    seed: int
    output: Path
    checkpoint_every: int
    preview_every: int
    validate_every: int
    augment: Any
    source: dict[str, Any]
    group_by: str = "none"
    views_per_identity: int = 1
    multiview_weights: dict[str, float] = field(default_factory=lambda: _paper001_weights())
    amp: str = "auto"
    channels_last: str = "auto"
    dist_backend: str = "auto"
    dist_timeout_minutes: float = 60.0
    #: C-Net training settings (``[cnet] enabled``), None when training R-Net
    cnet: CNetSettings | None = None
    #: LAP training settings (``[lap] enabled``), None otherwise
    lap: LapTrainSettings | None = None
    #: "lambert" (paper 000) or "blinn-phong" (paper 002: R-Net predicts the specular unknowns)
    shading: str = "lambert"
    #: paper 004 corrective-level settings (``[correctives] enabled``), None without
    correctives: CorrectiveTrainSettings | None = None

    @property
    def grouped(self) -> bool:
        """True when batches are built from identity groups and the multi-view terms are on."""
        return self.group_by != "none"

    def to_dict(self) -> dict[str, Any]:
        return self.source


_NUMBER = (int, float)

_SCHEMA: dict[str, dict[str, type | tuple]] = {
    "data": {"detections": list, "images": list, "validation_fraction": _NUMBER, "group_by": str,
             "views_per_identity": int},
    "model": {"face_model": str},
    "network": {"architecture": str, "init": str},
    "loss": {"photo": _NUMBER, "landmark": _NUMBER, "coefficients": _NUMBER, "texture": _NUMBER,
             "dense": _NUMBER, "render_size": int, "shading": str},
    "multiview": {"weight": _NUMBER, "pixel": _NUMBER, "depth": _NUMBER, "epipolar": _NUMBER},
    "optim": {"learning_rate": _NUMBER, "batch_size": int, "steps": int, "seed": int, "amp": str,
              "channels_last": str},
    "augment": {"enabled": bool, "shift": _NUMBER, "scale": _NUMBER, "rotation_degrees": _NUMBER,
                "flip": bool},
    "cnet": {"enabled": bool, "rnet_checkpoint": str, "images_per_identity": int, "identities_per_batch": int,
             "learning_rate": _NUMBER, "steps": int, "photo": _NUMBER, "landmark": _NUMBER, "perceptual": _NUMBER,
             "recognition_weights": str, "aggregate_albedo": bool},
    "lap": {"enabled": bool, "image_size": int, "width": int, "code_size": int, "identities_per_batch": int,
            "max_album_size": int, "aggregate_steps": int, "personalise_steps": int, "finetune_steps": int,
            "learning_rate": _NUMBER, "relaxed_weight": _NUMBER, "flip_weight": _NUMBER, "landmark": _NUMBER,
            "depth_template": str},
    "correctives": {"enabled": bool, "space": str, "geometry_modes": int, "reflectance_modes": int,
                    "base_steps": int, "steps": int, "optimizer": str, "base_learning_rate": _NUMBER,
                    "learning_rate": _NUMBER, "geometry_learning_rate": _NUMBER,
                    "reflectance_learning_rate": _NUMBER, "base_checkpoint": str, "smoothness": _NUMBER,
                    "stabilization": _NUMBER, "sparsity": _NUMBER, "constancy": _NUMBER,
                    "coefficient_prior": _NUMBER},
    "distributed": {"backend": str, "timeout_minutes": _NUMBER},
    "output": {"directory": str, "checkpoint_every": int, "preview_every": int, "validate_every": int},
}

GROUP_BY = ("none", "folder", "synth")
SHADINGS = ("lambert", "blinn-phong")
AMP_MODES = ("auto", "off", "bf16", "fp16")
SWITCH = ("auto", "on", "off")
BACKENDS = ("auto", "nccl", "gloo")


def _choice(section: str, key: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ConfigError(f"{section}.{key} must be one of {', '.join(repr(c) for c in choices)}, got {value!r}")


def _check_data(d: dict[str, Any], merged: dict[str, Any]) -> None:
    for key in ("detections", "images"):
        if not all(isinstance(v, str) for v in d[key]):
            raise ConfigError(f"data.{key} must be a list of paths")
    if not d["detections"] and not d["images"]:
        raise ConfigError("data.detections or data.images must name at least one file or folder")
    if not 0.0 <= d["validation_fraction"] < 1.0:
        raise ConfigError("data.validation_fraction must be in [0, 1)")
    _choice("data", "group_by", d["group_by"], GROUP_BY)
    if d["views_per_identity"] < 2:
        raise ConfigError("data.views_per_identity must be at least 2")
    batch = merged["optim"]["batch_size"]
    # C-Net and LAP runs size their batches from [cnet] / [lap] (checked there)
    own_batches = merged["cnet"]["enabled"] or merged["lap"]["enabled"]
    if d["group_by"] != "none" and not own_batches and batch % d["views_per_identity"]:
        raise ConfigError(f"optim.batch_size ({batch}) must be a multiple of data.views_per_identity "
                          f"({d['views_per_identity']}) when data.group_by is {d['group_by']!r}")


def _check_network(n: dict[str, Any], merged: dict[str, Any]) -> None:
    if n["architecture"] not in ARCHITECTURES:
        raise ConfigError(f"network.architecture must be one of {', '.join(ARCHITECTURES)}")


def _check_loss(loss: dict[str, Any], merged: dict[str, Any]) -> None:
    if loss["render_size"] < 16:
        raise ConfigError("loss.render_size must be at least 16")
    _choice("loss", "shading", loss["shading"], SHADINGS)
    if loss["shading"] != "lambert":
        for section in ("cnet", "correctives"):
            if merged[section]["enabled"]:
                raise ConfigError(f"{section}.enabled needs loss.shading = 'lambert' (it trains with Lambertian "
                                  "losses)")


def _check_multiview(mv: dict[str, Any], merged: dict[str, Any]) -> None:
    for key, value in mv.items():
        if value < 0:
            raise ConfigError(f"multiview.{key} must not be negative")


def _check_optim(o: dict[str, Any], merged: dict[str, Any]) -> None:
    for key in ("batch_size", "steps"):
        if o[key] < 1:
            raise ConfigError(f"optim.{key} must be at least 1")
    if o["learning_rate"] <= 0:
        raise ConfigError("optim.learning_rate must be positive")
    _choice("optim", "amp", o["amp"], AMP_MODES)
    _choice("optim", "channels_last", o["channels_last"], SWITCH)


def _check_augment(aug: dict[str, Any], merged: dict[str, Any]) -> None:
    if not (0 <= aug["shift"] <= 0.5 and 0 <= aug["scale"] < 1 and 0 <= aug["rotation_degrees"] <= 90):
        raise ConfigError("augment: shift must be in [0, 0.5], scale in [0, 1), rotation_degrees in [0, 90]")


def _check_cnet(c: dict[str, Any], merged: dict[str, Any]) -> None:
    if c["enabled"] and merged["data"]["group_by"] == "none":
        raise ConfigError("cnet.enabled needs data.group_by = 'folder' or 'synth' (C-Net trains on several "
                          "images of one identity)")
    if c["enabled"] and not c["rnet_checkpoint"]:
        raise ConfigError("cnet.rnet_checkpoint must name the trained R-Net checkpoint when cnet.enabled")
    if c["images_per_identity"] < 2:
        raise ConfigError("cnet.images_per_identity must be at least 2")
    for key in ("identities_per_batch", "steps"):
        if c[key] < 1:
            raise ConfigError(f"cnet.{key} must be at least 1")
    if c["learning_rate"] <= 0:
        raise ConfigError("cnet.learning_rate must be positive")
    for key in ("photo", "landmark", "perceptual"):
        if c[key] < 0:
            raise ConfigError(f"cnet.{key} must not be negative")


def _check_lap(c: dict[str, Any], merged: dict[str, Any]) -> None:
    if c["enabled"] and merged["data"]["group_by"] == "none":
        raise ConfigError("lap.enabled needs data.group_by = 'folder' or 'synth' (LAP trains on photo collections "
                          "of one person)")
    if c["enabled"] and merged["cnet"]["enabled"]:
        raise ConfigError("lap.enabled and cnet.enabled are separate runs; enable one")
    _choice("lap", "image_size", c["image_size"], (64, 128))
    _choice("lap", "depth_template", c["depth_template"], ("mean_face", "flat"))
    for key in ("width", "code_size", "identities_per_batch", "max_album_size"):
        if c[key] < 1:
            raise ConfigError(f"lap.{key} must be at least 1")
    for key in ("aggregate_steps", "personalise_steps", "finetune_steps"):
        if c[key] < 0:
            raise ConfigError(f"lap.{key} must not be negative")
    if c["aggregate_steps"] + c["personalise_steps"] + c["finetune_steps"] < 1:
        raise ConfigError("lap: aggregate_steps + personalise_steps + finetune_steps must be at least 1")
    if c["learning_rate"] <= 0:
        raise ConfigError("lap.learning_rate must be positive")
    if not 0 <= c["relaxed_weight"] <= 1:
        raise ConfigError("lap.relaxed_weight must be in [0, 1]")
    for key in ("flip_weight", "landmark"):
        if c[key] < 0:
            raise ConfigError(f"lap.{key} must not be negative")


CORRECTIVE_SPACES = ("learn", "model")
OPTIMIZERS = ("adadelta", "adam")
CORRECTIVE_WEIGHTS = ("smoothness", "stabilization", "sparsity", "constancy", "coefficient_prior")


def _check_correctives(c: dict[str, Any], merged: dict[str, Any]) -> None:
    if c["enabled"] and merged["cnet"]["enabled"]:
        raise ConfigError("correctives.enabled and cnet.enabled exclude each other (C-Net trains over a frozen R-Net)")
    if c["enabled"] and merged["lap"]["enabled"]:
        raise ConfigError("correctives.enabled and lap.enabled are separate runs; enable one")
    if c["base_checkpoint"] and merged["network"]["init"]:
        raise ConfigError("correctives.base_checkpoint and network.init exclude each other (both set the weights)")
    _choice("correctives", "space", c["space"], CORRECTIVE_SPACES)
    _choice("correctives", "optimizer", c["optimizer"], OPTIMIZERS)
    for key in ("geometry_modes", "reflectance_modes", "steps"):
        if c[key] < 1:
            raise ConfigError(f"correctives.{key} must be at least 1")
    if c["base_steps"] < 0:
        raise ConfigError("correctives.base_steps must not be negative")
    for key in ("base_learning_rate", "learning_rate", "geometry_learning_rate", "reflectance_learning_rate"):
        if c[key] <= 0:
            raise ConfigError(f"correctives.{key} must be positive")
    for key in CORRECTIVE_WEIGHTS:
        if c[key] < 0:
            raise ConfigError(f"correctives.{key} must not be negative")


def _check_distributed(dist: dict[str, Any], merged: dict[str, Any]) -> None:
    _choice("distributed", "backend", dist["backend"], BACKENDS)
    if dist["timeout_minutes"] <= 0:
        raise ConfigError("distributed.timeout_minutes must be positive")


def _check_output(out: dict[str, Any], merged: dict[str, Any]) -> None:
    for key in ("checkpoint_every", "preview_every", "validate_every"):
        if out[key] < 1:
            raise ConfigError(f"output.{key} must be at least 1")


#: Value checks per section, run after the type checks on the merged configuration (a new
#: section adds its keys to _SCHEMA, its defaults to DEFAULT_CONFIG_TEXT and a check here).
_CHECKS = {"data": _check_data, "network": _check_network, "loss": _check_loss, "multiview": _check_multiview,
           "optim": _check_optim, "augment": _check_augment, "cnet": _check_cnet, "lap": _check_lap,
           "correctives": _check_correctives, "distributed": _check_distributed,
           "output": _check_output}


def default_config() -> dict[str, Any]:
    return tomllib.loads(DEFAULT_CONFIG_TEXT)


def parse_config(text: str, base: Path = Path(".")) -> TrainConfig:
    """Validate TOML text (missing keys take the defaults) into a :class:`TrainConfig`."""
    try:
        given = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"not valid TOML: {exc}") from None
    merged = default_config()
    for section, values in given.items():
        if section not in _SCHEMA:
            raise ConfigError(f"unknown section [{section}] (known: {', '.join(_SCHEMA)})")
        if not isinstance(values, dict):
            raise ConfigError(f"[{section}] must be a table")
        for key, value in values.items():
            if key not in _SCHEMA[section]:
                raise ConfigError(f"unknown key {section}.{key} (known: {', '.join(_SCHEMA[section])})")
            expected = _SCHEMA[section][key]
            if (isinstance(value, bool) and expected is not bool) or not isinstance(value, expected):
                names = expected.__name__ if isinstance(expected, type) else " or ".join(t.__name__ for t in expected)
                raise ConfigError(f"{section}.{key} must be {names}, got {value!r}")
            merged[section][key] = value
    for section, check in _CHECKS.items():
        check(merged[section], merged)
    d, o, out = merged["data"], merged["optim"], merged["output"]

    def path(p: str) -> Path:
        q = Path(p).expanduser()
        return q if q.is_absolute() else base / q

    loss, mv = merged["loss"], merged["multiview"]

    weights = dict(PAPER000_WEIGHTS if loss["shading"] == "lambert" else PAPER002_WEIGHTS)
    # paper 002's weights stay unless [loss] names them (the defaults above are paper 000's)
    given_loss = given.get("loss", {})
    weights.update({k: loss[k] for k in ("photo", "landmark", "coefficients", "texture")
                    if loss["shading"] == "lambert" or k in given_loss})
    c = merged["cnet"]
    cnet, learning_rate, batch_size, steps, views = None, o["learning_rate"], o["batch_size"], o["steps"], \
        d["views_per_identity"]
    if c["enabled"]:
        cnet = CNetSettings(
            rnet_checkpoint=path(c["rnet_checkpoint"]), images_per_identity=int(c["images_per_identity"]),
            identities_per_batch=int(c["identities_per_batch"]),
            recognition_weights=path(c["recognition_weights"]) if c["recognition_weights"] else None,
            aggregated=("identity", "albedo") if c["aggregate_albedo"] else ("identity",))
        checkpoints = path(out["directory"]).resolve() / "checkpoints"
        if cnet.rnet_checkpoint.resolve().parent == checkpoints:
            raise ConfigError("cnet.rnet_checkpoint lies in output.directory's checkpoints, which C-Net training "
                              "would overwrite; set output.directory to a folder of its own")
        # eq. 8 weights; the regularisers keep the [loss] values
        weights.update({"photo": c["photo"], "landmark": c["landmark"], "perceptual": c["perceptual"]})
        learning_rate, steps, views = c["learning_rate"], c["steps"], c["images_per_identity"]
        batch_size = c["images_per_identity"] * c["identities_per_batch"]
    lap = None
    la = merged["lap"]
    if la["enabled"]:
        lap = LapTrainSettings(**{k: la[k] for k in (
            "image_size", "width", "code_size", "identities_per_batch", "max_album_size", "aggregate_steps",
            "personalise_steps", "finetune_steps", "depth_template")},
            relaxed_weight=float(la["relaxed_weight"]), flip_weight=float(la["flip_weight"]),
            landmark=float(la["landmark"]))
        learning_rate = la["learning_rate"]
        steps = la["aggregate_steps"] + la["personalise_steps"] + la["finetune_steps"]
        batch_size = la["identities_per_batch"] * la["max_album_size"]
    corr = merged["correctives"]
    correctives = None
    if corr["enabled"]:
        correctives = CorrectiveTrainSettings(
            space=corr["space"], geometry_modes=int(corr["geometry_modes"]),
            reflectance_modes=int(corr["reflectance_modes"]), base_steps=int(corr["base_steps"]),
            optimizer=corr["optimizer"], base_learning_rate=float(corr["base_learning_rate"]),
            learning_rate=float(corr["learning_rate"]), geometry_learning_rate=float(corr["geometry_learning_rate"]),
            reflectance_learning_rate=float(corr["reflectance_learning_rate"]),
            base_checkpoint=path(corr["base_checkpoint"]) if corr["base_checkpoint"] else None,
            weights={k: float(corr[k]) for k in CORRECTIVE_WEIGHTS})
        learning_rate, steps = corr["base_learning_rate"], corr["base_steps"] + corr["steps"]
    return TrainConfig(
        detections=[path(p) for p in d["detections"]], images=[path(p) for p in d["images"]],
        validation_fraction=float(d["validation_fraction"]), face_model=merged["model"]["face_model"],
        architecture=merged["network"]["architecture"],
        init=path(merged["network"]["init"]) if merged["network"]["init"] else None,
        weights=weights, dense_weight=float(loss["dense"]), render_size=int(loss["render_size"]),
        learning_rate=float(learning_rate), batch_size=int(batch_size), steps=int(steps),
        seed=int(o["seed"]), output=path(out["directory"]), checkpoint_every=int(out["checkpoint_every"]),
        preview_every=int(out["preview_every"]), validate_every=int(out["validate_every"]),
        augment=AugmentSettings(**merged["augment"]), source=merged,
        group_by=d["group_by"], views_per_identity=int(views) if d["group_by"] != "none" else 1,
        multiview_weights={"multiview": float(mv["weight"]), "pixel": float(mv["pixel"]), "depth": float(mv["depth"]),
                           "epipolar": float(mv["epipolar"])},
        amp=o["amp"], channels_last=o["channels_last"], dist_backend=merged["distributed"]["backend"],
        dist_timeout_minutes=float(merged["distributed"]["timeout_minutes"]), cnet=cnet, lap=lap,
        correctives=correctives, shading=loss["shading"],
    )


def load_config(path: str | Path) -> TrainConfig:
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc.strerror or exc}") from None
    return parse_config(text, base=path.resolve().parent)
