"""``facerecon model learn-correctives``: a face model with paper 004's learned corrective space.

Reads the base fits of ``facerecon fit`` runs (fits.h5 with their detections), learns the
corrective bases and every photo's coefficients by optimisation
(:func:`facerecon.fitting.corrective_learning.learn_corrective_space`) and writes the face model
with the space added (atomically). ``fit --level final`` with that model then solves the
coefficients of the learned space instead of free-form correctives.
"""

from __future__ import annotations

import dataclasses
import os
import time
from pathlib import Path
from typing import Callable, Iterable

from facerecon.errors import InputError
from facerecon.facemodel.embedding import face_oval_indices
from facerecon.facemodel.model import save_face_model
from facerecon.facemodel.resolve import resolve_face_model
from facerecon.facemodel.tensors import FaceModelTensors
from facerecon.fitting.corrective_learning import LearnSettings, learn_corrective_space
from facerecon.fitting.correctives import CorrectiveFitter, CorrectiveSettings
from facerecon.fitting.optimize import FaceFitter, FitSettings
from facerecon.stages.collection import load_collection
from facerecon.stages.fit import pick_device


def run_learn_correctives(fits_files: Iterable[str | os.PathLike], out_path: str | os.PathLike,
                          face_model: str | None = None, settings: LearnSettings | None = None,
                          correctives: CorrectiveSettings | None = None, device: str = "auto",
                          overwrite: bool = False, progress: Callable[[str, int, int], None] | None = None) -> dict:
    """Learn a corrective space from ``fits_files`` and write ``face_model`` with it to ``out_path``.

    Returns a plain-data summary (photos, modes, in-sample photometric errors, seconds).

    Raises:
        InputError: ``out_path`` exists (without ``overwrite``), a fits file is unusable or was
            fitted with another face model, fewer than 2 faces were fitted, or the model has no albedo.
    """
    started = time.perf_counter()
    out_path = Path(out_path)
    if out_path.exists() and not overwrite:
        raise InputError(f"{out_path} exists; pass --force to replace it")
    settings = settings or LearnSettings()
    correctives = correctives or CorrectiveSettings()
    model = resolve_face_model(face_model, allow_download=False)
    if not model.has_albedo:
        raise InputError(f"face model {model.model_id!r} has no albedo space to correct")
    fits_files = [Path(f) for f in fits_files]
    collection = load_collection(fits_files, model.model_id)
    tensors = FaceModelTensors(model).to(pick_device(device))
    oval = face_oval_indices() if model.dense_triangle is not None else None
    base = FaceFitter(tensors, model.regions, FitSettings(), oval_indices=oval)
    fitter = CorrectiveFitter(base, model.regions, correctives)
    description = (f"learned from {len(collection)} fitted photos ({', '.join(f.as_posix() for f in fits_files)}); "
                   f"{settings.steps} joint steps, batches of {settings.batch_size}, seed {settings.seed}")
    space, _coefficients, stats = learn_corrective_space(fitter, collection.targets.to(tensors.mean_shape.device),
                                                         collection.parameters, collection.trust, settings,
                                                         description, progress)
    path = save_face_model(dataclasses.replace(model, correctives=space), out_path)
    return {"path": str(path), "model_id": model.model_id, "photos": len(collection),
            "geometry_modes": space.n_geometry, "reflectance_modes": space.n_reflectance,
            "digest": space.digest(), **stats, "seconds": round(time.perf_counter() - started, 1)}
