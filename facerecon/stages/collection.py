"""A fitted photo collection: the base fits of ``facerecon fit`` runs with the crops they were fitted to.

Each fits.h5 names the detections file it fitted (root attribute ``detections``); every fitted
face of it is paired with its detection (crop, skin attention, landmarks) and its base-level
parameters. The corrective-space learner (:mod:`facerecon.stages.learn_correctives`) and the
benchmarks read collections this way.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import numpy as np
import torch

from facerecon.errors import InputError
from facerecon.fitting.correctives import BASE_PARAMETERS
from facerecon.fitting.optimize import FaceTargets
from facerecon.io.store import attrs_dict, open_results
from facerecon.stages import detect as detect_stage
from facerecon.stages.fit import ITEMS_GROUP, KIND, MODEL_KEY, STATUS_OK, _PendingFace, _targets


@dataclass
class FittedCollection:
    """P fitted faces: ``names`` ("<fits.h5>:<key>#<face>"), their targets (P, ...) on the CPU,
    base parameters name -> (P, ...) float32 and the base fits' final landmark trust (P,)."""

    names: list[str]
    targets: FaceTargets
    parameters: dict[str, np.ndarray]
    trust: np.ndarray

    def __len__(self) -> int:
        return len(self.names)

    def subset(self, index: Iterable[int]) -> "FittedCollection":
        """The faces at ``index`` (in that order)."""
        index = list(index)
        rows = torch.as_tensor(index, dtype=torch.int64)
        t = self.targets

        def pick(x):
            return None if x is None else x[rows]

        return FittedCollection([self.names[i] for i in index],
                                FaceTargets(t.crops[rows], t.landmarks68[rows], pick(t.dense), t.attention[rows],
                                            pick(t.gaze), pick(t.inner_mouth)),
                                {n: v[index] for n, v in self.parameters.items()}, self.trust[index])


def _detections_of(fits: Path) -> Path:
    import h5py

    try:
        with h5py.File(fits, "r") as f:
            kind = f.attrs.get("kind", "")
            detections = f.attrs.get("detections", "")
    except OSError as exc:
        raise InputError(f"{fits} is not a readable HDF5 file ({exc})") from None
    kind = kind.decode() if isinstance(kind, bytes) else str(kind)
    if kind != KIND:
        raise InputError(f"{fits} is not a fits file written by `facerecon fit` (kind={kind or '?'})")
    path = Path(detections.decode() if isinstance(detections, bytes) else str(detections))
    if not path.is_file():
        path = fits.parent / "detections.h5"
    if not path.is_file():
        raise InputError(f"{fits}: its detections file ({detections}) is missing")
    return path


def load_collection(fits_files: Iterable[str | os.PathLike], model_id: str | None = None) -> FittedCollection:
    """Every face fitted with status ok in ``fits_files``, with its detection.

    Raises:
        InputError: a file is not a fits file, its detections are missing, it was fitted with
            another face model than ``model_id``, or no face was fitted.
    """
    names, pending, params, trust = [], [], {n: [] for n in BASE_PARAMETERS}, []
    for fits in fits_files:
        fits = Path(fits)
        detections = _detections_of(fits)
        stored = {}
        for key, attrs, faces in detect_stage.iter_detections(detections):
            if attrs.get("status") == detect_stage.STATUS_OK:
                stored[key] = (attrs, {f.index: f for f in faces})
        with open_results(fits, ITEMS_GROUP) as results:
            for key in sorted(results.keys()):
                if key == MODEL_KEY:
                    continue
                group = results[key]
                attrs = attrs_dict(group)
                if model_id is not None and attrs.get("status") == STATUS_OK and attrs.get("model_id") != model_id:
                    raise InputError(f"{fits}: {key} was fitted with face model {attrs.get('model_id')!r}, "
                                     f"not {model_id!r}")
                if key not in stored:
                    continue
                for name in sorted(group.get("faces", {}), key=int):
                    g = group["faces"][name]
                    face_attrs = attrs_dict(g)
                    index = int(face_attrs.get("index", name))
                    if face_attrs.get("status") != STATUS_OK or index not in stored[key][1]:
                        continue
                    names.append(f"{fits}:{key}#{index}")
                    pending.append(_PendingFace(key, stored[key][0], stored[key][1][index]))
                    for n in BASE_PARAMETERS:
                        params[n].append(np.asarray(g[n][()], np.float32))
                    losses = json.loads(face_attrs.get("losses", "{}") or "{}")
                    trust.append(float(losses.get("landmark_trust", 1.0)))
    if not names:
        raise InputError("no fitted face in the given fits files")
    targets = _targets(pending, torch.device("cpu"))
    return FittedCollection(names, targets, {n: np.stack(v) for n, v in params.items()},
                            np.asarray(trust, np.float64))
