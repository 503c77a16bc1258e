"""Opposing ARKit-style blendshapes: pairs of expressions that cannot both be true of one face.

A gaze cannot look up and down at once, a jaw cannot shift left and right, a brow cannot be
lowered and raised. A fit that turns both on is explaining something else (a shape the
identity space lacks, a detector bias) with expressions that cancel. The pairs are named in
the ARKit convention with ``_L`` / ``_R`` (ICT-FaceKit); a model whose expression names lack
a pair simply has fewer pairs.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

#: (a, b) name pairs that contradict each other (per side where the shapes are sided)
OPPOSING_NAMES: tuple[tuple[str, str], ...] = tuple(
    pair for side in ("_L", "_R") for pair in (
        (f"eyeLookUp{side}", f"eyeLookDown{side}"),
        (f"eyeLookIn{side}", f"eyeLookOut{side}"),
        (f"eyeBlink{side}", f"eyeWide{side}"),
        (f"browDown{side}", f"browInnerUp{side}"),
        (f"browDown{side}", f"browOuterUp{side}"),
        (f"mouthSmile{side}", f"mouthFrown{side}"),
    )
) + (("jawLeft", "jawRight"), ("mouthLeft", "mouthRight"), ("mouthPucker", "mouthStretch_L"),
     ("mouthPucker", "mouthStretch_R"))

#: the neutral-face thresholds of the real-faces acceptance: no single weight above this ...
NEUTRAL_MAX_WEIGHT = 0.5
#: ... and no opposing pair with both weights above this
OPPOSING_BOTH_ABOVE = 0.3


def opposing_pairs(names: Sequence[str]) -> np.ndarray:
    """(P, 2) int64 indices into ``names`` of the :data:`OPPOSING_NAMES` pairs the model has."""
    index = {str(n): i for i, n in enumerate(names)}
    pairs = [(index[a], index[b]) for a, b in OPPOSING_NAMES if a in index and b in index]
    return np.asarray(pairs, dtype=np.int64).reshape(-1, 2)


def expression_report(weights: np.ndarray, names: Sequence[str]) -> dict:
    """How neutral one face's blendshape weights (K,) are: the largest weight and its name, the
    opposing pairs whose weights are both above :data:`OPPOSING_BOTH_ABOVE`, and whether the
    face passes the neutral-face test (no weight above :data:`NEUTRAL_MAX_WEIGHT`, no such pair)."""
    weights = np.asarray(weights, dtype=np.float64).ravel()
    names = [str(n) for n in names]
    top = int(np.argmax(weights)) if len(weights) else -1
    both = [f"{names[a]}+{names[b]}" for a, b in opposing_pairs(names)
            if weights[a] > OPPOSING_BOTH_ABOVE and weights[b] > OPPOSING_BOTH_ABOVE]
    largest = float(weights[top]) if top >= 0 else 0.0
    return {"max_weight": largest, "max_name": names[top] if top >= 0 else "",
            "opposing_active": both, "sum_weights": float(weights.sum()),
            "neutral_ok": largest <= NEUTRAL_MAX_WEIGHT and not both}
