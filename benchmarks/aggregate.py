"""Album aggregation accuracy, robustness and speed on synthetic albums (run by hand).

Each album is one random identity of the face model photographed several times with a
different pose (yaw -60..60), expression and light; in albums of 4 or more photos one photo
is heavily occluded (a solid block over ~45 % of the face). Albums go through
`facerecon aggregate` exactly as on real photos (detect, fit each photo, exclusion, then
aggregation). Reported per album size: the identity error (mean per-vertex distance in mm
over the front face region between the true and the reconstructed *neutral* shapes after
similarity alignment) of

* ``single``: the mean of the single-photo errors,
* ``mean``:   the averaged identity coefficients,
* ``joint``:  one identity optimised over all photos (robustly reweighted),
* ``cnet``:   with ``--cnet CKPT``, R-Net predictions merged with C-Net's confidences (eq. 7),
* ``mean face``: the model's mean shape (no reconstruction at all),

and, with ``--robustness``, one album of 6 photos plus a stranger and a corrupt file.

    python benchmarks/aggregate.py --sizes 1,2,4,8 --albums 3 --robustness
    python benchmarks/aggregate.py --cnet runs/cnet/checkpoints/latest.pt   # adds a cnet column
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import h5py
import numpy as np
import torch

from facerecon.export.meshio import write_png
from facerecon.evaluation.geometry import umeyama
from facerecon.facemodel.resolve import resolve_face_model
from facerecon.facemodel.tensors import FaceModelTensors
from facerecon.stages.aggregate import AggregateOptions, run_aggregate
from facerecon.synthetic import random_parameters, render_faces, textured_backgrounds, to_uint8


def similarity_aligned_error(predicted: np.ndarray, truth: np.ndarray) -> float:
    """Mean per-vertex distance (mm) after the best similarity transform of predicted onto truth."""
    return float(np.linalg.norm(umeyama(predicted, truth).apply(predicted) - truth, axis=1).mean())


def occlude(image: np.ndarray, landmarks: np.ndarray, generator: torch.Generator) -> np.ndarray:
    """A solid random-coloured block over the upper or lower ~45 % of the face box."""
    x0, y0 = landmarks.min(0)
    x1, y1 = landmarks.max(0)
    height = y1 - y0
    upper = bool(torch.rand(1, generator=generator) < 0.5)
    top, bottom = (y0 - 0.1 * height, y0 + 0.45 * height) if upper else (y0 + 0.55 * height, y1 + 0.1 * height)
    colour = (torch.rand(3, generator=generator).numpy() * 255).astype(np.uint8)
    out = image.copy()
    out[max(0, int(top)):int(bottom), max(0, int(x0 - 0.1 * (x1 - x0))):int(x1 + 0.1 * (x1 - x0))] = colour
    return out


def make_album(folder: Path, tensors: FaceModelTensors, count: int, generator: torch.Generator, size: int,
               occluded: bool) -> np.ndarray:
    """Write ``count`` photos of one random identity into ``folder``; returns its identity coefficients."""
    params = random_parameters(tensors, count, generator, yaw_degrees=None)
    params["angles"][:, 1] = torch.deg2rad(-60 + 120 * torch.rand(count, generator=generator))
    params["identity"][:] = params["identity"][0]
    params["albedo"][:] = params["albedo"][0]
    batch = render_faces(tensors, params, size, textured_backgrounds(count, size, generator), zoom=0.6)
    folder.mkdir(parents=True, exist_ok=True)
    for i, image in enumerate(to_uint8(batch.images)):
        if occluded and i == count - 1:
            image = occlude(image, batch.landmarks68[i].numpy(), generator)
        write_png(folder / f"photo_{i}.png", image)
    return params["identity"][0].numpy()


def neutral(model, identity: np.ndarray, region: np.ndarray) -> np.ndarray:
    shape = model.mean_shape + np.tensordot(identity, model.identity_basis, axes=1)
    return shape[region]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--face-model", default=None)
    parser.add_argument("--sizes", default="1,2,4,8", help="album sizes (photos per album)")
    parser.add_argument("--albums", type=int, default=3, help="albums per size")
    parser.add_argument("--methods", default="mean,joint")
    parser.add_argument("--cnet", default=None, help="C-Net checkpoint: adds the method cnet")
    parser.add_argument("--photo-size", type=int, default=512)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--robustness", action="store_true", help="also run the stranger + corrupt-file album")
    parser.add_argument("--json", type=Path, default=None, help="also write the numbers here")
    args = parser.parse_args()

    model = resolve_face_model(args.face_model)
    tensors = FaceModelTensors(model)
    region = model.regions["photometric"]
    generator = torch.Generator().manual_seed(args.seed)
    sizes = [int(s) for s in args.sizes.split(",")]
    methods = args.methods.split(",")
    if args.cnet and "cnet" not in methods:
        methods.append("cnet")
    if "cnet" in methods and not args.cnet:
        parser.error("method cnet needs --cnet CKPT")
    report: dict = {"by_size": [], "robustness": None}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        truths: dict[str, np.ndarray] = {}
        for size in sizes:
            for a in range(args.albums):
                name = f"size{size}_album{a}"
                truths[name] = make_album(root / "albums" / f"size{size}" / name, tensors, size, generator,
                                          args.photo_size, occluded=size >= 4)
        results: dict[str, dict[str, dict]] = {}
        timings: dict[str, list[float]] = {}
        for method in methods:
            for size in sizes:
                options = AggregateOptions(face_model=args.face_model, device=args.device, method=method,
                                           formats=["obj"], texture_size=256,
                                           cnet=args.cnet if method == "cnet" else None)
                out = root / f"out_{method}_{size}"
                summary = run_aggregate([str(root / "albums" / f"size{size}")], out, options)
                for album in summary.albums:
                    timings.setdefault(f"{method}_{size}", []).append(album.seconds)
                with h5py.File(out / "aggregate.h5") as f:
                    for name, group in f["identities"].items():
                        results.setdefault(name, {})[method] = {
                            "identity": group["identity"][()], "single": group["single_identity"][()],
                            "kept": group["kept"][()]}
        print(f"{'photos':>6} {'albums':>6} {'single':>8} " + " ".join(f"{m:>8}" for m in methods)
              + f" {'mean face':>10}  seconds/album")
        for size in sizes:
            names = [n for n in truths if n.startswith(f"size{size}_") and n in results]
            row = {"photos": size, "albums": len(names)}
            single, per_method, baseline = [], {m: [] for m in methods}, []
            for name in names:
                truth = neutral(model, truths[name], region)
                baseline.append(similarity_aligned_error(model.mean_shape[region], truth))
                first = next(iter(results[name].values()))
                single.append(np.mean([similarity_aligned_error(neutral(model, s, region), truth)
                                       for s in first["single"]]))
                for m in methods:
                    if m in results[name]:
                        per_method[m].append(similarity_aligned_error(
                            neutral(model, results[name][m]["identity"], region), truth))
            row["single_mm"] = float(np.mean(single))
            row.update({f"{m}_mm": float(np.mean(v)) for m, v in per_method.items() if v})
            row["mean_face_mm"] = float(np.mean(baseline))
            row.update({f"{m}_seconds": float(np.mean(timings.get(f"{m}_{size}", [np.nan]))) for m in methods})
            report["by_size"].append(row)
            print(f"{size:>6} {len(names):>6} {row['single_mm']:>8.2f} "
                  + " ".join(f"{row.get(f'{m}_mm', float('nan')):>8.2f}" for m in methods)
                  + f" {row['mean_face_mm']:>10.2f}  "
                  + " ".join(f"{m} {row[f'{m}_seconds']:.1f}" for m in methods))
        if args.robustness:
            album = root / "robust" / "person"
            truth_identity = make_album(album, tensors, 6, generator, args.photo_size, occluded=False)
            make_album(root / "robust_stranger", tensors, 1, generator, args.photo_size, occluded=False)
            (root / "robust_stranger" / "photo_0.png").rename(album / "stranger.png")
            (album / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is not a jpeg")
            options = AggregateOptions(face_model=args.face_model, device=args.device, method="joint",
                                       formats=["obj"], texture_size=256)
            summary = run_aggregate([str(album)], root / "out_robust", options)
            outcome = summary.albums[0]
            with h5py.File(root / "out_robust" / "aggregate.h5") as f:
                identity = f["identities"]["person"]["identity"][()]
            error = similarity_aligned_error(neutral(model, identity, region), neutral(model, truth_identity, region))
            excluded = [k for k, _r in outcome.excluded]
            report["robustness"] = {"excluded": outcome.excluded, "failures": outcome.failures,
                                    "identity_error_mm": error, "stranger_excluded": "stranger.png#0" in excluded,
                                    "corrupt_reported": any(k == "corrupt.jpg" for k, _ in outcome.failures),
                                    "seconds": outcome.seconds}
            print(f"robustness: stranger excluded {report['robustness']['stranger_excluded']}, corrupt reported "
                  f"{report['robustness']['corrupt_reported']}, identity error {error:.2f} mm, "
                  f"{outcome.seconds:.1f} s; excluded {outcome.excluded}; failures {outcome.failures}")
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
