"""Blendshape weights as JSON and as an ARKit (Live Link Face style) CSV."""

from __future__ import annotations

import csv
import io
import json
import re
from pathlib import Path

import numpy as np

from facerecon.io.atomic import atomic_write_text

#: The 52 ARKit blendshape names in the order Live Link Face writes them.
ARKIT_52 = [
    "EyeBlinkLeft", "EyeLookDownLeft", "EyeLookInLeft", "EyeLookOutLeft", "EyeLookUpLeft", "EyeSquintLeft",
    "EyeWideLeft", "EyeBlinkRight", "EyeLookDownRight", "EyeLookInRight", "EyeLookOutRight", "EyeLookUpRight",
    "EyeSquintRight", "EyeWideRight", "JawForward", "JawRight", "JawLeft", "JawOpen", "MouthClose",
    "MouthFunnel", "MouthPucker", "MouthRight", "MouthLeft", "MouthSmileLeft", "MouthSmileRight",
    "MouthFrownLeft", "MouthFrownRight", "MouthDimpleLeft", "MouthDimpleRight", "MouthStretchLeft",
    "MouthStretchRight", "MouthRollLower", "MouthRollUpper", "MouthShrugLower", "MouthShrugUpper",
    "MouthPressLeft", "MouthPressRight", "MouthLowerDownLeft", "MouthLowerDownRight", "MouthUpperUpLeft",
    "MouthUpperUpRight", "BrowDownLeft", "BrowDownRight", "BrowInnerUp", "BrowOuterUpLeft", "BrowOuterUpRight",
    "CheekPuff", "CheekSquintLeft", "CheekSquintRight", "NoseSneerLeft", "NoseSneerRight", "TongueOut",
]


def arkit_name(name: str) -> str:
    """``eyeBlink_L`` -> ``EyeBlinkLeft``; ``jawOpen`` -> ``JawOpen``."""
    side = {"_L": "Left", "_R": "Right"}
    match = re.match(r"^(.*?)(_L|_R)?$", name)
    base, suffix = match.group(1), match.group(2)
    return base[:1].upper() + base[1:] + (side[suffix] if suffix else "")


def arkit_weights(names: list[str], weights: np.ndarray) -> dict[str, float]:
    """ARKit-52 weights; ICT's split shapes that ARKit has once (BrowInnerUp, CheekPuff) are averaged."""
    values: dict[str, list[float]] = {}
    for name, weight in zip(names, weights):
        converted = arkit_name(name)
        if converted not in ARKIT_52:
            converted = re.sub(r"(Left|Right)$", "", converted)
        if converted in ARKIT_52:
            values.setdefault(converted, []).append(float(weight))
    return {name: float(np.clip(np.mean(values[name]), 0.0, 1.0)) if name in values else 0.0 for name in ARKIT_52}


def write_blendshapes(base: Path, names: list[str], weights: np.ndarray) -> list[Path]:
    """``base.blendshapes.json`` (model names) and ``base.arkit.csv`` (one Live Link Face row)."""
    json_path = Path(f"{base}.blendshapes.json")
    atomic_write_text(json_path, json.dumps({n: round(float(w), 6) for n, w in zip(names, weights)}, indent=2))
    arkit = arkit_weights(names, weights)
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["Timecode", "BlendShapeCount", *ARKIT_52])
    writer.writerow(["00:00:00:00.000", len(ARKIT_52), *[f"{arkit[n]:.6f}" for n in ARKIT_52]])
    csv_path = Path(f"{base}.arkit.csv")
    atomic_write_text(csv_path, buffer.getvalue())
    return [json_path, csv_path]
