"""Finding the face model a command should use.

Order: the ``--face-model`` option, then ``FACERECON_FACE_MODEL``, then the default
model ``ict`` in the data directory. Each may be a path to a ``.h5`` face-model file or
the name of a model in ``<data dir>/models``. When the default is missing, it is fetched
and imported automatically unless downloads are switched off (``--no-download`` or
``FACERECON_NO_DOWNLOAD=1``).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

from facerecon.facemodel.model import FaceModel, FaceModelError, load_face_model, save_face_model
from facerecon.paths import ENV_FACE_MODEL, downloads_disabled, models_dir

DEFAULT_MODEL_NAME = "ict"

HOW_TO_GET_A_MODEL = (
    "get one with `facerecon model fetch ict` (downloads the MIT-licensed ICT-FaceKit), "
    "or convert files you have with `facerecon model import ict PATH` or `facerecon model import bfm PATH...`"
)


#: Fetches, converts and installs the default model when none is installed: () -> Path. The
#: stage layer sets it (``facerecon/stages/__init__.py`` registers
#: :func:`facerecon.stages.model_install.fetch_and_install_ict`, which also calibrates the
#: detector bias with the fitter), so this module needs no import from ``stages``.
default_fetcher: Callable[[], Path] | None = None


class FaceModelUnavailable(FaceModelError):
    """No face model could be found (and none could be fetched)."""


def model_path_for_name(name: str) -> Path:
    """Where a named model lives in the data directory."""
    return models_dir() / f"{name}.h5"


def installed_models() -> list[Path]:
    """Face-model files in the data directory, sorted by name."""
    directory = models_dir()
    return sorted(directory.glob("*.h5")) if directory.is_dir() else []


def _as_path(reference: str) -> Path:
    candidate = Path(reference).expanduser()
    if candidate.suffix in (".h5", ".hdf5") or candidate.exists() or os.sep in reference:
        return candidate
    return model_path_for_name(reference)


def resolve_face_model_path(
    option: str | None = None,
    allow_download: bool | None = None,
    fetcher: Callable[[], Path] | None = None,
) -> Path:
    """Return the path of the face model to use, fetching the default if allowed.

    Args:
        option: value of ``--face-model`` (path or name) or None.
        allow_download: False forbids fetching; None defers to ``FACERECON_NO_DOWNLOAD``.
        fetcher: called to fetch and install the default model; returns its path.

    Raises:
        FaceModelUnavailable: with a one-line message naming the commands that get a model.
    """
    reference = option or os.environ.get(ENV_FACE_MODEL)
    if reference:
        path = _as_path(reference)
        if path.is_dir():
            source = "--face-model" if option else ENV_FACE_MODEL
            raise FaceModelUnavailable(f"face model {reference!r} (from {source}) is a folder, not a face-model "
                                       f".h5 file (`facerecon model import` writes one); {HOW_TO_GET_A_MODEL}")
        if not path.is_file():
            source = "--face-model" if option else ENV_FACE_MODEL
            raise FaceModelUnavailable(f"face model {reference!r} (from {source}) not found; {HOW_TO_GET_A_MODEL}")
        return path
    path = model_path_for_name(DEFAULT_MODEL_NAME)
    if path.is_file():
        return path
    if allow_download is None:
        allow_download = not downloads_disabled()
    if not allow_download:
        reason = " and automatic downloads are switched off" if downloads_disabled() else ""
        raise FaceModelUnavailable(f"no face model installed in {models_dir()}{reason}; {HOW_TO_GET_A_MODEL}")
    fetcher = fetcher or default_fetcher
    if fetcher is None:  # pragma: no cover - importing any stage registers one
        raise FaceModelUnavailable(f"no face model installed and no fetcher registered; {HOW_TO_GET_A_MODEL}")
    try:
        return fetcher()
    except FaceModelError as exc:
        raise FaceModelUnavailable(f"no face model installed and fetching the default failed ({exc}); "
                                   f"{HOW_TO_GET_A_MODEL}") from exc


def resolve_face_model(option: str | None = None, allow_download: bool | None = None) -> FaceModel:
    """Load the face model chosen by :func:`resolve_face_model_path`."""
    return load_face_model(resolve_face_model_path(option, allow_download))


def install_model(model: FaceModel, name: str, overwrite: bool = False) -> Path:
    """Save ``model`` as ``<data dir>/models/<name>.h5`` (atomically)."""
    path = model_path_for_name(name)
    if path.exists() and not overwrite:
        raise FaceModelError(f"a model named {name!r} already exists at {path}; pass --force to replace it")
    return save_face_model(model, path)
