"""Fit accuracy and speed on synthetic faces, through the whole pipeline (run by hand).

Faces are rendered from the face model with random identity, expression, albedo and light at
yaw {-80, -40, 0, 40, 80} x pitch {-20, 0, 20} on textured backgrounds, written as PNG photos,
then run through `detect + fit + export` exactly as `facerecon fit photos/ --out DIR` does.
Reported: the median per-vertex error (mm) over the front face region after similarity
alignment, per yaw, next to the mean-face baseline, and the time per face.

    python benchmarks/fit.py --face-model ict --per-cell 2
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from facerecon.evaluation.geometry import umeyama
from facerecon.facemodel.resolve import resolve_face_model
from facerecon.facemodel.tensors import FaceModelTensors
from facerecon.export.meshio import write_png
from facerecon.fitting.optimize import FitSettings
from facerecon.stages.fit import FitOptions, read_fits, run_fit
from facerecon.synthetic import random_parameters, render_faces, textured_backgrounds, to_uint8

YAWS = (-80, -40, 0, 40, 80)
PITCHES = (-20, 0, 20)


def similarity_aligned_error(predicted: np.ndarray, truth: np.ndarray) -> np.ndarray:
    """Per-vertex distances (mm) after the best similarity transform of predicted onto truth."""
    return np.linalg.norm(umeyama(predicted, truth).apply(predicted) - truth, axis=1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--face-model", default=None)
    parser.add_argument("--per-cell", type=int, default=2, help="faces per (yaw, pitch) cell")
    parser.add_argument("--size", type=int, default=512, help="photo side in pixels")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--formats", default="obj,ply")
    parser.add_argument("--json", type=Path, default=None, help="also write the numbers here")
    parser.add_argument("--set", action="append", default=[], metavar="NAME=VALUE",
                        help="override a FitSettings field or a loss weight (weights.NAME=VALUE)")
    args = parser.parse_args()

    model = resolve_face_model(args.face_model)
    tensors = FaceModelTensors(model)
    region = model.regions["photometric"]
    generator = torch.Generator().manual_seed(args.seed)
    truths, cells = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        photos = Path(tmp) / "photos"
        photos.mkdir()
        for yaw in YAWS:
            for pitch in PITCHES:
                params = random_parameters(tensors, args.per_cell, generator, yaw_degrees=float(yaw),
                                           pitch_degrees=float(pitch))
                batch = render_faces(tensors, params, args.size,
                                     textured_backgrounds(args.per_cell, args.size, generator), zoom=0.6)
                for i, image in enumerate(to_uint8(batch.images)):
                    name = f"yaw{yaw:+d}_pitch{pitch:+d}_{i}.png"
                    write_png(photos / name, image)
                    truths[name] = batch.vertices[i].numpy()
                    cells[name] = (yaw, pitch)
        settings = FitSettings()
        for item in args.set:
            name, value = item.split("=", 1)
            if name.startswith("weights."):
                settings.weights[name[len("weights."):]] = float(value)
            else:
                setattr(settings, name, type(getattr(settings, name))(value))
        options = FitOptions(face_model=args.face_model, device=args.device, batch_size=args.batch_size,
                             formats=args.formats.split(","), largest=True, overlays=False, settings=settings)
        started = time.perf_counter()
        summary = run_fit([str(photos)], Path(tmp) / "out", options)
        elapsed = time.perf_counter() - started
        fitted = {key: faces for key, _attrs, faces in read_fits(Path(tmp) / "out" / "fits.h5")}

    rows = []
    for yaw in YAWS:
        errors, baseline, missed = [], [], 0
        for name, (y, _p) in cells.items():
            if y != yaw:
                continue
            faces = fitted.get(name, [])
            truth = truths[name][region]
            baseline.append(np.median(similarity_aligned_error(model.mean_shape[region], truth)))
            if not faces or "vertices" not in faces[0]:
                missed += 1
                continue
            errors.append(np.median(similarity_aligned_error(faces[0]["vertices"][region], truth)))
        rows.append({"yaw": yaw, "faces": len(errors), "not_fitted": missed,
                     "median_error_mm": float(np.median(errors)) if errors else None,
                     "mean_face_baseline_mm": float(np.median(baseline))})
    data = summary.to_dict()
    report = {"by_yaw": rows, "faces_fitted": data["faces_fitted"], "seconds_per_face": elapsed / max(1, len(cells)),
              "fit_seconds_per_face": data["fit_seconds_per_face"], "device": data["device"],
              "median_landmark_error_iod": data["median_landmark_error_iod"],
              "median_dense_landmark_error_iod": data["median_dense_landmark_error_iod"]}
    print(f"{'yaw':>5} {'faces':>6} {'missed':>7} {'median mm':>10} {'mean face mm':>13}")
    for r in rows:
        err = "-" if r["median_error_mm"] is None else f"{r['median_error_mm']:.2f}"
        print(f"{r['yaw']:>5} {r['faces']:>6} {r['not_fitted']:>7} {err:>10} {r['mean_face_baseline_mm']:>13.2f}")
    print(f"detect + fit + export: {report['seconds_per_face']:.2f} s per face "
          f"(fit alone {report['fit_seconds_per_face']} s per face) on {report['device']}, "
          f"batch {args.batch_size}")
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
