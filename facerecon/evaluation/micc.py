"""The MICC Florence 3D Faces protocol (Bagdanov et al. 2011) as used by paper 000 (Deng et al.
2019) and Deep3DFaceRecon: one video in, one neutral shape out, scored against the subject's
neutral 3D scan.

Per (subject, scenario) video:

1. ``--frames N`` evenly spaced frames (default 30) are decoded (frame counts in MJPEG
   metadata are unreliable: the frames are counted by decoding the whole video) and written
   as PNGs to ``OUT/frames/<subject>/<scenario>/``;
2. every sampled frame is reconstructed with ``detect + fit`` (largest face) into
   ``OUT/fits/<subject>/<scenario>/``; the video's shape is the average of the fitted
   frames' neutral shapes (``vertices_neutral``: identity with expression set to zero);
3. the ground-truth scan (``Model/frontal1``, else ``frontal2``, else any view) is cropped
   to the vertices within 95 mm of its nose tip, found from the geometry alone
   (:func:`find_scan_nose_tip`);
4. the average shape is aligned to the cropped scan by ICP with rotation, translation and
   one isotropic scale, and the error is the root mean square of the point-to-plane
   distances of the scan vertices to the aligned shape (the mean unsigned point-to-surface
   distance is reported too).

Results: one row per video, mean ± std over subjects per scenario, JSON, CSV, a cumulative
error curve and a per-vertex error heat map on the model's mean face. Finished videos are
stored in ``OUT/results/<subject>/<scenario>.json`` and skipped on rerun; frames and fits are
resumable as well. Every failure is a one-line reason in its row and the run goes on.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np
from scipy.spatial import cKDTree

from facerecon.errors import InputError
from facerecon.evaluation.geometry import (Similarity, chunked_surface_distances, crop_sphere, find_nose_tip,
                                           icp_similarity)
from facerecon.evaluation.plots import plot_cumulative_errors, plot_heatmaps, render_vertex_values
from facerecon.evaluation.results import load_finished, one_line, store_finished, write_result_files
from facerecon.facemodel.resolve import resolve_face_model
from facerecon.fitting.optimize import FitSettings
from facerecon.io.atomic import atomic_path, atomic_write_text
from facerecon.io.images import IMAGE_EXTENSIONS
from facerecon.stages.fit import FitOptions, pick_device, read_fits, run_fit

SCENARIOS = {"cooperative": "Indoor-Cooperative", "indoor": "PTZ-Indoor", "outdoor": "PTZ-Outdoor"}
VIEWS = ("frontal1", "frontal2")
VIDEO_EXTENSIONS = (".mjpg", ".mjpeg", ".mpg", ".avi")
CROP_RADIUS_MM = 95.0
DEFAULT_FRAMES = 30
MIN_SCAN_POINTS = 200
RESULT_VERSION = 1
VARIANT = "deng2019-p2plane"
VARIANT_DESCRIPTION = ("paper 000 / Deep3DFaceRecon: neutral shape averaged over the sampled frames; scan cropped to "
                       "95 mm around its automatically found nose tip; ICP with rotation, translation and one "
                       "isotropic scale; point-to-plane RMSE of the scan vertices (normal of the prediction's "
                       "closest triangle); mean point-to-surface distance (scan to prediction) also reported")
NOSE_TIP_METHOD = ("find_nose_tip on the whole scan (least-variance principal axis oriented to the convex side, most "
                   "forward point near the axis), repeated on the 95 mm crop around that first estimate")
FRAMES_MARKER = "frames.json"
STATUS_OK, STATUS_FAILED = "ok", "failed"
SUBJECT_PATTERN = re.compile(r"subject_?(\d+)", re.IGNORECASE)


# --------------------------------------------------------------------------- layout


@dataclass
class VideoSource:
    """A scenario's video: a video file (``kind='video'``) or a folder of frames (``'frames'``)."""

    path: Path
    kind: str


@dataclass
class MiccSubject:
    name: str
    folder: Path
    scan: Path | None
    scan_view: str | None
    scan_reason: str
    videos: dict[str, VideoSource | None]


def _visible(path: Path) -> bool:
    return not path.name.startswith(".")


def _subject_order(path: Path) -> tuple[int, str]:
    match = SUBJECT_PATTERN.fullmatch(path.name)
    return (int(match.group(1)) if match else 10**9, path.name)


def find_scan(subject_dir: Path) -> tuple[Path | None, str | None, str]:
    """The ground-truth scan ``Model/<view>/obj/<timestamp>.obj`` of a subject: view frontal1,
    else frontal2, else the first other view by name; the first OBJ by name within the view.
    Returns ``(path, view, "")`` or ``(None, None, reason)``."""
    model_dir = Path(subject_dir) / "Model"
    if not model_dir.is_dir():
        return None, None, "missing scan: no Model/ folder"
    present = sorted(d.name for d in model_dir.iterdir() if d.is_dir() and _visible(d))
    order = [v for v in VIEWS if v in present] + [v for v in present if v not in VIEWS]
    for view in order:
        obj_dir = model_dir / view / "obj"
        if obj_dir.is_dir():
            objs = sorted(p for p in obj_dir.iterdir() if p.is_file() and _visible(p) and p.suffix.lower() == ".obj")
            if objs:
                return objs[0], view, ""
    looked = ", ".join(order) if order else "none"
    return None, None, f"missing scan: no Model/<view>/obj/*.obj (views present: {looked})"


def _has_images(folder: Path) -> bool:
    return any(p.is_file() and _visible(p) and p.suffix.lower() in IMAGE_EXTENSIONS for p in folder.iterdir())


def find_video(subject_dir: Path, scenario: str) -> VideoSource | None:
    """The scenario's video in ``Video/``: a file named ``<prefix>.<ext>`` (``.mjpg``, ``.mjpeg``,
    ``.mpg``, ``.avi``; case-insensitive, a name that merely starts with the prefix also
    counts), else a folder of frames named like that. None when there is neither."""
    prefix = SCENARIOS[scenario].lower()
    video_dir = Path(subject_dir) / "Video"
    if not video_dir.is_dir():
        return None
    entries = sorted((p for p in video_dir.iterdir() if _visible(p)), key=lambda p: p.name)

    def rank(path: Path) -> int | None:
        stem = (path.stem if path.is_file() else path.name).lower()
        if stem == prefix:
            return 0
        if stem.startswith(prefix) and not stem[len(prefix)].isalpha():
            return 1
        return None

    files = [(rank(p), p) for p in entries if p.is_file() and p.suffix.lower() in VIDEO_EXTENSIONS]
    files = [(r, p) for r, p in files if r is not None]
    if files:
        return VideoSource(min(files, key=lambda rp: rp[0])[1], "video")
    folders = [(rank(p), p) for p in entries if p.is_dir()]
    folders = [(r, p) for r, p in folders if r is not None and _has_images(p)]
    if folders:
        return VideoSource(min(folders, key=lambda rp: rp[0])[1], "frames")
    return None


def discover_subjects(root: str | Path, scenarios: Iterable[str] = tuple(SCENARIOS)) -> list[MiccSubject]:
    """Subjects of a MICC tree (``ROOT/subject_XX``, sorted by number; ROOT may also be one
    subject's folder), with their scan and one video source per scenario (None if absent)."""
    root = Path(root)
    scenarios = list(scenarios)
    unknown = [s for s in scenarios if s not in SCENARIOS]
    if unknown:
        raise InputError(f"unknown MICC scenario(s) {', '.join(unknown)}: use {', '.join(SCENARIOS)}")
    if not root.is_dir():
        raise InputError(f"{root} is not a folder")
    folders = sorted((d for d in root.iterdir() if d.is_dir() and SUBJECT_PATTERN.fullmatch(d.name)),
                     key=_subject_order)
    if not folders and ((root / "Model").is_dir() or (root / "Video").is_dir()):
        folders = [root]
    if not folders:
        raise InputError(f"{root} has no subject_XX folders (expected the MICC layout "
                         "ROOT/subject_XX/Model/<view>/obj/*.obj and ROOT/subject_XX/Video/)")
    subjects = []
    for folder in folders:
        scan, view, reason = find_scan(folder)
        subjects.append(MiccSubject(folder.name, folder, scan, view, reason,
                                    {s: find_video(folder, s) for s in scenarios}))
    return subjects


# --------------------------------------------------------------------------- frames


def count_decodable_frames(path: str | Path) -> int:
    """Frames of a video counted by decoding every one (container metadata is unreliable)."""
    import cv2

    capture = cv2.VideoCapture(str(path))
    try:
        if not capture.isOpened():
            return 0
        count = 0
        while True:
            ok, _ = capture.read()
            if not ok:
                return count
            count += 1
    finally:
        capture.release()


def sample_indices(total: int, count: int) -> list[int]:
    """``count`` evenly spaced frame indices of ``total`` (the centre of each of ``count``
    equal segments); every frame when ``total <= count``."""
    if total <= 0 or count <= 0:
        return []
    if total <= count:
        return list(range(total))
    return [int(i) for i in np.floor((np.arange(count) + 0.5) * total / count)]


def frame_name(index: int) -> str:
    return f"frame_{index:06d}.png"


@dataclass
class FrameSample:
    """The frames sampled from one video: how many it decodes to, which were taken, which
    PNG files hold them (frames that failed to decode are missing from ``files``)."""

    source: str
    kind: str
    decoded: int
    indices: list[int]
    files: list[str]
    reused: bool = False


def _write_bgr_png(path: Path, bgr: np.ndarray) -> None:
    import cv2

    ok, data = cv2.imencode(".png", bgr)
    if not ok:
        raise OSError(f"cannot encode {path.name}")
    with atomic_path(path) as tmp:
        tmp.write_bytes(data.tobytes())


def _folder_images(folder: Path) -> list[Path]:
    return sorted((p for p in folder.iterdir() if p.is_file() and _visible(p) and p.suffix.lower() in IMAGE_EXTENSIONS),
                  key=lambda p: p.name)


def sample_frames(source: VideoSource, out_dir: str | Path, count: int = DEFAULT_FRAMES,
                  should_stop: Callable[[], bool] | None = None) -> FrameSample:
    """Decode ``count`` evenly spaced frames of ``source`` into ``out_dir/frame_<index>.png``.

    Resumable: when ``out_dir/frames.json`` records the same source and count and every
    listed PNG is there, nothing is decoded again. PNGs of an earlier, different sampling are
    removed so that only the current sample is reconstructed.
    """
    import cv2

    out_dir = Path(out_dir)
    marker = out_dir / FRAMES_MARKER
    source_id = str(Path(source.path).resolve())
    if marker.is_file():
        try:
            stored = json.loads(marker.read_text())
            if stored.get("source") == source_id and stored.get("requested") == count and \
                    all((out_dir / f).is_file() for f in stored.get("files", [])):
                return FrameSample(source_id, stored["kind"], int(stored["decoded"]), list(stored["indices"]),
                                   list(stored["files"]), reused=True)
        except (ValueError, KeyError, TypeError):
            pass
    out_dir.mkdir(parents=True, exist_ok=True)
    files: list[str] = []
    if source.kind == "frames":
        images = _folder_images(Path(source.path))
        total = len(images)
        indices = sample_indices(total, count)
        wanted = {frame_name(i) for i in indices}
        _remove_stale(out_dir, wanted)
        for index in indices:
            image = cv2.imread(str(images[index]), cv2.IMREAD_COLOR)
            if image is not None:
                _write_bgr_png(out_dir / frame_name(index), image)
                files.append(frame_name(index))
    else:
        total = count_decodable_frames(source.path)
        indices = sample_indices(total, count)
        wanted_set = set(indices)
        _remove_stale(out_dir, {frame_name(i) for i in indices})
        capture = cv2.VideoCapture(str(source.path))
        try:
            index = 0
            while wanted_set and index <= max(wanted_set):
                if should_stop is not None and should_stop():
                    break
                ok, frame = capture.read()
                if not ok:
                    break
                if index in wanted_set:
                    _write_bgr_png(out_dir / frame_name(index), frame)
                    files.append(frame_name(index))
                index += 1
        finally:
            capture.release()
    if should_stop is None or not should_stop():
        atomic_write_text(marker, json.dumps({"source": source_id, "kind": source.kind, "requested": count,
                                              "decoded": total, "indices": indices, "files": files}, indent=1))
    return FrameSample(source_id, source.kind, total, indices, files)


def _remove_stale(out_dir: Path, wanted: set[str]) -> None:
    for path in out_dir.glob("frame_*.png"):
        if path.name not in wanted:
            path.unlink()


# --------------------------------------------------------------------------- shapes


def average_neutral(fits: Iterable[tuple[str, dict, list[dict]]], keys: Iterable[str] | None = None
                    ) -> tuple[np.ndarray | None, list[str]]:
    """Protocol step 2: the mean of ``vertices_neutral`` (identity, zero expression, canonical
    frame) over the fitted frames, as yielded by :func:`facerecon.stages.fit.read_fits`.

    Only frames whose key is in ``keys`` (when given), whose status is ``ok`` and whose first
    (largest) face has finite neutral vertices count. Returns ``(mean (N, 3) or None, keys used)``.
    """
    wanted = None if keys is None else set(keys)
    total, used = None, []
    for key, attrs, faces in fits:
        if wanted is not None and key not in wanted:
            continue
        if attrs.get("status") != "ok" or not faces or "vertices_neutral" not in faces[0]:
            continue
        vertices = np.asarray(faces[0]["vertices_neutral"], dtype=np.float64)
        if not np.all(np.isfinite(vertices)):
            continue
        total = vertices.copy() if total is None else total + vertices
        used.append(key)
    return (None if total is None else total / len(used)), sorted(used)


def read_obj(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """Vertices (N, 3) and triangles (F, 3) of an OBJ (``v``/``f`` lines; polygons are
    fanned; ``v/vt/vn`` and negative indices understood; other lines ignored)."""
    vertices, faces = [], []
    with open(path, "r", encoding="utf-8", errors="replace") as handle:
        for line in handle:
            if line.startswith("v "):
                parts = line.split()
                vertices.append((float(parts[1]), float(parts[2]), float(parts[3])))
            elif line.startswith("f "):
                corners = []
                for token in line.split()[1:]:
                    index = int(token.split("/")[0])
                    corners.append(index - 1 if index > 0 else len(vertices) + index)
                faces.extend((corners[0], corners[i], corners[i + 1]) for i in range(1, len(corners) - 1))
    return np.asarray(vertices, dtype=np.float64).reshape(-1, 3), np.asarray(faces, dtype=np.int64).reshape(-1, 3)


@dataclass
class GroundTruth:
    """A scan cropped for scoring: points (P, 3) mm, nose tip, scan size, point spacing (mm)."""

    points: np.ndarray
    tip: np.ndarray
    scan_points: int
    spacing: float


def find_scan_nose_tip(vertices: np.ndarray, radius_mm: float = CROP_RADIUS_MM) -> np.ndarray:
    """The nose tip of a scan: :func:`find_nose_tip` on the whole scan, then again on the
    ``radius_mm`` crop around that estimate (neck, shoulders and hair no longer tilt the
    principal axes; the crop is a shallow face shell)."""
    tip = find_nose_tip(vertices)
    near, _, _ = crop_sphere(vertices, tip, radius_mm)
    return find_nose_tip(near) if len(near) >= MIN_SCAN_POINTS else tip


def prepare_scan(path: str | Path, radius_mm: float = CROP_RADIUS_MM) -> GroundTruth:
    """Read a ground-truth scan (mm) and crop it to ``radius_mm`` around its nose tip."""
    vertices, _ = read_obj(path)
    vertices = vertices[np.all(np.isfinite(vertices), axis=1)]
    if len(vertices) < MIN_SCAN_POINTS:
        raise InputError(f"scan {Path(path).name} has {len(vertices)} vertices")
    tip = find_scan_nose_tip(vertices, radius_mm)
    points, _, _ = crop_sphere(vertices, tip, radius_mm)
    if len(points) < MIN_SCAN_POINTS:
        raise InputError(f"scan {Path(path).name}: only {len(points)} vertices within {radius_mm:g} mm of the nose tip")
    spacing = float(np.median(cKDTree(points).query(points, k=2)[0][:, 1]))
    return GroundTruth(points, tip, int(len(vertices)), spacing)


def _rotation_between(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """The smallest rotation taking unit vector ``a`` to unit vector ``b``."""
    v, c = np.cross(a, b), float(a @ b)
    if c < -1 + 1e-9:  # opposite: half turn about an axis perpendicular to a
        axis = np.cross(a, [1.0, 0, 0] if abs(a[0]) < 0.9 else [0, 1.0, 0])
        axis /= np.linalg.norm(axis)
        return 2 * np.outer(axis, axis) - np.eye(3)
    vx = np.array([[0, -v[2], v[1]], [v[2], 0, -v[0]], [-v[1], v[0], 0]])
    return np.eye(3) + vx + vx @ vx / (1 + c)


def initial_alignment(pred_vertices: np.ndarray, pred_tip_index: int, gt: GroundTruth) -> Similarity:
    """ICP start: the prediction (canonical frame: +y up, +z out of the face, mm) unscaled,
    its nose-tip vertex on the scan's nose tip; turned onto the scan's forward axis (least
    principal axis of the crop, oriented towards the nose) only when that axis is more than
    45 degrees from +z (scans in another convention)."""
    centred = gt.points - gt.points.mean(axis=0)
    forward = np.linalg.svd(centred, full_matrices=False)[2][2]
    if (gt.tip - gt.points.mean(axis=0)) @ forward < 0:
        forward = -forward
    z = np.array([0.0, 0.0, 1.0])
    rotation = np.eye(3) if forward @ z >= math.cos(math.radians(45)) else _rotation_between(z, forward)
    return Similarity(1.0, rotation, gt.tip - rotation @ pred_vertices[pred_tip_index])


@dataclass
class VideoScore:
    rmse_point_to_plane: float
    mean_point_to_surface: float
    median_point_to_surface: float
    points: int
    scale: float
    vertex_errors: np.ndarray  # (N,) point-to-plane error at each model vertex, NaN off the crop


def score_shape(pred_vertices: np.ndarray, triangles: np.ndarray, pred_tip_index: int, gt: GroundTruth
                ) -> VideoScore:
    """Protocol steps 4-5 plus the per-vertex transfer used by the heat map: each model vertex
    of the aligned prediction takes the point-to-plane error of its nearest scan point when
    that point is within max(3 mm, 2.5 x scan spacing), else NaN."""
    pred_vertices = np.asarray(pred_vertices, dtype=np.float64)
    alignment = icp_similarity(pred_vertices, gt.points, initial_alignment(pred_vertices, pred_tip_index, gt))
    aligned = alignment.apply(pred_vertices)
    distance, plane = chunked_surface_distances(gt.points, aligned, np.asarray(triangles))
    near, index = cKDTree(gt.points).query(aligned)
    vertex_errors = np.where(near <= max(3.0, 2.5 * gt.spacing), plane[index], np.nan)
    return VideoScore(float(np.sqrt((plane**2).mean())), float(distance.mean()), float(np.median(distance)),
                      int(len(gt.points)), float(alignment.scale), vertex_errors.astype(np.float32))


# --------------------------------------------------------------------------- the run


@dataclass
class MiccOptions:
    face_model: str | None = None
    scenarios: tuple[str, ...] = tuple(SCENARIOS)
    frames: int = DEFAULT_FRAMES
    device: str = "auto"
    batch_size: int = 16
    settings: FitSettings = field(default_factory=FitSettings)


@dataclass
class MiccResult:
    rows: list[dict]          # one per (subject, scenario)
    by_scenario: list[dict]   # mean ± std over subjects
    summary: dict

    def to_dict(self) -> dict:
        return {"protocol": "micc", **self.summary, "scenarios": self.by_scenario, "videos": self.rows}


def _new_row(subject: MiccSubject, scenario: str) -> dict[str, Any]:
    video = subject.videos.get(scenario)
    return {"subject": subject.name, "scenario": scenario, "status": STATUS_FAILED, "reason": "",
            "rmse_mm": None, "mean_mm": None, "median_mm": None, "baseline_rmse_mm": None, "frames_decoded": None,
            "frames_sampled": None, "frames_fitted": None, "gt_points": None, "scale": None, "seconds": None,
            "resumed": False,
            "scan": str(subject.scan) if subject.scan else None, "scan_view": subject.scan_view,
            "video": str(video.path) if video else None, "video_kind": video.kind if video else None}


def _result_paths(out_dir: Path, subject: str, scenario: str) -> tuple[Path, Path]:
    folder = out_dir / "results" / subject
    return folder / f"{scenario}.json", folder / f"{scenario}_vertex_errors.npy"


def _load_finished(out_dir: Path, subject: str, scenario: str, digest: str) -> tuple[dict, np.ndarray] | None:
    return load_finished(*_result_paths(out_dir, subject, scenario), digest, STATUS_OK)


def _store_finished(out_dir: Path, row: dict, vertex_errors: np.ndarray, digest: str) -> None:
    store_finished(*_result_paths(out_dir, row["subject"], row["scenario"]), row, vertex_errors, digest,
                   RESULT_VERSION)


def _no_shape_reason(fits_path: Path, files: list[str], fit_summary) -> str:
    """Why no frame of a video gave a shape (one line)."""
    statuses: dict[str, str] = {}
    reasons: list[str] = []
    if fits_path.is_file():
        for key, attrs, _faces in read_fits(fits_path):
            if key in files:
                statuses[key] = attrs.get("status", "")
                if attrs.get("error"):
                    reasons.append(str(attrs["error"]))
    reasons += [fit_summary.image_reasons[k] for k in files if k in fit_summary.image_reasons]
    no_face = sum(1 for s in statuses.values() if s == "no_face")
    if no_face == len(files):
        return f"no face detected in any of {len(files)} sampled frames"
    detail = f": {reasons[0].splitlines()[0]}" if reasons else ""
    return f"no frame could be fitted ({no_face} of {len(files)} without a face){detail}"


def _evaluate_video(subject: MiccSubject, scenario: str, model, gt: GroundTruth, out_dir: Path, options: MiccOptions,
                    should_stop) -> tuple[dict, np.ndarray | None, bool]:
    """Sample, reconstruct and score one video. Returns (row, vertex errors or None, interrupted)."""
    row = _new_row(subject, scenario)
    source = subject.videos[scenario]
    frames_dir = out_dir / "frames" / subject.name / scenario
    sample = sample_frames(source, frames_dir, options.frames, should_stop)
    row.update(frames_decoded=sample.decoded, frames_sampled=len(sample.files))
    if should_stop is not None and should_stop():
        return row, None, True
    if not sample.files:
        what = "frames decoded from" if source.kind == "video" else "readable frames in"
        row["reason"] = f"no {what} {source.path}"
        return row, None, False
    fits_dir = out_dir / "fits" / subject.name / scenario
    fit_options = FitOptions(face_model=options.face_model, device=options.device, batch_size=options.batch_size,
                             formats=["ply"], largest=True, overlays=False, texture_size=256,
                             settings=options.settings)
    fit_summary = run_fit([str(frames_dir)], fits_dir, fit_options, should_stop=should_stop)
    if fit_summary.interrupted:
        return row, None, True
    fits_path = fits_dir / "fits.h5"
    shape, used = average_neutral(read_fits(fits_path), sample.files) if fits_path.is_file() else (None, [])
    row["frames_fitted"] = len(used)
    if shape is None:
        row["reason"] = _no_shape_reason(fits_path, sample.files, fit_summary)
        return row, None, False
    score = score_shape(shape, model.triangles, int(model.landmarks68[30]), gt)
    row.update(status=STATUS_OK, rmse_mm=score.rmse_point_to_plane, mean_mm=score.mean_point_to_surface,
               median_mm=score.median_point_to_surface, gt_points=score.points, scale=score.scale)
    return row, score.vertex_errors, False


def _settings_digest(options: MiccOptions, model_id: str) -> str:
    settings = {"frames": options.frames, "fit": options.settings.to_dict(), "model_id": model_id,
                "variant": VARIANT, "crop_radius_mm": CROP_RADIUS_MM, "version": RESULT_VERSION}
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]


def _mean_std(values: list[float]) -> tuple[float | None, float | None]:
    if not values:
        return None, None
    array = np.asarray(values, dtype=np.float64)
    return float(array.mean()), float(array.std())


def aggregate(rows: list[dict], scenarios: Iterable[str]) -> list[dict]:
    """Per scenario: videos, scored, mean ± std (population, over subjects) of RMSE and mean
    distance, mean-face baseline RMSE, mean seconds per video."""
    table = []
    for scenario in scenarios:
        group = [r for r in rows if r["scenario"] == scenario]
        ok = [r for r in group if r["status"] == STATUS_OK]
        rmse_mean, rmse_std = _mean_std([r["rmse_mm"] for r in ok])
        dist_mean, dist_std = _mean_std([r["mean_mm"] for r in ok])
        seconds = [r["seconds"] for r in ok if r.get("seconds") is not None]
        baseline = [r["baseline_rmse_mm"] for r in ok if r.get("baseline_rmse_mm") is not None]
        table.append({"scenario": scenario, "videos": len(group), "scored": len(ok),
                      "rmse_mean_mm": rmse_mean, "rmse_std_mm": rmse_std,
                      "mean_distance_mean_mm": dist_mean, "mean_distance_std_mm": dist_std,
                      "baseline_rmse_mean_mm": float(np.mean(baseline)) if baseline else None,
                      "seconds_per_video": float(np.mean(seconds)) if seconds else None})
    return table


def run_micc(root: str | Path, out_dir: str | Path, options: MiccOptions | None = None, progress=None,
             on_video: Callable[[dict], None] | None = None, should_stop=None) -> MiccResult:
    """Evaluate every (subject, scenario) video under ``root``; writes micc_results.json,
    micc_results.csv, micc_cumulative_error.png and micc_error_heatmap.png in ``out_dir``.

    ``progress``: ``start(videos)`` / ``advance()`` callbacks; ``on_video(row)`` after each
    video; ``should_stop()`` polled between videos and fit batches (interrupted runs keep
    finished videos and report ``interrupted``).
    """
    options = options or MiccOptions()
    if options.frames < 1:
        raise InputError("--frames must be at least 1")
    out_dir = Path(out_dir)
    started = time.perf_counter()
    subjects = discover_subjects(root, options.scenarios)
    model = resolve_face_model(options.face_model)
    pick_device(options.device)  # a bad device fails before any work
    out_dir.mkdir(parents=True, exist_ok=True)
    digest = _settings_digest(options, model.model_id)
    ground_truth: dict[str, GroundTruth | str] = {}
    baselines: dict[str, float] = {}  # the model's mean face scored against each subject's scan
    rows: list[dict] = []
    errors: dict[tuple[str, str], np.ndarray] = {}
    interrupted = False
    if progress is not None:
        progress.start(len(subjects) * len(options.scenarios))
    for subject in subjects:
        for scenario in options.scenarios:
            if should_stop is not None and should_stop():
                interrupted = True
                break
            finished = _load_finished(out_dir, subject.name, scenario, digest)
            if finished is not None:
                row, vertex_errors = finished
                row["resumed"] = True
                rows.append(row)
                errors[(subject.name, scenario)] = vertex_errors
            else:
                t0 = time.perf_counter()
                row, vertex_errors, stop = _run_video(subject, scenario, model, out_dir, options, should_stop,
                                                      ground_truth, baselines)
                if stop:
                    interrupted = True
                    break
                row["seconds"] = round(time.perf_counter() - t0, 3)
                rows.append(row)
                if row["status"] == STATUS_OK and vertex_errors is not None:
                    errors[(subject.name, scenario)] = vertex_errors
                    _store_finished(out_dir, row, vertex_errors, digest)
            if on_video is not None:
                on_video(row)
            if progress is not None:
                progress.advance()
        if interrupted:
            break
    result = MiccResult(rows, aggregate(rows, options.scenarios),
                        _summary(root, options, model, subjects, rows, started, interrupted))
    write_reports(result, out_dir, model, errors)
    return result


def _run_video(subject, scenario: str, model, out_dir: Path, options: MiccOptions, should_stop,
               ground_truth: dict, baselines: dict[str, float]) -> tuple[dict, np.ndarray | None, bool]:
    """Evaluate one (subject, scenario) video not finished before: (row, per-vertex errors or None,
    stop requested). Its scan is prepared once per subject (``ground_truth``), and the mean face is
    scored against it once (``baselines``); a failure is the row's reason, not an exception."""
    row = _new_row(subject, scenario)
    vertex_errors, stop = None, False
    try:
        if subject.scan is None:
            row["reason"] = subject.scan_reason
        elif subject.videos.get(scenario) is None:
            row["reason"] = f"missing video: no Video/{SCENARIOS[scenario]}.* (nor a frame folder)"
        else:
            if subject.name not in ground_truth:
                try:
                    ground_truth[subject.name] = prepare_scan(subject.scan)
                except (ValueError, OSError, IndexError) as exc:
                    ground_truth[subject.name] = f"unusable scan: {one_line(exc)}"
            gt = ground_truth[subject.name]
            if isinstance(gt, str):
                row["reason"] = gt
            else:
                row, vertex_errors, stop = _evaluate_video(subject, scenario, model, gt, out_dir, options,
                                                            should_stop)
                if row["status"] == STATUS_OK:
                    if subject.name not in baselines:
                        baselines[subject.name] = score_shape(
                            model.mean_shape, model.triangles, int(model.landmarks68[30]), gt).rmse_point_to_plane
                    row["baseline_rmse_mm"] = baselines[subject.name]
    except KeyboardInterrupt:
        stop = True
    except Exception as exc:  # noqa: BLE001 - one video's failure is a reason, the run goes on
        row["reason"] = f"{type(exc).__name__}: {one_line(exc)}"
    return row, vertex_errors, stop


def _summary(root, options: MiccOptions, model, subjects: list, rows: list[dict], started: float,
             interrupted: bool) -> dict:
    """The run's summary record (micc_results.json without the rows)."""
    ok = [r for r in rows if r["status"] == STATUS_OK]
    overall_mean, overall_std = _mean_std([r["rmse_mm"] for r in ok])
    run_seconds = [r["seconds"] for r in rows if not r["resumed"] and r["status"] == STATUS_OK]
    summary = {
        "root": str(root), "variant": VARIANT, "variant_description": VARIANT_DESCRIPTION,
        "nose_tip": NOSE_TIP_METHOD, "crop_radius_mm": CROP_RADIUS_MM,
        "metric": "point-to-plane RMSE (mm) after ICP with isotropic scale",
        "frames_per_video": options.frames, "scenario_names": list(options.scenarios),
        "model_id": model.model_id, "subjects": len(subjects), "videos": len(rows), "scored": len(ok),
        "rmse_mean_mm": overall_mean, "rmse_std_mm": overall_std,
        "seconds_per_video": float(np.mean(run_seconds)) if run_seconds else None,
        "seconds_per_video_all": float(np.mean([r["seconds"] for r in ok if r.get("seconds") is not None]))
        if ok else None,
        "elapsed_seconds": round(time.perf_counter() - started, 3), "interrupted": interrupted,
        "failures": [{"subject": r["subject"], "scenario": r["scenario"], "reason": r["reason"]}
                     for r in rows if r["status"] != STATUS_OK],
    }
    return summary


# --------------------------------------------------------------------------- reports

CSV_FIELDS = ["subject", "scenario", "status", "reason", "rmse_mm", "mean_mm", "median_mm", "baseline_rmse_mm",
              "frames_decoded", "frames_sampled", "frames_fitted", "gt_points", "scale", "seconds", "resumed",
              "scan_view", "scan", "video"]


def write_reports(result: MiccResult, out_dir: Path, model, errors: dict[tuple[str, str], np.ndarray]) -> None:
    """micc_results.json, micc_results.csv, micc_cumulative_error.png and (when anything was
    scored) micc_error_heatmap.png."""
    plots = {"cumulative_error": str(out_dir / "micc_cumulative_error.png")}
    curves = {s: [r["rmse_mm"] for r in result.rows if r["scenario"] == s and r["status"] == STATUS_OK]
              for s in result.summary["scenario_names"]}
    plot_cumulative_errors(curves, out_dir / "micc_cumulative_error.png", "point-to-plane RMSE (mm)",
                           title="MICC: fraction of subjects below error")
    panels, values = [], []
    for scenario in result.summary["scenario_names"]:
        stack = [e for (_subject, s), e in sorted(errors.items()) if s == scenario and len(e) == model.n_vertices]
        if stack:
            with warnings.catch_warnings():  # vertices no subject's scan covers stay NaN
                warnings.simplefilter("ignore", category=RuntimeWarning)
                mean = np.nanmean(np.stack(stack).astype(np.float64), axis=0)
            panels.append((f"{scenario} (n={len(stack)})", mean))
            values.append(mean[np.isfinite(mean)])
    if panels:
        finite = np.concatenate(values)
        vmax = float(np.percentile(finite, 95)) if len(finite) else 1.0
        vmax = max(vmax, 0.5)
        images = [(name, render_vertex_values(model.mean_shape, model.triangles, mean, vmax)) for name, mean in panels]
        plot_heatmaps(images, vmax, out_dir / "micc_error_heatmap.png", "point-to-plane error (mm)",
                      title="MICC: mean per-vertex error on the mean face")
        plots["error_heatmap"] = str(out_dir / "micc_error_heatmap.png")
    result.summary["plots"] = plots
    write_result_files(out_dir, "micc_results", result.to_dict(), result.rows, CSV_FIELDS)
