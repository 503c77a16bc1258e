"""The AFLW2000-3D protocol: :mod:`facerecon.evaluation.landmarks` on ``.mat`` ground truth,
with the report names ``aflw2000_results.json`` etc. (``facerecon evaluate aflw2000``)."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Callable

from facerecon.evaluation.landmarks import (MIN_BOX_IOU, Annotation, LandmarkItem, LandmarkOptions,  # noqa: F401
                                            LandmarkResult,
                                            aggregate, box_iou, landmark_points68, nme, project_to_photo, read_mat,
                                            run_landmarks, score_faces, yaw_bin)
from facerecon.evaluation.landmarks import discover_items as _discover_items

PROTOCOL = "aflw2000"
SUFFIXES = (".mat",)
read_annotation = read_mat


def AflwOptions(**kwargs) -> LandmarkOptions:  # noqa: N802 - the options class of this protocol
    """:class:`LandmarkOptions` for AFLW2000-3D (``.mat`` ground truth, ``aflw2000_*`` reports)."""
    return LandmarkOptions(**{"protocol": PROTOCOL, "suffixes": SUFFIXES, **kwargs})


def discover_items(root: str | Path) -> list[LandmarkItem]:
    """The photos of an AFLW2000-3D folder with their ``.mat`` (see :func:`landmarks.discover_items`)."""
    return _discover_items(root, SUFFIXES)


def run_aflw2000(root: str | Path, out_dir: str | Path, options: LandmarkOptions | None = None, progress=None,
                 detect_progress=None, should_stop: Callable[[], bool] | None = None) -> LandmarkResult:
    """:func:`run_landmarks` with AFLW2000-3D's layout and report names."""
    options = dataclasses.replace(options or AflwOptions(), protocol=PROTOCOL, suffixes=SUFFIXES)
    return run_landmarks(root, out_dir, options, progress, detect_progress, should_stop)
