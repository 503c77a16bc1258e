"""Paper 004's two levels on real data: base vs final (free-form correctives), and a learned space.

Fits ``../shared/realdata`` with ``--level final`` (which stores both levels) through the
real-data protocols and prints, per protocol, base vs final:

* photometric error: RGB distance (channels in [0, 1]) averaged over the rendered face pixels
  without the skin attention (``photometric_face_base`` / ``_final`` in fits.h5), and split into
  the pixels the corrective fit trusts and those it does not (occluders, hair, shadows on the
  skin region: ``photometric_untrusted_*``; a large drop there would mean occluders baked in);
* landmarks: NME (% of the ground-truth box size) of both levels' meshes;
* scan: mean scan-to-mesh distance (mm) of both levels' exported meshes;
* albums: same / different person median distance and AUC of both levels' neutral shapes.

``learned`` splits the album people in two halves (alternate folders), learns a corrective space
from the first half's base fits (``learn_corrective_space``) and fits the other half's final
level in it: photometric base vs final on photos the space never saw (and on the photos it was
learned from, for reference). Numbers, no assertions.

    PYTHONPATH=. python benchmarks/correctives.py --name default
    PYTHONPATH=. python benchmarks/correctives.py --name strong --correctives '{"constancy": 3.0}'
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from facerecon.evaluation import albums, landmarks, scan
from facerecon.facemodel.embedding import face_oval_indices
from facerecon.facemodel.resolve import resolve_face_model
from facerecon.facemodel.tensors import FaceModelTensors
from facerecon.fitting.corrective_learning import LearnSettings, learn_corrective_space
from facerecon.fitting.correctives import CorrectiveFitter, CorrectiveSettings
from facerecon.fitting.optimize import FaceFitter, FitSettings
from facerecon.stages import fit as fit_stage
from facerecon.stages.collection import load_collection

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "realdata"
LEVELS = ("base", "final")


def _faces(fits: Path) -> list[tuple[str, dict]]:
    return [(key, face) for key, _attrs, faces in fit_stage.read_fits(fits) for face in faces
            if face["attrs"].get("status") == "ok"]


def photometric_line(fits: Path) -> str:
    """Mean photometric errors of both levels over the fitted faces of one fits.h5."""
    values: dict[str, list[float]] = {}
    for _key, face in _faces(fits):
        for name, value in json.loads(face["attrs"].get("losses", "{}")).items():
            if name.startswith("photometric_") and (name.endswith("_base") or name.endswith("_final")):
                values.setdefault(name, []).append(value)
    if "photometric_face_final" not in values:
        return "photometric: no final level stored"
    parts = []
    for what in ("face", "trusted", "untrusted"):
        base = float(np.nanmean(values[f"photometric_{what}_base"]))
        final = float(np.nanmean(values[f"photometric_{what}_final"]))
        parts.append(f"{what} {base:.4f} -> {final:.4f} ({final / base - 1:+.1%})")
    return f"photometric ({len(values['photometric_face_final'])} faces) " + ", ".join(parts)


def landmarks_line(out: Path, data: Path, model) -> str:
    """NME of both levels, scored like the landmarks protocol (face by landmark-box IoU)."""
    rows = {level: [] for level in LEVELS}
    fitted = {}
    for key, face in _faces(out / "fit" / "fits.h5"):
        fitted.setdefault(key, []).append(face)
    for item in landmarks.discover_items(data):
        if item.image is None or item.annotation is None or item.image.name not in fitted:
            continue
        truth = landmarks.read_annotation(item.annotation).landmarks
        for level in LEVELS:
            faces = [f for f in (fit_stage.face_level(face, level) for face in fitted[item.image.name]) if f]
            choice, points, iou = landmarks.score_faces(faces, truth, model)
            if choice is not None and iou >= landmarks.MIN_BOX_IOU:
                rows[level].append(100.0 * landmarks.nme(points, truth))
    return "NME " + ", ".join(f"{level} {np.mean(v):.3f} % ({len(v)} photos)" for level, v in rows.items())


def scan_line(out: Path, model) -> str:
    """Mean scan-to-mesh distance of both levels' meshes (exported and neutral)."""
    loaded = scan.load_scan(SHARED / "scans" / "flame_scan.obj", str(SHARED / "scans" / "flame_scan_lmks.npy"))
    truth = scan.prepare_truth(loaded)
    tip = int(np.argmax(model.mean_shape[:, 2]))
    rows = {level: [] for level in LEVELS}
    for _key, face in _faces(out / "fit" / "fits.h5"):
        for level in LEVELS:
            seen = fit_stage.face_level(face, level)
            if seen is not None:
                rows[level].append(scan._score_face(model, seen, truth, tip))
    def mean(v, name):
        return np.mean([r[name] for r in v])

    return "scan " + ", ".join(f"{level} {mean(v, 'fit_mean_mm'):.3f} mm (neutral {mean(v, 'neutral_mean_mm'):.3f})"
                               for level, v in rows.items())


def albums_line(out: Path, data: Path, model) -> str:
    """Same/different-person distances and AUC of both levels' neutral shapes."""
    region = np.asarray(model.regions["photometric"])
    people = albums.find_people(data)
    keys = [f"{person}/{photo.relative_to(data / person).as_posix()}" for person, photos in people.items()
            for photo in photos]
    fitted = albums._fitted_faces(out / "fit" / "fits.h5", keys)
    parts = []
    for level in LEVELS:
        faces = {k: f for k, f in ((k, fit_stage.face_level(f, level)) for k, f in fitted.items()) if f is not None}
        rows = [{"key": k, "person": k.split("/")[0]} for k in keys]
        _pairs, v = albums._verification(rows, albums._neutral_shapes(faces, region))
        parts.append(f"{level} same {v['same_median_mm']:.3f} / different {v['different_median_mm']:.3f} mm, "
                     f"AUC {v['auc']:.3f}")
    return "albums " + "; ".join(parts)


def learned_lines(fits: Path, correctives: CorrectiveSettings, learn: LearnSettings) -> list[str]:
    """Learn a space on half the album people, fit the final level of the other half in it."""
    model = resolve_face_model(None, False)
    tensors = FaceModelTensors(model)
    base = FaceFitter(tensors, model.regions, FitSettings(), oval_indices=face_oval_indices())
    collection = load_collection([fits], model.model_id)
    people = sorted({name.split(":")[-1].split("/")[0] for name in collection.names})
    train_people = set(people[0::2])
    person = [name.split(":")[-1].split("/")[0] for name in collection.names]
    train = collection.subset([i for i, p in enumerate(person) if p in train_people])
    test = collection.subset([i for i, p in enumerate(person) if p not in train_people])
    started = time.perf_counter()
    space, _, stats = learn_corrective_space(CorrectiveFitter(base, model.regions, correctives), train.targets,
                                      train.parameters, train.trust, learn)
    learn_seconds = time.perf_counter() - started
    fitter = CorrectiveFitter(base, model.regions, correctives, space)
    lines = [f"learned space: {space.n_geometry} + {space.n_reflectance} modes from {len(train)} photos of "
             f"{sorted(train_people)} in {learn_seconds:.0f} s (in-sample photometric face "
             f"{stats['photometric_face_base']:.4f} -> {stats['photometric_face_learned']:.4f})"]
    for label, part in (("held-out", test), ("training", train)):
        base_values, final_values = [], []
        for start in range(0, len(part), 8):
            rows = part.subset(range(start, min(start + 8, len(part))))
            result = fitter.fit(rows.targets, rows.parameters, rows.trust)
            base_values += list(result.losses["photometric_face_base"])
            final_values += list(result.losses["photometric_face_final"])
        b, f = float(np.nanmean(base_values)), float(np.nanmean(final_values))
        lines.append(f"learned space on {label} photos ({len(part)}): photometric face {b:.4f} -> {f:.4f} "
                     f"({f / b - 1:+.1%})")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--name", required=True, help="Output sub-folder of --out.")
    parser.add_argument("--correctives", default="{}", help="JSON overrides of CorrectiveSettings.")
    parser.add_argument("--learn", default="{}", help="JSON overrides of LearnSettings.")
    parser.add_argument("--out", default="benchmark-out/correctives", help="Output folder.")
    parser.add_argument("--data", default=str(SHARED), help="The realdata folder.")
    parser.add_argument("--protocols", default="landmarks,scan,albums,learned")
    args = parser.parse_args()
    correctives = CorrectiveSettings(**json.loads(args.correctives))
    learn = LearnSettings(**json.loads(args.learn))
    run_fit = fit_stage.run_fit

    def final_level(inputs, out, options, **kwargs):
        return run_fit(inputs, out, replace(options, level="final", correctives=correctives), **kwargs)

    for module in (landmarks, scan, albums):  # the protocols build their own FitOptions
        module.run_fit = final_level
    out, data = Path(args.out) / args.name, Path(args.data)
    model = resolve_face_model(None, False)
    wanted = args.protocols.split(",")
    started = time.perf_counter()
    torch.manual_seed(0)
    if "landmarks" in wanted:
        s = landmarks.run_landmarks(data / "landmarks", out / "landmarks", landmarks.LandmarkOptions()).summary
        print(f"landmarks: {photometric_line(out / 'landmarks' / 'fit' / 'fits.h5')}")
        print(f"landmarks: {landmarks_line(out / 'landmarks', data / 'landmarks', model)}; detector "
              f"{s['detector_nme_mean_percent']:.3f} %, missed {s['missed']}")
    if "scan" in wanted:
        scan.run_scan(data / "scans" / "flame_scan.obj", out / "scan", scan.ScanOptions(
            landmarks=str(data / "scans" / "flame_scan_lmks.npy")))
        print(f"scan: {photometric_line(out / 'scan' / 'fit' / 'fits.h5')}")
        print(f"scan: {scan_line(out / 'scan', model)}")
    if "albums" in wanted or "learned" in wanted:
        if not (out / "albums" / "fit" / "fits.h5").is_file() or "albums" in wanted:
            albums.run_albums(data / "albums", out / "albums", albums.AlbumOptions(resolution_photos=0))
        print(f"albums: {photometric_line(out / 'albums' / 'fit' / 'fits.h5')}")
        print(f"albums: {albums_line(out / 'albums', data / 'albums', model)}")
    if "learned" in wanted:
        for line in learned_lines(out / "albums" / "fit" / "fits.h5", correctives, learn):
            print(line)
    print(f"time: {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
