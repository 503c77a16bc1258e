"""Measure the landmark detector's pose-dependent bias on renders of a face model.

A stage (it runs the ``detect`` stage's detector and the fitter), so it lives here and not in
:mod:`facerecon.facemodel`, which imports nothing from ``fitting`` or ``stages``.

For every cell of a (yaw, pitch) grid, random faces of the model (identity, expression,
albedo, light; textured backgrounds) are rendered, run through the ``detect`` stage's
detector and alignment, and compared with the exact projections of the model's own
landmarks on the same crop. The pose each sample is filed under is the one the fitter
finds from the exact landmarks (the crop's camera frame, where fits live). The table is
:class:`facerecon.facemodel.detector_bias.DetectorBias`; see docs/fitting.md.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from facerecon.detection.align import transform_points
from facerecon.detection.mediapipe_backend import FaceAnalyzer
from facerecon.facemodel.detector_bias import DetectorBias, canonical_pitch_yaw
from facerecon.facemodel.embedding import face_oval_indices
from facerecon.facemodel.model import FaceModel, FaceModelError
from facerecon.facemodel.tensors import FaceModelTensors
from facerecon.fitting.optimize import FaceFitter, FaceTargets, lambert_settings
from facerecon.stages.detect import analyze_image
from facerecon.synthetic import random_parameters, render_faces, textured_backgrounds, to_uint8

DEFAULT_YAWS = tuple(float(y) for y in range(-90, 91, 15))
DEFAULT_PITCHES = (-30.0, -15.0, 0.0, 15.0, 30.0)


def detector_name() -> str:
    """The detector the table belongs to, with its version."""
    try:
        import mediapipe

        return f"mediapipe {mediapipe.__version__}"
    except ImportError:  # pragma: no cover - mediapipe is a dependency
        return "mediapipe (not installed)"


def calibrate_detector_bias(model: FaceModel, yaws: tuple[float, ...] = DEFAULT_YAWS,
                            pitches: tuple[float, ...] = DEFAULT_PITCHES, faces_per_cell: int = 4,
                            seed: int = 11, image_size: int = 512, bandwidth_degrees: float = 10.0,
                            analyzer=None, progress: Callable[[int, int], None] | None = None) -> DetectorBias:
    """Measure the detector's mean landmark offsets over a grid of head poses.

    Args:
        model: a face model with albedo; its dense embedding, when present, adds the dense table.
        yaws, pitches: the grid in degrees (roll is random within +-8 degrees).
        faces_per_cell: random faces rendered per grid cell.
        seed: seed of the random faces, lights and backgrounds.
        image_size: side of the rendered photos (the face fills about 45 % of it).
        bandwidth_degrees: the kernel width stored with the table.
        analyzer: a :class:`facerecon.detection.mediapipe_backend.FaceAnalyzer` to reuse.
        progress: called with (cells done, cells) after each cell.

    Raises:
        FaceModelError: the model has no albedo, or the detector found no face.
    """

    if not model.has_albedo:
        raise FaceModelError("detector calibration renders faces and needs a model with albedo")
    tensors = FaceModelTensors(model)
    dense = tensors.dense_triangle is not None
    own = analyzer is None
    analyzer = analyzer or FaceAnalyzer(max_faces=1)
    generator = torch.Generator().manual_seed(seed)
    detected68, true68, detected_dense, true_dense = [], [], [], []
    crop_size = 0
    cells = [(yaw, pitch) for yaw in yaws for pitch in pitches]
    try:
        for done, (yaw, pitch) in enumerate(cells, start=1):
            params = random_parameters(tensors, faces_per_cell, generator, yaw_degrees=yaw, pitch_degrees=pitch)
            batch = render_faces(tensors, params, image_size,
                                 textured_backgrounds(faces_per_cell, image_size, generator), zoom=0.6)
            for i, image in enumerate(to_uint8(batch.images)):
                found = analyze_image(analyzer, image)
                if not found:
                    continue  # the detector gives up on this view: nothing to correct there
                face = found[0]
                detected68.append(face.crop_landmarks68)
                true68.append(transform_points(batch.landmarks68[i].numpy(), face.matrix))
                if dense:
                    detected_dense.append(face.crop_landmarks478[: len(model.dense_triangle), :2])
                    true_dense.append(transform_points(batch.dense[i].numpy(), face.matrix))
                crop_size = face.crop.shape[0]
            if progress is not None:
                progress(done, len(cells))
    finally:
        if own:
            analyzer.close()
    if not detected68:
        raise FaceModelError("detector calibration: the detector found none of the rendered faces")
    # the pose the fitter finds from exact landmarks: where a converged fit files this view
    fitter = FaceFitter(tensors, model.regions,
                        lambert_settings(coarse_steps=0, fine_steps=0, detector_bias_iterations=0),
                        oval_indices=face_oval_indices() if dense else None)
    count = len(detected68)
    targets = FaceTargets(  # the landmark stage reads no pixels
        crops=torch.zeros(count, crop_size, crop_size, 3),
        landmarks68=torch.as_tensor(np.stack(true68), dtype=torch.float32),
        dense=torch.as_tensor(np.stack(true_dense), dtype=torch.float32) if dense else None,
        attention=torch.zeros(count, crop_size, crop_size))
    fitted = fitter.fit(targets)
    ok = ~fitted.failed
    offsets68 = (np.stack(detected68) - np.stack(true68)) / crop_size
    offsets_dense = (np.stack(detected_dense) - np.stack(true_dense)) / crop_size if dense else None
    return DetectorBias(
        angles=canonical_pitch_yaw(torch.as_tensor(fitted.parameters["angles"][ok])).numpy().astype(np.float32),
        offsets68=offsets68[ok].astype(np.float32),
        offsets_dense=None if offsets_dense is None else offsets_dense[ok].astype(np.float32),
        bandwidth_degrees=bandwidth_degrees,
        detector=detector_name(),
        description=(f"{int(ok.sum())} renders of {model.model_id}: yaw {list(yaws)}, pitch {list(pitches)}, "
                     f"{faces_per_cell} random faces per cell, seed {seed}, {image_size} px photos"),
    )
