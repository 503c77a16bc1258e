"""Import/fetch orchestration: source files -> converted, embedded, calibrated model in the data directory.

A stage: the detector-bias calibration (:mod:`facerecon.stages.calibrate`) runs the detector and
the fitter. :mod:`facerecon.facemodel.resolve` fetches the default model through
:func:`fetch_and_install_ict`, which the stage layer registers with it (``facerecon.stages``
package import), so ``facemodel`` imports nothing from here.
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path
from typing import Callable, Sequence

from facerecon.errors import InputError
from facerecon.facemodel import fetch
from facerecon.facemodel.bfm import import_bfm
from facerecon.facemodel.embedding import embed_dense_landmarks
from facerecon.facemodel.ict import import_ict
from facerecon.facemodel.model import FaceModel
from facerecon.facemodel.resolve import DEFAULT_MODEL_NAME, install_model, model_path_for_name
from facerecon.stages.calibrate import calibrate_detector_bias

ProgressCallback = Callable[[int, int | None], None]


def add_dense_embedding(model: FaceModel, log: Callable[[str], None] | None = None) -> FaceModel:
    """Attach the mediapipe dense-landmark embedding (see :mod:`facerecon.facemodel.embedding`).

    A model without the embedding still works (fitting then uses the 68 landmarks only),
    so a failure here is reported, not raised.
    """
    try:
        return embed_dense_landmarks(model)
    except Exception as exc:  # noqa: BLE001 - report and keep the usable model
        if log:
            log(f"dense landmark embedding skipped: {exc}")
        return model


def add_detector_bias(model: FaceModel, log: Callable[[str], None] | None = None,
                      progress: Callable[[int, int], None] | None = None) -> FaceModel:
    """Attach the detector-bias table (see :mod:`facerecon.stages.calibrate`).

    Like the embedding, optional: a model without it fits raw detections, so a failure is
    reported, not raised.
    """
    try:
        return dataclasses.replace(model, detector_bias=calibrate_detector_bias(model, progress=progress))
    except Exception as exc:  # noqa: BLE001 - report and keep the usable model
        if log:
            log(f"detector-bias calibration skipped: {exc}")
        return model


def import_model(kind: str, sources: Sequence[str | Path], include_head: bool = False) -> FaceModel:
    """Convert user-owned model files of ``kind`` ('ict' or 'bfm') into a FaceModel."""
    if kind == "ict":
        return import_ict(sources[0], include_head=include_head)
    if kind == "bfm":
        return import_bfm(list(sources))
    raise InputError(f"unknown face-model kind {kind!r}")


def _stderr_progress():
    """A download bar on stderr: returns (callback, stop)."""
    from rich.console import Console
    from rich.progress import BarColumn, DownloadColumn, Progress, TransferSpeedColumn, TimeRemainingColumn

    progress = Progress(
        "[progress.description]{task.description}", BarColumn(), DownloadColumn(), TransferSpeedColumn(),
        TimeRemainingColumn(), transient=False, console=Console(stderr=True),
    )
    progress.start()
    task = progress.add_task("downloading ICT-FaceKit", total=None)

    def update(done: int, total: int | None) -> None:
        progress.update(task, completed=done, total=total)

    return update, progress.stop


def fetch_and_install_ict(
    name: str = DEFAULT_MODEL_NAME,
    progress: ProgressCallback | None = None,
    url: str | None = None,
    sha256: str | None = None,
    embed: bool = True,
    calibrate: bool = True,
    overwrite: bool = True,
    opener=None,
) -> Path:
    """Download ICT-FaceKit (resumable), convert it and install it as ``name``."""

    stop = None
    if progress is None:
        progress, stop = _stderr_progress()
    try:
        facex, digest = fetch.fetch_ict_checkout(
            url=url or fetch.ICT_ARCHIVE_URL, expected_sha256=sha256 or fetch.ICT_ARCHIVE_SHA256, progress=progress,
            opener=opener or fetch.open_url_range,
        )
    finally:
        if stop is not None:
            stop()
    model = import_ict(facex)
    model.provenance += f"; archive sha256 {digest}"
    if embed:
        model = add_dense_embedding(model, log=lambda msg: print(msg, file=sys.stderr))
    if calibrate:
        model = add_detector_bias(model, log=lambda msg: print(msg, file=sys.stderr))
    return install_model(model, name, overwrite=overwrite)


__all__ = ["add_dense_embedding", "add_detector_bias", "fetch_and_install_ict", "import_model", "model_path_for_name"]
