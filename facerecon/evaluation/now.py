"""The NoW benchmark (Sanyal et al. 2019): predictions in NoW's layout and, where the
ground-truth scans are present (validation split), NoW's scan-to-mesh error.

Dataset layout read (that of the NoW release; the protocol notes give the metric only):

- ``imagepathsvalidation.txt`` / ``imagepathstest.txt``: one image per line,
  ``<subject>/<challenge>/<image>.jpg`` (the last three parts count; challenges
  ``multiview_neutral``, ``multiview_expressions``, ``multiview_occlusions``, ``selfie``);
- ``iphone_pictures/<subject>/<challenge>/<image>.jpg``: the photos (a line may also be a
  path relative to the dataset folder, or absolute);
- ``scans/<subject>/*.obj``: the subject's neutral scan in millimetres (first by name);
- ``scans_lmks_onlypp/<subject>/*.pp``: its 7 landmarks, MeshLab picked points (first by name).

ROOT is the folder holding the image list, or one above it (``final_release_version/``).

Per listed image:

1. the photo is reconstructed with ``detect + fit`` (largest face) into ``OUT/fit/``
   (resumable); the split's photos are linked into ``OUT/images/<subject>/<challenge>/`` so
   that one fit run sees them with unique keys;
2. the prediction is the fitted **neutral** shape (identity, expression zero: the scans are
   neutral) in millimetres, written in NoW's submission layout as
   ``OUT/predictions/<subject>/<challenge>/<image>.obj`` plus ``<image>.npy``: the 7 landmarks
   (7, 3) at 68-point indices 36, 39, 42, 45, 33, 48, 54 of the same mesh;
3. with a scan: the scan is cropped to the sphere around its landmarks (:func:`crop_region`);
   the prediction is aligned by a similarity Procrustes of its 7 landmarks onto the scan's,
   refined over scale, rotation and translation to minimise the squared scan-to-prediction
   surface distances (:func:`align_to_scan`); the error of each cropped scan vertex is its
   unsigned distance to the closest point of the aligned surface.

Reported: median, mean and std (mm) of all scan vertices of all scored images pooled, overall
and per challenge, with JSON, CSV, a cumulative error curve and a terminal table. Finished
images are stored in ``OUT/results/`` and skipped on rerun.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import time
import xml.etree.ElementTree as ElementTree
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np

from facerecon.errors import InputError
from facerecon.evaluation.aflw2000 import landmark_points68
from facerecon.evaluation.geometry import Similarity, triangle_normals, umeyama
from facerecon.evaluation.micc import read_obj
from facerecon.evaluation.plots import plot_cumulative_distribution
from facerecon.evaluation.results import load_finished, one_line, store_finished, write_result_files
from facerecon.facemodel.geometry import closest_points_on_mesh
from facerecon.facemodel.resolve import resolve_face_model
from facerecon.fitting.optimize import FitSettings
from facerecon.io.atomic import atomic_path, atomic_write_text
from facerecon.io.store import attrs_dict, open_results
from facerecon.stages.fit import STATUS_SKIPPED, FitOptions, FitSummary, pick_device, run_fit

SPLIT_FILES = {"val": "imagepathsvalidation.txt", "test": "imagepathstest.txt"}
CHALLENGES = ("multiview_neutral", "multiview_expressions", "multiview_occlusions", "selfie")
LANDMARK_INDICES68 = (36, 39, 42, 45, 33, 48, 54)
LANDMARK_NAMES = ("right eye outer corner", "right eye inner corner", "left eye inner corner",
                  "left eye outer corner", "nose bottom", "right mouth corner", "left mouth corner")
ALIGN_MAX_POINTS = 6000
ALIGN_ITERATIONS = 30
ALIGN_TOLERANCE = 1e-4
MIN_SCAN_POINTS = 100
RESULT_VERSION = 1
STATUS_OK, STATUS_PREDICTED, STATUS_FAILED = "ok", "predicted", "failed"
METRIC = ("unsigned distance of every cropped scan vertex to the closest point of the aligned prediction "
          "(similarity Procrustes on the 7 landmarks, refined on the squared scan-to-surface distances); "
          "median / mean / std over all vertices of all scored images")


# --------------------------------------------------------------------------- metric


def crop_region(landmarks: np.ndarray) -> tuple[np.ndarray, float]:
    """NoW's face sphere from 7 scan landmarks (7, 3) in NoW order: centre = nose +
    0.3 (mid-inner-eyes - nose), radius = 1.4 (|lm0 - lm3| + |mid-inner-eyes - nose|) / 2,
    with nose = lm4 (nose bottom) and mid-inner-eyes = (lm1 + lm2) / 2. Returns (centre (3,), radius)."""
    landmarks = np.asarray(landmarks, dtype=np.float64)
    nose = landmarks[4]
    bridge = (landmarks[1] + landmarks[2]) / 2
    centre = nose + 0.3 * (bridge - nose)
    radius = 1.4 * (np.linalg.norm(landmarks[0] - landmarks[3]) + np.linalg.norm(bridge - nose)) / 2
    return centre, float(radius)


def crop_scan(vertices: np.ndarray, landmarks: np.ndarray) -> np.ndarray:
    """The scan vertices (P, 3) within :func:`crop_region`'s sphere (inclusive)."""
    vertices = np.asarray(vertices, dtype=np.float64)
    centre, radius = crop_region(landmarks)
    return vertices[np.linalg.norm(vertices - centre, axis=1) <= radius]


def scan_to_mesh_distances(points: np.ndarray, vertices: np.ndarray, triangles: np.ndarray,
                           chunk: int = 20000) -> np.ndarray:
    """Unsigned distance (P,) of each point (P, 3) to the closest point of the mesh surface
    (vertices (N, 3), triangles (F, 3)), in chunks to bound memory."""
    points = np.asarray(points, dtype=np.float64)
    vertices = np.asarray(vertices, dtype=np.float64)
    triangles = np.asarray(triangles)
    parts = [closest_points_on_mesh(points[i:i + chunk], vertices, triangles)[2] for i in range(0, len(points), chunk)]
    return np.concatenate(parts) if parts else np.zeros(0)


def _subsample(points: np.ndarray, count: int) -> np.ndarray:
    if len(points) <= count:
        return points
    return points[np.linspace(0, len(points) - 1, count).round().astype(np.int64)]


def _rotation_from_vector(omega: np.ndarray) -> np.ndarray:
    """Rotation matrix (3, 3) of an axis-angle vector (3,) (Rodrigues)."""
    angle = float(np.linalg.norm(omega))
    if angle < 1e-12:
        return np.eye(3)
    k = omega / angle
    cross = np.array([[0.0, -k[2], k[1]], [k[2], 0.0, -k[0]], [-k[1], k[0], 0.0]])
    return np.eye(3) + math.sin(angle) * cross + (1 - math.cos(angle)) * cross @ cross


def _gauss_newton_step(points: np.ndarray, closest: np.ndarray, directions: np.ndarray) -> Similarity:
    """One Gauss-Newton step on sum_i dist(points_i, surface)^2 over a similarity of the surface.

    points, closest: (P, 3) scan points and their closest surface points; directions: (P, 3)
    unit vectors from the surface to the points (the gradient of each distance). A small
    similarity moves a surface point q by w x q + s q + t; the distance then changes by
    -u . (w x q + s q + t) = -[(q x u) . w + (u . q) s + u . t], linear in (w, s, t)."""
    centre = closest.mean(axis=0)
    q = closest - centre
    residual = ((points - closest) * directions).sum(axis=1)
    jacobian = np.concatenate([np.cross(q, directions), (directions * q).sum(axis=1, keepdims=True), directions],
                              axis=1)  # (P, 7)
    step, *_ = np.linalg.lstsq(jacobian, residual, rcond=None)
    rotation, scale = _rotation_from_vector(step[:3]), 1.0 + float(step[3])
    return Similarity(scale, rotation, centre + step[4:] - scale * rotation @ centre)


def align_to_scan(pred_vertices: np.ndarray, triangles: np.ndarray, pred_landmarks: np.ndarray,
                  scan_points: np.ndarray, scan_landmarks: np.ndarray, iterations: int = ALIGN_ITERATIONS,
                  tolerance: float = ALIGN_TOLERANCE, max_points: int = ALIGN_MAX_POINTS
                  ) -> tuple[Similarity, Similarity]:
    """NoW's rigid alignment of a prediction to a cropped scan.

    pred_vertices (N, 3), triangles (F, 3), pred_landmarks (7, 3); scan_points (P, 3),
    scan_landmarks (7, 3). First the least-squares similarity (rotation, translation, one
    scale; no reflection) taking the predicted landmarks onto the scan's; then scale,
    rotation and translation are refined to minimise the mean squared distance of the scan
    points (up to ``max_points``, evenly spread) to the transformed predicted surface, NoW's
    objective: each iteration tries a Gauss-Newton step (:func:`_gauss_newton_step`) and,
    when that does not lower the cost, a closest-point step (the similarity taking the
    current closest surface points onto the scan points, which never raises it). Stops
    when the cost improves by less than ``tolerance`` (relative) or after ``iterations``.
    Returns (final similarity, landmark-only similarity), prediction -> scan.
    """
    pred_vertices = np.asarray(pred_vertices, dtype=np.float64)
    triangles = np.asarray(triangles)
    initial = umeyama(np.asarray(pred_landmarks, dtype=np.float64), np.asarray(scan_landmarks, dtype=np.float64))
    sample = _subsample(np.asarray(scan_points, dtype=np.float64), max_points)

    def evaluate(similarity: Similarity):
        moved = similarity.apply(pred_vertices)
        tri, bary, distance = closest_points_on_mesh(sample, moved, triangles)
        return float((distance**2).mean()), (moved, tri, bary, distance)

    current = initial
    cost, state = evaluate(current)
    for _ in range(iterations):
        moved, tri, bary, distance = state
        closest = (moved[triangles[tri]] * bary[..., None]).sum(axis=1)
        directions = sample - closest
        on_surface = distance < 1e-9
        directions[~on_surface] /= distance[~on_surface, None]
        if on_surface.any():
            directions[on_surface] = triangle_normals(moved, triangles)[tri[on_surface]]
        candidate = _gauss_newton_step(sample, closest, directions).compose(current)
        new_cost, new_state = evaluate(candidate)
        if not new_cost < cost:
            # the same surface points in the prediction's own frame (a similarity keeps barycentrics)
            source = (pred_vertices[triangles[tri]] * bary[..., None]).sum(axis=1)
            candidate = umeyama(source, sample)
            new_cost, new_state = evaluate(candidate)
            if not new_cost < cost:
                break
        improvement = cost - new_cost
        current, cost, state = candidate, new_cost, new_state
        if improvement <= tolerance * max(cost + improvement, 1e-12):
            break
    return current, initial


@dataclass
class NowGroundTruth:
    """A subject's scan prepared for scoring: cropped points (P, 3) mm, its 7 landmarks
    (7, 3), the crop sphere and the scan's vertex count."""

    points: np.ndarray
    landmarks: np.ndarray
    centre: np.ndarray
    radius: float
    scan_points: int


@dataclass
class NowScore:
    distances: np.ndarray   # (P,) mm, one per cropped scan vertex
    alignment: Similarity
    initial: Similarity

    def statistics(self) -> dict[str, float | int]:
        return pooled_statistics([self.distances])


def score_prediction(pred_vertices: np.ndarray, triangles: np.ndarray, pred_landmarks: np.ndarray,
                     gt: NowGroundTruth) -> NowScore:
    """Align a prediction (N, 3) + its 7 landmarks to a prepared scan and measure every
    cropped scan vertex's distance to the aligned surface."""
    alignment, initial = align_to_scan(pred_vertices, triangles, pred_landmarks, gt.points, gt.landmarks)
    distances = scan_to_mesh_distances(gt.points, alignment.apply(np.asarray(pred_vertices, dtype=np.float64)),
                                       triangles)
    return NowScore(distances, alignment, initial)


def pooled_statistics(arrays: Iterable[np.ndarray]) -> dict[str, Any]:
    """Median, mean and std (population) of all values of all arrays together (NoW pools the
    vertices of every image), and how many values there were."""
    parts = [np.asarray(a, dtype=np.float64).ravel() for a in arrays]
    values = np.concatenate(parts) if parts else np.zeros(0)
    values = values[np.isfinite(values)]
    if not len(values):
        return {"median_mm": None, "mean_mm": None, "std_mm": None, "points": 0}
    return {"median_mm": float(np.median(values)), "mean_mm": float(values.mean()), "std_mm": float(values.std()),
            "points": int(len(values))}


# --------------------------------------------------------------------------- layout


def read_landmarks(path: str | Path) -> np.ndarray:
    """7 landmarks (7, 3) from a MeshLab picked-points ``.pp`` file (``<point x= y= z=>`` in
    file order), a ``.npy`` or a whitespace-separated ``.txt``. Raises ValueError (one line)."""
    path = Path(path)
    try:
        if path.suffix.lower() == ".npy":
            points = np.load(path, allow_pickle=False)
        elif path.suffix.lower() == ".txt":
            points = np.loadtxt(path, ndmin=2)
        else:
            root = ElementTree.parse(path).getroot()
            points = [[float(p.attrib[a]) for a in ("x", "y", "z")] for p in root.iter("point")
                      if p.attrib.get("active", "1") != "0"]
    except (OSError, ValueError, KeyError, ElementTree.ParseError) as exc:
        raise InputError(f"unreadable landmarks {path.name}: {' '.join(str(exc).split())[:200]}") from None
    points = np.asarray(points, dtype=np.float64)
    if points.ndim != 2 or points.shape[1] != 3 or len(points) < 7:
        raise InputError(f"landmarks {path.name}: expected 7 points (x, y, z), found shape {points.shape}")
    if not np.all(np.isfinite(points[:7])):
        raise InputError(f"landmarks {path.name} has non-finite values")
    return points[:7]


def read_image_list(path: str | Path) -> list[str]:
    """Non-empty lines of a NoW image list (``#`` comments skipped), ``\\`` turned into ``/``."""
    lines = []
    for raw in Path(path).read_text(encoding="utf-8", errors="replace").splitlines():
        line = raw.strip().replace("\\", "/")
        if line and not line.startswith("#"):
            lines.append(line)
    return lines


def parse_entry(line: str) -> tuple[str, str, str]:
    """(subject, challenge, file name) from the last three parts of an image-list line."""
    parts = [p for p in line.split("/") if p]
    if len(parts) < 3:
        raise InputError(f"image-list line {line!r} is not <subject>/<challenge>/<image>")
    return parts[-3], parts[-2], parts[-1]


def find_dataset_folder(root: str | Path, split: str) -> Path:
    """The folder holding the split's image list: ROOT, ROOT/final_release_version or
    ROOT/NoW_Dataset/final_release_version."""
    root = Path(root)
    name = SPLIT_FILES[split]
    for folder in (root, root / "final_release_version", root / "NoW_Dataset" / "final_release_version"):
        if (folder / name).is_file():
            return folder
    raise InputError(f"{root} has no {name} (expected the NoW layout: {name}, iphone_pictures/, scans/, "
                     "scans_lmks_onlypp/; or give --image-list)")


@dataclass
class NowEntry:
    line: str
    subject: str
    challenge: str
    filename: str
    image: Path | None
    reason: str = ""

    @property
    def key(self) -> str:
        return f"{self.subject}/{self.challenge}/{self.filename}"

    @property
    def stem(self) -> str:
        return Path(self.filename).stem


def resolve_image(dataset: Path, line: str) -> Path | None:
    """The photo of an image-list line: ``iphone_pictures/<line>``, ``<line>`` relative to the
    dataset folder, or the line itself when absolute."""
    candidates = [Path(line)] if os.path.isabs(line) else [dataset / "iphone_pictures" / line, dataset / line]
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    return None


def discover_entries(root: str | Path, split: str = "val", image_list: str | Path | None = None,
                     challenges: Iterable[str] | None = None) -> tuple[Path, Path, list[NowEntry]]:
    """The dataset folder, the image list used and its entries (in list order, duplicates
    dropped, restricted to ``challenges`` when given). An entry whose photo is missing carries
    a reason."""
    if split not in SPLIT_FILES:
        raise InputError(f"unknown NoW split {split!r}: use {', '.join(SPLIT_FILES)}")
    root = Path(root)
    if image_list is not None:
        list_path = Path(image_list)
        if not list_path.is_file():
            raise InputError(f"image list {list_path} not found")
        try:
            dataset = find_dataset_folder(root, split)
        except ValueError:
            dataset = root
    else:
        dataset = find_dataset_folder(root, split)
        list_path = dataset / SPLIT_FILES[split]
    wanted = set(challenges) if challenges is not None else None
    entries, seen = [], set()
    for line in read_image_list(list_path):
        subject, challenge, filename = parse_entry(line)
        if wanted is not None and challenge not in wanted:
            continue
        entry = NowEntry(line, subject, challenge, filename, resolve_image(dataset, line))
        if entry.key in seen:
            continue
        seen.add(entry.key)
        if entry.image is None:
            entry.reason = f"missing image: {line} not found under {dataset / 'iphone_pictures'}"
        entries.append(entry)
    if not entries:
        raise InputError(f"{list_path} lists no images" + (" of the chosen challenges" if wanted else ""))
    return dataset, list_path, entries


def find_ground_truth(dataset: Path, subject: str) -> tuple[Path | None, Path | None, str]:
    """``scans/<subject>/*.obj`` and ``scans_lmks_onlypp/<subject>/*.pp`` (first by name; a
    ``.txt``/``.npy`` landmark file is accepted too). Returns (scan, landmarks, "") or
    (None, None, reason)."""
    scan_dir, lmk_dir = dataset / "scans" / subject, dataset / "scans_lmks_onlypp" / subject
    scans = sorted(scan_dir.glob("*.obj")) if scan_dir.is_dir() else []
    if not scans:
        return None, None, f"no ground-truth scan (scans/{subject}/*.obj)"
    marks = sorted(lmk_dir.glob("*.pp")) if lmk_dir.is_dir() else []
    if not marks and lmk_dir.is_dir():
        marks = sorted(p for p in lmk_dir.iterdir() if p.suffix.lower() in (".txt", ".npy"))
    if not marks:
        return None, None, f"no scan landmarks (scans_lmks_onlypp/{subject}/*.pp)"
    return scans[0], marks[0], ""


def prepare_ground_truth(scan_path: Path, landmarks_path: Path) -> NowGroundTruth:
    """Read a scan (mm) and its 7 landmarks and crop the scan to NoW's face sphere."""
    vertices, _ = read_obj(scan_path)
    vertices = vertices[np.all(np.isfinite(vertices), axis=1)]
    landmarks = read_landmarks(landmarks_path)
    centre, radius = crop_region(landmarks)
    points = vertices[np.linalg.norm(vertices - centre, axis=1) <= radius]
    if len(points) < MIN_SCAN_POINTS:
        raise InputError(f"scan {scan_path.name}: only {len(points)} vertices within {radius:.0f} mm of the face "
                         "centre given by its landmarks (scan and landmarks in different units?)")
    return NowGroundTruth(points, landmarks, centre, radius, int(len(vertices)))


# --------------------------------------------------------------------------- predictions


def prediction_paths(out_dir: Path, entry: NowEntry) -> tuple[Path, Path]:
    folder = Path(out_dir) / "predictions" / entry.subject / entry.challenge
    return folder / f"{entry.stem}.obj", folder / f"{entry.stem}.npy"


def write_prediction(obj_path: Path, npy_path: Path, vertices: np.ndarray, triangles: np.ndarray,
                     landmarks: np.ndarray) -> None:
    """A NoW submission item: the mesh (mm) as OBJ and its 7 landmarks (7, 3) as .npy, atomically."""
    lines = ["# facerecon NoW prediction, millimetres"]
    lines += [f"v {x:.5f} {y:.5f} {z:.5f}" for x, y, z in np.asarray(vertices, dtype=np.float64)]
    lines += [f"f {a + 1} {b + 1} {c + 1}" for a, b, c in np.asarray(triangles)]
    atomic_write_text(obj_path, "\n".join(lines) + "\n")
    with atomic_path(npy_path) as tmp:
        with open(tmp, "wb") as handle:
            np.save(handle, np.asarray(landmarks, dtype=np.float64))


def link_images(entries: Iterable[NowEntry], images_dir: Path) -> None:
    """Make ``images_dir/<subject>/<challenge>/<image>`` point at each entry's photo
    (symbolic link, else a copy) and remove anything else there, so a fit run on
    ``images_dir`` sees exactly the split's photos under unique keys."""
    wanted: dict[Path, Path] = {}
    for entry in entries:
        if entry.image is not None:
            wanted[images_dir / entry.subject / entry.challenge / entry.filename] = entry.image.resolve()
    if images_dir.is_dir():
        for folder, _dirs, files in os.walk(images_dir):
            for name in files:
                path = Path(folder) / name
                if path not in wanted:
                    path.unlink()
    for link, target in wanted.items():
        if link.is_symlink() and Path(os.readlink(link)) == target:
            continue
        if link.exists() or link.is_symlink():
            if not link.is_symlink() and link.stat().st_size == target.stat().st_size and \
                    link.stat().st_mtime >= target.stat().st_mtime:
                continue  # an earlier copy
            link.unlink()
        link.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.symlink(target, link)
        except (OSError, NotImplementedError):
            shutil.copy2(target, link)


# --------------------------------------------------------------------------- the run


@dataclass
class NowOptions:
    face_model: str | None = None
    split: str = "val"
    image_list: str | None = None
    challenges: tuple[str, ...] = CHALLENGES
    limit: int | None = None
    device: str = "auto"
    batch_size: int = 16
    checkpoint: str | None = None
    refine: int = 0
    settings: FitSettings = field(default_factory=FitSettings)


@dataclass
class NowResult:
    rows: list[dict]           # one per listed image
    by_challenge: list[dict]   # pooled statistics per challenge
    summary: dict

    def to_dict(self) -> dict:
        return {"protocol": "now", **self.summary, "challenges": self.by_challenge, "images": self.rows}


def _new_row(entry: NowEntry) -> dict[str, Any]:
    return {"image": entry.key, "subject": entry.subject, "challenge": entry.challenge, "status": STATUS_FAILED,
            "reason": entry.reason, "median_mm": None, "mean_mm": None, "std_mm": None, "points": None,
            "scale": None, "landmark_rmse_mm": None, "seconds": None, "resumed": False, "prediction": None,
            "landmarks": None, "path": str(entry.image) if entry.image else None}


def _settings_digest(options: NowOptions, model_id: str) -> str:
    settings = {"fit": options.settings.to_dict(), "model_id": model_id, "checkpoint": options.checkpoint or "",
                "refine": options.refine, "version": RESULT_VERSION, "landmarks": LANDMARK_INDICES68,
                "align": [ALIGN_MAX_POINTS, ALIGN_ITERATIONS, ALIGN_TOLERANCE]}
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]


def _result_paths(out_dir: Path, entry: NowEntry) -> tuple[Path, Path]:
    folder = out_dir / "results" / entry.subject / entry.challenge
    return folder / f"{entry.stem}.json", folder / f"{entry.stem}_distances.npy"


def _load_finished(out_dir: Path, entry: NowEntry, digest: str) -> tuple[dict, np.ndarray] | None:
    return load_finished(*_result_paths(out_dir, entry), digest, STATUS_OK)


def _store_finished(out_dir: Path, entry: NowEntry, row: dict, distances: np.ndarray, digest: str) -> None:
    store_finished(*_result_paths(out_dir, entry), row, distances.astype(np.float32), digest, RESULT_VERSION)


def _fitted_neutral(results, key: str) -> tuple[dict | None, np.ndarray | None]:
    """Attributes of a fitted image and the neutral vertices (N, 3) of its first face."""
    if key not in results:
        return None, None
    group = results[key]
    attrs = attrs_dict(group)
    faces = group.get("faces")
    if attrs.get("status") != "ok" or not faces:
        return attrs, None
    for name in sorted(faces, key=int):
        if "vertices_neutral" in faces[name]:
            return attrs, np.asarray(faces[name]["vertices_neutral"][()], dtype=np.float64)
    return attrs, None


def _fit_reason(attrs: dict | None, status: str | None, fit_summary, key: str) -> str:
    if attrs is None or status is None:
        reason = fit_summary.image_reasons.get(key) if fit_summary is not None else None
        if reason:
            return reason.splitlines()[0]
        interrupted = fit_summary is not None and fit_summary.interrupted
        return "not reconstructed (interrupted before this image)" if interrupted else "not reconstructed"
    if attrs.get("status") == "no_face":
        return "no face detected"
    error = str(attrs.get("error") or fit_summary.image_reasons.get(key) or "fit failed")
    return f"fit failed: {error.splitlines()[0]}"


def run_now(root: str | Path, out_dir: str | Path, options: NowOptions | None = None, progress=None,
            detect_progress=None, score_progress=None, should_stop: Callable[[], bool] | None = None) -> NowResult:
    """Reconstruct the split's images, write NoW predictions and score them against the scans
    present; writes now_results.json, now_results.csv and now_cumulative_error.png in ``out_dir``.

    ``progress`` / ``detect_progress`` / ``score_progress``: ``start(total)`` / ``advance()``
    callbacks of the fit, detect and scoring stages; ``should_stop()`` is polled between images
    and fit batches (an interrupted run keeps everything finished and reports ``interrupted``).
    """
    options = options or NowOptions()
    out_dir = Path(out_dir)
    started = time.perf_counter()
    dataset, list_path, entries = discover_entries(root, options.split, options.image_list, options.challenges)
    if options.limit is not None:
        entries = entries[:max(options.limit, 0)]
    model = resolve_face_model(options.face_model)
    pick_device(options.device)
    out_dir.mkdir(parents=True, exist_ok=True)
    digest = _settings_digest(options, model.model_id)

    fit_started = time.perf_counter()
    fit_summary = _fit_images(entries, out_dir, options, progress, detect_progress, should_stop)
    fit_seconds = time.perf_counter() - fit_started
    interrupted = bool(fit_summary is not None and fit_summary.interrupted)
    rows, distances, interrupted = _score_entries(entries, out_dir / "fit" / "fits.h5", fit_summary, model, dataset,
                                                  out_dir, digest, interrupted, score_progress, should_stop)
    summary = _summary(root, dataset, list_path, options, model, rows, distances, fit_summary, fit_seconds, started,
                       interrupted, out_dir)
    result = NowResult(rows, aggregate(rows, distances), summary)
    write_reports(result, out_dir, distances)
    return result


def _fit_images(entries: list[NowEntry], out_dir: Path, options: NowOptions, progress, detect_progress,
                should_stop) -> FitSummary | None:
    """Link the split's images into ``out_dir/images`` and fit them into ``out_dir/fit`` (None: no image)."""
    images_dir = out_dir / "images"
    link_images(entries, images_dir)
    if not any(e.image is not None for e in entries):
        return None
    fit_options = FitOptions(face_model=options.face_model, device=options.device, batch_size=options.batch_size,
                             formats=[], largest=True, overlays=False, texture_size=64,
                             checkpoint=options.checkpoint, refine=options.refine, settings=options.settings)
    return run_fit([str(images_dir)], out_dir / "fit", fit_options, progress=progress,
                   detect_progress=detect_progress, should_stop=should_stop)


def _score_entries(entries: list[NowEntry], fits_path: Path, fit_summary: FitSummary | None, model, dataset: Path,
                   out_dir: Path, digest: str, interrupted: bool, score_progress, should_stop
                   ) -> tuple[list[dict], dict[str, np.ndarray], bool]:
    """Write each image's prediction and score it against its scan: (rows, distances by image,
    interrupted); images never reached by an interrupted run are listed with that reason."""
    triangles = np.asarray(model.triangles)
    rows: list[dict] = []
    distances: dict[str, np.ndarray] = {}
    ground_truth: dict[str, NowGroundTruth | str] = {}
    if score_progress is not None:
        score_progress.start(len(entries))
    with open_results(fits_path, "images") as results:
        for entry in entries:
            if interrupted or (should_stop is not None and should_stop()):
                interrupted = True
                break
            row = _new_row(entry)
            rows.append(row)
            try:
                _predict_and_score(entry, row, results, fit_summary, model, triangles, dataset, out_dir, digest,
                                   ground_truth, distances)
            except KeyboardInterrupt:
                interrupted = True
                rows.pop()
                break
            except Exception as exc:  # noqa: BLE001 - one image's failure is a reason, the run goes on
                row["status"], row["reason"] = STATUS_FAILED, f"{type(exc).__name__}: {one_line(exc)}"
            if score_progress is not None:
                score_progress.advance()
            for subject in [s for s in ground_truth if s != entry.subject]:
                del ground_truth[subject]  # the list is grouped by subject: keep one scan in memory
    if interrupted:  # images never reached are still listed
        reached = {r["image"] for r in rows}
        for entry in entries:
            if entry.key not in reached:
                row = _new_row(entry)
                row["reason"] = row["reason"] or "not evaluated (interrupted)"
                rows.append(row)
    return rows, distances, interrupted


def _summary(root, dataset: Path, list_path: Path, options: NowOptions, model, rows: list[dict],
             distances: dict[str, np.ndarray], fit_summary: FitSummary | None, fit_seconds: float, started: float,
             interrupted: bool, out_dir: Path) -> dict:
    """The run's summary record (now_results.json without the rows)."""
    statuses = list(fit_summary.images.values()) if fit_summary is not None else []
    processed_now = statuses.count("ok") + statuses.count("no_face")
    overall = pooled_statistics(distances.values())
    scored = [r for r in rows if r["status"] == STATUS_OK]
    summary = {
        "root": str(root), "dataset": str(dataset), "split": options.split, "image_list": str(list_path),
        "model_id": model.model_id, "method": "network" if options.checkpoint else "optimize",
        "prediction": "fitted neutral shape (identity, expression zero), millimetres, canonical frame",
        "landmark_indices68": list(LANDMARK_INDICES68), "metric": METRIC,
        "alignment": (f"umeyama similarity on the 7 landmarks, then up to {ALIGN_ITERATIONS} closest-point "
                      f"similarity updates on up to {ALIGN_MAX_POINTS} scan points (no reflection, no trimming)"),
        "images_total": len(rows), "predicted": sum(1 for r in rows if r["status"] in (STATUS_OK, STATUS_PREDICTED)),
        "scored": len(scored), "missing_predictions": sum(1 for r in rows if r["status"] == STATUS_FAILED),
        **overall,
        "images_fitted_this_run": statuses.count("ok"),
        "images_resumed": sum(1 for r in rows if r["resumed"]),
        "fit_seconds": round(fit_seconds, 3),
        "seconds_per_image": round((time.perf_counter() - started) / processed_now, 3) if processed_now else None,
        "elapsed_seconds": round(time.perf_counter() - started, 3), "interrupted": interrupted,
        "fit_notes": list(fit_summary.notes) if fit_summary is not None else [],
        "predictions_dir": str(out_dir / "predictions"),
        "failures": [{"image": r["image"], "reason": r["reason"]} for r in rows if r["status"] == STATUS_FAILED],
        "not_scored": [{"image": r["image"], "reason": r["reason"]} for r in rows if r["status"] == STATUS_PREDICTED],
    }
    return summary


def _predict_and_score(entry: NowEntry, row: dict, results, fit_summary, model, triangles: np.ndarray,
                       dataset: Path, out_dir: Path, digest: str, ground_truth: dict, distances: dict) -> None:
    """Fill ``row`` for one image: prediction files from the fit, then the score (stored, or
    loaded when an earlier run finished it)."""
    if entry.image is None:
        return
    t0 = time.perf_counter()
    obj_path, npy_path = prediction_paths(out_dir, entry)
    finished = _load_finished(out_dir, entry, digest)
    status = fit_summary.images.get(entry.key) if fit_summary is not None else None
    current = status in ("ok", STATUS_SKIPPED, "no_face")  # fitted now, or done before with the same settings
    if finished is not None and status == STATUS_SKIPPED and obj_path.is_file() and npy_path.is_file():
        stored, vertex_distances = finished
        row.update(stored)
        row["resumed"] = True
        distances[entry.key] = vertex_distances
        return
    attrs, neutral = _fitted_neutral(results, entry.key) if current else (None, None)
    if neutral is None or not np.all(np.isfinite(neutral)):
        row["reason"] = _fit_reason(attrs, status if current else None, fit_summary, entry.key)
        return
    landmarks = landmark_points68(model, neutral, on_surface=True)[list(LANDMARK_INDICES68)]
    write_prediction(obj_path, npy_path, neutral, triangles, landmarks)
    row.update(status=STATUS_PREDICTED, prediction=str(obj_path), landmarks=str(npy_path))
    if entry.subject not in ground_truth:
        scan, marks, reason = find_ground_truth(dataset, entry.subject)
        if scan is None:
            ground_truth[entry.subject] = reason
        else:
            try:
                ground_truth[entry.subject] = prepare_ground_truth(scan, marks)
            except (ValueError, OSError, IndexError) as exc:
                ground_truth[entry.subject] = f"unusable ground truth: {one_line(exc)}"
    gt = ground_truth[entry.subject]
    if isinstance(gt, str):
        row["reason"] = gt
        row["seconds"] = round(time.perf_counter() - t0, 3)
        return
    score = score_prediction(neutral, triangles, landmarks, gt)
    moved = score.alignment.apply(landmarks)
    row.update(status=STATUS_OK, reason="", **score.statistics(), scale=float(score.alignment.scale),
               landmark_rmse_mm=float(np.sqrt(((moved - gt.landmarks) ** 2).sum(axis=1).mean())),
               seconds=round(time.perf_counter() - t0, 3))
    distances[entry.key] = score.distances.astype(np.float32)
    _store_finished(out_dir, entry, row, score.distances, digest)


def aggregate(rows: list[dict], distances: dict[str, np.ndarray]) -> list[dict]:
    """Per challenge (in NoW's order, then any other name): images, predicted, scored and the
    pooled median / mean / std of the scored images' vertex distances."""
    names = [c for c in CHALLENGES if any(r["challenge"] == c for r in rows)]
    names += sorted({r["challenge"] for r in rows} - set(names))
    table = []
    for name in names:
        group = [r for r in rows if r["challenge"] == name]
        scored = [r["image"] for r in group if r["status"] == STATUS_OK and r["image"] in distances]
        table.append({"challenge": name, "images": len(group),
                      "predicted": sum(1 for r in group if r["status"] in (STATUS_OK, STATUS_PREDICTED)),
                      "scored": len(scored), **pooled_statistics(distances[k] for k in scored)})
    return table


# --------------------------------------------------------------------------- reports

CSV_FIELDS = ["image", "subject", "challenge", "status", "reason", "median_mm", "mean_mm", "std_mm", "points",
              "scale", "landmark_rmse_mm", "seconds", "resumed", "prediction", "landmarks", "path"]


def write_reports(result: NowResult, out_dir: Path, distances: dict[str, np.ndarray]) -> None:
    """now_results.json, now_results.csv and now_cumulative_error.png (atomically)."""
    plots = {"cumulative_error": str(out_dir / "now_cumulative_error.png")}
    curves: dict[str, np.ndarray] = {}
    for row in result.by_challenge:
        keys = [r["image"] for r in result.rows if r["challenge"] == row["challenge"] and r["image"] in distances]
        if keys:
            curves[row["challenge"]] = np.concatenate([distances[k] for k in keys])
    if len(curves) > 1:
        curves["all"] = np.concatenate(list(curves.values()))
    plot_cumulative_distribution(curves, out_dir / "now_cumulative_error.png", "scan-to-mesh distance (mm)",
                                 ylabel="fraction of scan vertices", title="NoW: cumulative error")
    result.summary["plots"] = plots
    write_result_files(out_dir, "now_results", result.to_dict(), result.rows, CSV_FIELDS)
