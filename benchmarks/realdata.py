"""Real-data ablation: the three real-data protocols with fit settings overridden.

Runs `evaluate landmarks`, `evaluate scan` (semi-real: the shared scan rendered over the default
yaw x pitch grid) and `evaluate albums` (no resolution spread) on ``../shared/realdata`` with
the default fit, changed by the JSON given (FitSettings fields; ``w_<term>`` sets a loss weight;
``recognition`` sets the perceptual network, null for none). Prints one line per protocol.
Numbers, no assertions.

    PYTHONPATH=. python benchmarks/realdata.py --name prior_off --settings '{"expression_l1": 0, "expression_l2": 0, "expression_opposing": 0}'
    PYTHONPATH=. python benchmarks/realdata.py --name perceptual_off --settings '{"recognition": null}'
    PYTHONPATH=. python benchmarks/realdata.py --name blinn_phong --shading blinn-phong

``--shading`` picks the starting settings: ``lambert`` the defaults (paper 000's fit),
``blinn-phong`` ``blinn_phong_settings``, ``paper002`` paper 002's exactly (``paper002_settings``).
Each protocol also prints the mean photometric errors of its fits (``photometric``, paper 000's
eq. 2 of the final render, and ``photometric_face``, unweighted), comparable across shadings.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace
from pathlib import Path

from facerecon.evaluation import albums, landmarks, scan
import numpy as np

from facerecon.fitting.optimize import SHADING_PRESETS, paper002_settings
from facerecon.stages import fit as fit_stage

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "realdata"


def _photometric(folder: Path) -> str:
    """Mean and median photometric errors of every fitted face under ``folder``: eq. 2 (skin-attention
    weighted) and unweighted over the rendered face (``photometric_face``), both on the final render."""
    values: dict[str, list[float]] = {"photometric": [], "photometric_face": []}
    for path in sorted(folder.rglob("fits.h5")):
        for _, _, faces in fit_stage.read_fits(path):
            for face in faces:
                losses = json.loads(face["attrs"].get("losses", "{}"))
                for name, found in values.items():
                    if name in losses:
                        found.append(losses[name])
    parts = [f"{name} mean {np.mean(v):.4f} median {np.median(v):.4f}" for name, v in values.items() if v]
    return (", ".join(parts) + f" ({len(values['photometric'])} faces)") if parts else "photometric n/a"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--name", required=True, help="Output sub-folder of --out.")
    parser.add_argument("--settings", default="{}", help="JSON overrides of the fit settings.")
    parser.add_argument("--out", default="benchmark-out/realdata", help="Output folder.")
    parser.add_argument("--data", default=str(SHARED), help="The realdata folder.")
    parser.add_argument("--protocols", default="landmarks,scan,albums")
    parser.add_argument("--shading", choices=["lambert", "blinn-phong", "paper002"], default="lambert",
                        help="The settings to start from (see above).")
    args = parser.parse_args()
    overrides = json.loads(args.settings)
    recognition = overrides.pop("recognition", fit_stage.FitOptions().recognition_weights)
    weights = {k[2:]: overrides.pop(k) for k in list(overrides) if k.startswith("w_")}
    make = {**SHADING_PRESETS, "paper002": paper002_settings}[args.shading]
    base = make()
    settings = make(**overrides, weights={**base.weights, **weights})
    run_fit = fit_stage.run_fit

    def with_recognition(inputs, out, options, **kwargs):
        return run_fit(inputs, out, replace(options, recognition_weights=recognition), **kwargs)

    for module in (landmarks, scan, albums):  # the protocols build their own FitOptions
        module.run_fit = with_recognition
    out, data = Path(args.out) / args.name, Path(args.data)
    wanted = args.protocols.split(",")
    started = time.perf_counter()
    if "landmarks" in wanted:
        s = landmarks.run_landmarks(data / "landmarks", out / "landmarks",
                                    landmarks.LandmarkOptions(settings=settings)).summary
        print(f"landmarks: {_photometric(out / 'landmarks')}; scored {s['scored']}, missed {s['missed']}, NME fit {s['nme_mean_percent']:.3f} % "
              f"detector {s['detector_nme_mean_percent']:.3f} % (mean over photos)")
    if "scan" in wanted:
        s = scan.run_scan(data / "scans" / "flame_scan.obj", out / "scan", scan.ScanOptions(
            landmarks=str(data / "scans" / "flame_scan_lmks.npy"), settings=settings)).summary
        print(f"scan: {_photometric(out / 'scan')}; {s['reconstructed']}/{s['images']} renders, exported {s['fit_mean_mm']:.3f} mm "
              f"({s['fit_improvement']:+.1%} vs mean face {s['mean_face_mean_mm']:.3f}), neutral "
              f"{s['neutral_mean_mm']:.3f} mm, max blendshape {s['max_blendshape']:.2f}, "
              f"neutral-looking {s['neutral_ok_fraction']:.0%}, opposing pairs on: {s['opposing_pairs_active']}")
    if "albums" in wanted:
        s = albums.run_albums(data / "albums", out / "albums",
                              albums.AlbumOptions(settings=settings, resolution_photos=0)).summary
        print(f"albums: {_photometric(out / 'albums')}; fitted {s['fitted']}/{s['photos']}, same median {s['same_median_mm']:.3f} mm, "
              f"different median {s['different_median_mm']:.3f} mm, AUC {s['auc']:.3f}")
    print(f"time: {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
