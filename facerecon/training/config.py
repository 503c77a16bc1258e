"""Training configuration: TOML, validated with one-line messages naming the bad key.

``facerecon train --print-config`` writes :data:`DEFAULT_CONFIG_TEXT`, a fully commented
default; docs/training.md describes every key.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from facerecon.training.augment import AugmentSettings

DEFAULT_CONFIG_TEXT = '''\
# facerecon training configuration (TOML). Paths are relative to this file.

[data]
# Detections files written by `facerecon detect` (aligned crops, landmarks, skin attention),
# and/or image folders, which are detected first into <output>/detections.h5.
detections = []
images = []
# Fraction of faces held out for validation (by image, deterministic).
validation_fraction = 0.1

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

[optim]
learning_rate = 1e-4   # Adam, paper 000
batch_size = 8
steps = 1000
seed = 0

[augment]
# Random shift (fraction of the crop), scale (+-), rotation (degrees) and horizontal flip
# of training crops; landmarks follow, left and right swap on a flip.
enabled = true
shift = 0.05
scale = 0.1
rotation_degrees = 10.0
flip = true

[output]
directory = "runs/rnet"
checkpoint_every = 200
preview_every = 200
validate_every = 200
'''


class ConfigError(ValueError):
    """A configuration problem, described in one line naming the key."""


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

    def to_dict(self) -> dict[str, Any]:
        return self.source


_SCHEMA: dict[str, dict[str, type | tuple]] = {
    "data": {"detections": list, "images": list, "validation_fraction": (int, float)},
    "model": {"face_model": str},
    "network": {"architecture": str, "init": str},
    "loss": {"photo": (int, float), "landmark": (int, float), "coefficients": (int, float), "texture": (int, float),
             "dense": (int, float), "render_size": int},
    "optim": {"learning_rate": (int, float), "batch_size": int, "steps": int, "seed": int},
    "augment": {"enabled": bool, "shift": (int, float), "scale": (int, float), "rotation_degrees": (int, float),
                "flip": bool},
    "output": {"directory": str, "checkpoint_every": int, "preview_every": int, "validate_every": int},
}


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
    d, o, out = merged["data"], merged["optim"], merged["output"]
    for key in ("detections", "images"):
        if not all(isinstance(v, str) for v in d[key]):
            raise ConfigError(f"data.{key} must be a list of paths")
    if not d["detections"] and not d["images"]:
        raise ConfigError("data.detections or data.images must name at least one file or folder")
    if not 0.0 <= d["validation_fraction"] < 1.0:
        raise ConfigError("data.validation_fraction must be in [0, 1)")
    from facerecon.networks.resnet import ARCHITECTURES

    if merged["network"]["architecture"] not in ARCHITECTURES:
        raise ConfigError(f"network.architecture must be one of {', '.join(ARCHITECTURES)}")
    for key in ("batch_size", "steps"):
        if o[key] < 1:
            raise ConfigError(f"optim.{key} must be at least 1")
    if o["learning_rate"] <= 0:
        raise ConfigError("optim.learning_rate must be positive")
    aug = merged["augment"]
    if not (0 <= aug["shift"] <= 0.5 and 0 <= aug["scale"] < 1 and 0 <= aug["rotation_degrees"] <= 90):
        raise ConfigError("augment: shift must be in [0, 0.5], scale in [0, 1), rotation_degrees in [0, 90]")
    if merged["loss"]["render_size"] < 16:
        raise ConfigError("loss.render_size must be at least 16")
    for key in ("checkpoint_every", "preview_every", "validate_every"):
        if out[key] < 1:
            raise ConfigError(f"output.{key} must be at least 1")

    def path(p: str) -> Path:
        q = Path(p).expanduser()
        return q if q.is_absolute() else base / q

    loss = merged["loss"]
    from facerecon.losses.hybrid import PAPER000_WEIGHTS

    weights = dict(PAPER000_WEIGHTS)
    weights.update({"photo": loss["photo"], "landmark": loss["landmark"], "coefficients": loss["coefficients"],
                    "texture": loss["texture"]})
    return TrainConfig(
        detections=[path(p) for p in d["detections"]], images=[path(p) for p in d["images"]],
        validation_fraction=float(d["validation_fraction"]), face_model=merged["model"]["face_model"],
        architecture=merged["network"]["architecture"],
        init=path(merged["network"]["init"]) if merged["network"]["init"] else None,
        weights=weights, dense_weight=float(loss["dense"]), render_size=int(loss["render_size"]),
        learning_rate=float(o["learning_rate"]), batch_size=int(o["batch_size"]), steps=int(o["steps"]),
        seed=int(o["seed"]), output=path(out["directory"]), checkpoint_every=int(out["checkpoint_every"]),
        preview_every=int(out["preview_every"]), validate_every=int(out["validate_every"]),
        augment=AugmentSettings(**merged["augment"]), source=merged,
    )


def load_config(path: str | Path) -> TrainConfig:
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc.strerror or exc}") from None
    return parse_config(text, base=path.resolve().parent)
