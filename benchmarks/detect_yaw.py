"""Detection recall by head yaw on faces rendered from the face model (run by hand).

Random faces of the model (identity, expression, albedo, light; textured background, 512 px,
the face at ~45 % of the width) at pitch -20/0/20 and each yaw are given to the detector with
and without the short-range fallback (off by default; docs/detection.md). Reported per yaw: how many got a
478-point mesh, i.e. a face the fit can use.

    PYTHONPATH=. python benchmarks/detect_yaw.py --face-model ict --per-cell 8 --seed 1
"""

from __future__ import annotations

import argparse

import torch

from facerecon.detection.mediapipe_backend import FaceAnalyzer
from facerecon.facemodel.resolve import resolve_face_model
from facerecon.facemodel.tensors import FaceModelTensors
from facerecon.synthetic import random_parameters, render_faces, textured_backgrounds, to_uint8


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--face-model", default=None)
    parser.add_argument("--per-cell", type=int, default=8, help="faces per (yaw, pitch) cell")
    parser.add_argument("--yaws", default="-80,-60,-40,0,40,60,80")
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()

    tensors = FaceModelTensors(resolve_face_model(args.face_model))
    generator = torch.Generator().manual_seed(args.seed)
    full_range_only = FaceAnalyzer(max_faces=1).open()
    with_fallback = FaceAnalyzer(max_faces=1, short_range_fallback=True).open()
    print(f"{'yaw':>5} {'faces':>6} {'full-range only':>16} {'with fallback':>14}")
    try:
        for yaw in (float(y) for y in args.yaws.split(",")):
            found_plain = found_fallback = total = 0
            for pitch in (-20.0, 0.0, 20.0):
                params = random_parameters(tensors, args.per_cell, generator, yaw_degrees=yaw, pitch_degrees=pitch)
                batch = render_faces(tensors, params, 512, textured_backgrounds(args.per_cell, 512, generator),
                                     zoom=0.6)
                for image in to_uint8(batch.images):
                    total += 1
                    found_plain += bool(full_range_only.analyze(image))
                    found_fallback += bool(with_fallback.analyze(image))
            print(f"{yaw:>5.0f} {total:>6} {found_plain:>16} {found_fallback:>14}", flush=True)
    finally:
        full_range_only.close()
        with_fallback.close()


if __name__ == "__main__":
    main()
