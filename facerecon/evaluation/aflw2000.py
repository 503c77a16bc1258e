"""The AFLW2000-3D protocol (68 landmarks): normalised mean error (NME) by yaw bin.

Layout read (as distributed): one folder of ``image<NNNNN>.jpg`` photos, each with an
``image<NNNNN>.mat`` beside it holding ``pt3d_68`` (3 x 68: x, y in image pixels, z) and
``Pose_Para`` (1 x 7: pitch, yaw, roll in radians, then translation and scale).

Per image:

1. the photo is reconstructed with ``detect + fit`` (every detected face) into ``OUT/fit/``
   (resumable: images already fitted with the same settings are skipped on rerun);
2. the 68 landmarks of each fitted face are projected into the photo (the fit's own
   68-point definition, :func:`landmark_points68`); the face scored is the one whose
   landmarks' bounding box overlaps the annotated landmarks' box most (IoU at least
   :data:`MIN_BOX_IOU`), so a second person in the photo is never scored by mistake;
3. NME = mean 2D distance over the 68 points / sqrt(width x height) of the ground-truth
   landmarks' bounding box (:func:`nme`), reported x 100 (``nme_percent``);
4. images are binned on |yaw| (``Pose_Para[1]``): [0, 30], (30, 60], (60, 90] degrees;
   |yaw| above 90 goes to the last bin (as the public 3DDFA benchmark code does).

Reported: each bin's mean, the mean of the three bin means (the headline number, as in
MGCNet's 2.72 / 3.12 / 3.76 -> 3.20) and the plain mean over all scored images, with the
NME of the face detector's own 68 landmarks on the same faces as a reference. Images whose
face is not detected cannot be reconstructed: they are listed with a reason and left out
of the means (the scored count per bin says how many).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from facerecon.fitting.optimize import FitSettings
from facerecon.evaluation.results import write_result_files
from facerecon.io.images import IMAGE_EXTENSIONS

YAW_BINS = ((0.0, 30.0), (30.0, 60.0), (60.0, 90.0))
YAW_BIN_LABELS = ("[0, 30]", "(30, 60]", "(60, 90]")
MIN_BOX_IOU = 0.3
STATUS_OK, STATUS_FAILED = "ok", "failed"
NORMALISATION = "sqrt(width * height) of the ground-truth landmarks' bounding box"
LANDMARK_DEFINITION = ("the fitted mesh's 68 landmarks as the fit defines them (the dense embedding's points that "
                       "make up the detector's 68-point subset, or the model's 68 landmark vertices without an "
                       "embedding), projected into the photo")


# --------------------------------------------------------------------------- metrics


def nme(predicted: np.ndarray, truth: np.ndarray) -> np.ndarray | float:
    """Normalised mean error of 2D landmarks.

    predicted, truth: (..., P, 2) pixels (only the first two columns of ``truth`` are used,
    so (..., P, 3) ``pt3d`` points may be passed). Returns (...) floats: the mean over the P
    points of the Euclidean distance, divided by sqrt(w * h) of the bounding box of the
    ground-truth points (a fraction; x 100 for the usual report). A float for one image.
    """
    predicted = np.asarray(predicted, dtype=np.float64)[..., :2]
    truth = np.asarray(truth, dtype=np.float64)[..., :2]
    if predicted.shape != truth.shape:
        raise ValueError(f"landmark shapes differ: {predicted.shape} vs {truth.shape}")
    extent = truth.max(axis=-2) - truth.min(axis=-2)  # (..., 2)
    size = np.sqrt(extent[..., 0] * extent[..., 1])
    error = np.linalg.norm(predicted - truth, axis=-1).mean(axis=-1) / np.maximum(size, 1e-12)
    return float(error) if np.ndim(error) == 0 else error


def yaw_bin(yaw_degrees: float | None) -> int | None:
    """Index into :data:`YAW_BINS` of a yaw angle (degrees; its absolute value is binned):
    0 for [0, 30], 1 for (30, 60], 2 for (60, 90] and beyond; None when unknown (NaN)."""
    if yaw_degrees is None or not math.isfinite(yaw_degrees):
        return None
    magnitude = abs(float(yaw_degrees))
    if magnitude <= YAW_BINS[0][1]:
        return 0
    if magnitude <= YAW_BINS[1][1]:
        return 1
    return 2


def box_iou(a: np.ndarray, b: np.ndarray) -> float:
    """Intersection over union of the bounding boxes of two point sets (P, 2) and (Q, 2)."""
    a_lo, a_hi = np.min(a[:, :2], axis=0), np.max(a[:, :2], axis=0)
    b_lo, b_hi = np.min(b[:, :2], axis=0), np.max(b[:, :2], axis=0)
    inter = np.clip(np.minimum(a_hi, b_hi) - np.maximum(a_lo, b_lo), 0, None).prod()
    union = (a_hi - a_lo).prod() + (b_hi - b_lo).prod() - inter
    return float(inter / union) if union > 0 else 0.0


def landmark_points68(model, vertices: np.ndarray, on_surface: bool = False) -> np.ndarray:
    """The 68 landmarks (68, 3) of a mesh (N, 3) of ``model``, with the definition the fit
    uses (:meth:`FaceModelTensors.landmark_points`: the dense embedding's points, offsets
    included, that make up the detector's 68-point subset when the model has an embedding,
    otherwise the model's 68 landmark vertices). ``on_surface`` drops the offsets: the
    surface points, for comparison with points picked on a scan's skin."""
    import torch

    from facerecon.detection.landmarks import IBUG68_FROM_MP478
    from facerecon.facemodel.tensors import embedded_points

    vertices = np.asarray(vertices, dtype=np.float64)
    if getattr(model, "dense_triangle", None) is None:
        return vertices[np.asarray(model.landmarks68)]
    index = np.asarray(IBUG68_FROM_MP478)
    offset = None if model.dense_offset is None or on_surface else \
        torch.as_tensor(model.dense_offset[index], dtype=torch.float64)
    points = embedded_points(torch.as_tensor(vertices)[None],
                             torch.as_tensor(np.asarray(model.triangles)[model.dense_triangle[index]]),
                             torch.as_tensor(model.dense_barycentric[index], dtype=torch.float64), offset)
    return points[0].numpy()


def project_to_photo(points_camera: np.ndarray, intrinsics: np.ndarray, align_matrix: np.ndarray) -> np.ndarray:
    """Photo pixels (P, 2) of camera-frame points (P, 3) of a fitted face: pinhole projection
    with the crop's intrinsics (3, 3), then the inverse of the photo -> crop similarity
    ``align_matrix`` (2, 3). Pixel centres at integers."""
    from facerecon.detection.align import invert_affine

    p = np.asarray(points_camera, dtype=np.float64)
    k = np.asarray(intrinsics, dtype=np.float64)
    z = np.where(np.abs(p[:, 2]) < 1e-9, 1e-9, p[:, 2])
    u = k[0, 0] * p[:, 0] / z + k[0, 1] * p[:, 1] / z + k[0, 2]
    v = k[1, 1] * p[:, 1] / z + k[1, 2]
    back = invert_affine(align_matrix)
    crop = np.stack([u, v], axis=1)
    return crop @ back[:, :2].T + back[:, 2]


# --------------------------------------------------------------------------- layout


@dataclass
class Annotation:
    """One image's ground truth: 68 points (68, 3) (x, y in pixels, z), pose (7,) and yaw in degrees."""

    landmarks: np.ndarray
    pose: np.ndarray
    yaw_degrees: float


def read_annotation(path: str | Path) -> Annotation:
    """Read an AFLW2000-3D ``.mat``: ``pt3d_68`` (3, 68) (also accepted transposed, and 2 rows)
    and ``Pose_Para`` (1, 7) [pitch, yaw, roll (radians), tx, ty, tz, scale]. The x, y
    coordinates are used as stored (no 1-based shift, as the public Python evaluations do).
    Raises ValueError with a one-line reason."""
    from scipy.io import loadmat

    try:
        data = loadmat(str(path))
    except Exception as exc:  # noqa: BLE001 - scipy raises several types for bad files
        raise ValueError(f"unreadable annotation {Path(path).name}: {' '.join(str(exc).split())[:200]}") from None
    if "pt3d_68" not in data:
        raise ValueError(f"annotation {Path(path).name} has no pt3d_68")
    points = np.asarray(data["pt3d_68"], dtype=np.float64)
    if points.ndim != 2 or 68 not in points.shape or min(points.shape) not in (2, 3):
        raise ValueError(f"annotation {Path(path).name}: pt3d_68 has shape {points.shape}, expected (3, 68)")
    if points.shape[0] != 68:
        points = points.T
    if points.shape[1] == 2:
        points = np.concatenate([points, np.zeros((68, 1))], axis=1)
    if not np.all(np.isfinite(points[:, :2])):
        raise ValueError(f"annotation {Path(path).name}: pt3d_68 has non-finite values")
    pose = np.asarray(data.get("Pose_Para", np.full(7, np.nan)), dtype=np.float64).ravel()
    yaw = math.degrees(float(pose[1])) if pose.size >= 2 and np.isfinite(pose[1]) else float("nan")
    return Annotation(points, pose, yaw)


@dataclass
class AflwItem:
    """An image of the set and its annotation file (either may be missing)."""

    name: str
    image: Path | None
    annotation: Path | None


def discover_items(root: str | Path) -> list[AflwItem]:
    """The photos of an AFLW2000-3D folder with their ``.mat`` (same stem), sorted by name;
    an image without ``.mat`` or a ``.mat`` without image is an item too (scored as missing).
    ROOT may also be the folder holding ``AFLW2000/``."""
    root = Path(root)
    if not root.is_dir():
        raise ValueError(f"{root} is not a folder")

    def scan(folder: Path) -> tuple[dict[str, Path], dict[str, Path]]:
        images, mats = {}, {}
        for path in sorted(folder.iterdir()):
            if not path.is_file() or path.name.startswith("."):
                continue
            if path.suffix.lower() in IMAGE_EXTENSIONS:
                images.setdefault(path.stem, path)
            elif path.suffix.lower() == ".mat":
                mats[path.stem] = path
        return images, mats

    images, mats = scan(root)
    if not images and not mats:
        for name in ("AFLW2000", "AFLW2000-3D"):
            if (root / name).is_dir():
                images, mats = scan(root / name)
                break
    if not mats:
        raise ValueError(f"{root} has no .mat annotations (expected the AFLW2000-3D layout: "
                         "image00002.jpg with image00002.mat beside it)")
    return [AflwItem(images[stem].name if stem in images else f"{stem}.jpg", images.get(stem), mats.get(stem))
            for stem in sorted(set(images) | set(mats))]


# --------------------------------------------------------------------------- the run


@dataclass
class AflwOptions:
    face_model: str | None = None
    device: str = "auto"
    batch_size: int = 16
    limit: int | None = None
    checkpoint: str | None = None
    refine: int = 0
    settings: FitSettings = field(default_factory=FitSettings)


@dataclass
class AflwResult:
    rows: list[dict]     # one per image
    by_yaw: list[dict]   # one per yaw bin
    summary: dict

    def to_dict(self) -> dict:
        return {"protocol": "aflw2000", **self.summary, "yaw_bins": self.by_yaw, "images": self.rows}


def _new_row(item: AflwItem) -> dict[str, Any]:
    return {"image": item.name, "status": STATUS_FAILED, "reason": "", "yaw_degrees": None, "yaw_bin": None,
            "nme_percent": None, "detector_nme_percent": None, "bbox_size_px": None, "faces_fitted": None,
            "face": None, "box_iou": None, "resumed": False,
            "path": str(item.image) if item.image else None,
            "annotation": str(item.annotation) if item.annotation else None}


def _detector_landmarks(detections: Path, keys: set[str]) -> dict[tuple[str, int], np.ndarray]:
    """(key, face index) -> the detector's 68 landmarks (68, 2) in photo pixels."""
    from facerecon.io.store import open_results
    from facerecon.stages import detect as detect_stage

    found: dict[tuple[str, int], np.ndarray] = {}
    if not detections.is_file():
        return found
    with open_results(detections, detect_stage.ITEMS_GROUP) as results:
        for key in results.keys():
            if key not in keys:
                continue
            faces = results[key].get("faces")
            for name in (faces or {}):
                if "landmarks68" in faces[name]:
                    found[(key, int(name))] = np.asarray(faces[name]["landmarks68"][()], dtype=np.float64)
    return found


def score_faces(faces: Sequence[dict], truth: np.ndarray, model) -> tuple[int | None, np.ndarray | None, float]:
    """Pick the fitted face matching the annotation: each face's 68 landmarks are projected
    into the photo; the face with the largest bounding-box IoU with ``truth`` (68, 2+) wins.
    Returns (index into ``faces`` or None, its landmarks (68, 2), that IoU)."""
    best, best_points, best_iou = None, None, 0.0
    for i, face in enumerate(faces):
        if face.get("attrs", {}).get("status", STATUS_OK) != STATUS_OK or "vertices_camera" not in face:
            continue
        points = project_to_photo(landmark_points68(model, face["vertices_camera"]), face["intrinsics"],
                                  face["align_matrix"])
        if not np.all(np.isfinite(points)):
            continue
        iou = box_iou(points, truth)
        if best is None or iou > best_iou:
            best, best_points, best_iou = i, points, iou
    return best, best_points, best_iou


def aggregate(rows: list[dict]) -> list[dict]:
    """Per yaw bin: annotated images, scored images, mean / median / std (population) of the
    NME x 100 and the detector's mean NME x 100 on the same faces."""
    table = []
    for index, label in enumerate(YAW_BIN_LABELS):
        group = [r for r in rows if r["yaw_bin"] == label]
        ok = [r for r in group if r["status"] == STATUS_OK]
        values = np.asarray([r["nme_percent"] for r in ok], dtype=np.float64)
        detector = [r["detector_nme_percent"] for r in ok if r["detector_nme_percent"] is not None]
        table.append({"yaw_bin": label, "yaw_min": YAW_BINS[index][0], "yaw_max": YAW_BINS[index][1],
                      "images": len(group), "scored": len(ok),
                      "nme_mean_percent": float(values.mean()) if len(values) else None,
                      "nme_median_percent": float(np.median(values)) if len(values) else None,
                      "nme_std_percent": float(values.std()) if len(values) else None,
                      "detector_nme_mean_percent": float(np.mean(detector)) if detector else None})
    return table


def _reason_for(key: str, attrs: dict | None, fit_summary) -> str:
    if attrs is None:
        reason = fit_summary.image_reasons.get(key)
        if reason:
            return reason.splitlines()[0]
        return "not reconstructed (interrupted before this image)" if fit_summary.interrupted else "not reconstructed"
    status = attrs.get("status")
    if status == "no_face":
        return "no face detected"
    error = str(attrs.get("error") or fit_summary.image_reasons.get(key) or "fit failed")
    return f"fit failed: {error.splitlines()[0]}"


def _fitted_faces(results, key: str) -> tuple[dict | None, list[dict]]:
    """A fitted image's attributes and, per face, the arrays the landmarks need
    (``vertices_camera``, ``intrinsics``, ``align_matrix``) and the face's attributes."""
    from facerecon.io.store import attrs_dict

    if key not in results:
        return None, []
    group = results[key]
    faces = []
    container = group.get("faces")
    for name in sorted(container or {}, key=int):
        g = container[name]
        face = {k: g[k][()] for k in ("vertices_camera", "intrinsics", "align_matrix") if k in g}
        face["attrs"] = attrs_dict(g)
        faces.append(face)
    return attrs_dict(group), faces


def _score_row(row: dict, key: str, truth: Annotation, status: str | None, attrs: dict | None, faces: list[dict],
               fit_summary, model, detector: dict[tuple[str, int], np.ndarray]) -> None:
    """Fill one image's row from its fit: the face matching the annotation and its NME."""
    from facerecon.stages.fit import STATUS_SKIPPED

    # the stored fit counts only when this run fitted it or found it done with the same settings
    current = status in ("ok", STATUS_SKIPPED, "no_face")
    if attrs is None or not current or attrs.get("status") != "ok":
        row["reason"] = _reason_for(key, attrs if current else None, fit_summary)
        return
    row["resumed"] = status == STATUS_SKIPPED
    row["faces_fitted"] = sum(1 for f in faces if f["attrs"].get("status") == "ok")
    choice, points, iou = score_faces(faces, truth.landmarks, model)
    if choice is None:
        row["reason"] = "no fitted face with finite landmarks"
        return
    face_index = int(faces[choice]["attrs"].get("index", choice))
    row["box_iou"], row["face"] = round(iou, 4), face_index
    if iou < MIN_BOX_IOU:
        row["reason"] = (f"no reconstructed face overlaps the annotated face (best landmark-box IoU "
                         f"{iou:.2f} < {MIN_BOX_IOU})")
        return
    row["status"] = STATUS_OK
    row["nme_percent"] = 100.0 * nme(points, truth.landmarks)
    detected = detector.get((key, face_index))
    if detected is not None and detected.shape == (68, 2):
        row["detector_nme_percent"] = 100.0 * nme(detected, truth.landmarks)


def run_aflw2000(root: str | Path, out_dir: str | Path, options: AflwOptions | None = None, progress=None,
                 detect_progress=None, should_stop: Callable[[], bool] | None = None) -> AflwResult:
    """Reconstruct and score every annotated image under ``root``; writes aflw2000_results.json,
    aflw2000_results.csv, aflw2000_nme_by_yaw.png and aflw2000_cumulative_nme.png in ``out_dir``.

    ``progress`` / ``detect_progress``: ``start(total)`` / ``advance()`` callbacks of the fit
    and detect stages; ``should_stop()`` is polled between images and fit batches (an
    interrupted run scores what is fitted and reports ``interrupted``).
    """
    from facerecon.facemodel.resolve import resolve_face_model
    from facerecon.io.store import open_results
    from facerecon.stages.fit import FitOptions, pick_device, run_fit

    options = options or AflwOptions()
    out_dir = Path(out_dir)
    started = time.perf_counter()
    items = discover_items(root)
    if options.limit is not None:
        items = items[:max(options.limit, 0)]
    model = resolve_face_model(options.face_model)
    pick_device(options.device)
    out_dir.mkdir(parents=True, exist_ok=True)

    rows: list[dict] = []
    truths: dict[str, Annotation] = {}
    to_fit: list[AflwItem] = []
    for item in items:
        row = _new_row(item)
        rows.append(row)
        if item.annotation is None:
            row["reason"] = f"missing annotation: no {Path(item.name).stem}.mat beside the image"
            continue
        try:
            truth = read_annotation(item.annotation)
        except ValueError as exc:
            row["reason"] = str(exc)
            continue
        index = yaw_bin(truth.yaw_degrees)
        row["yaw_degrees"] = truth.yaw_degrees if math.isfinite(truth.yaw_degrees) else None
        row["yaw_bin"] = YAW_BIN_LABELS[index] if index is not None else None
        extent = truth.landmarks[:, :2].max(axis=0) - truth.landmarks[:, :2].min(axis=0)
        row["bbox_size_px"] = float(np.sqrt(extent[0] * extent[1]))
        if item.image is None:
            row["reason"] = f"missing image: {item.annotation.name} has no photo beside it"
            continue
        truths[item.image.name] = truth
        to_fit.append(item)

    fit_dir = out_dir / "fit"
    fit_summary = None
    fit_started = time.perf_counter()
    if to_fit:
        fit_options = FitOptions(face_model=options.face_model, device=options.device, batch_size=options.batch_size,
                                 formats=[], largest=False, overlays=False, texture_size=64,
                                 checkpoint=options.checkpoint, refine=options.refine, settings=options.settings)
        fit_summary = run_fit([str(item.image) for item in to_fit], fit_dir, fit_options, progress=progress,
                              detect_progress=detect_progress, should_stop=should_stop)
    fit_seconds = time.perf_counter() - fit_started

    by_key = {row["image"]: row for row in rows}
    if fit_summary is not None:
        detector = _detector_landmarks(fit_dir / "detections.h5", set(truths))
        with open_results(fit_dir / "fits.h5", "images") as results:
            for key in truths:
                _score_row(by_key[key], key, truths[key], fit_summary.images.get(key),
                           *_fitted_faces(results, key), fit_summary, model, detector)

    by_yaw = aggregate(rows)
    ok = [r for r in rows if r["status"] == STATUS_OK]
    bin_means = [b["nme_mean_percent"] for b in by_yaw]
    detector_means = [b["detector_nme_mean_percent"] for b in by_yaw]
    statuses = list(fit_summary.images.values()) if fit_summary is not None else []
    fitted_now = statuses.count("ok")
    processed_now = fitted_now + statuses.count("no_face")
    interrupted = bool(fit_summary is not None and fit_summary.interrupted)
    summary = {
        "root": str(root), "model_id": model.model_id,
        "method": "network" if options.checkpoint else "optimize",
        "metric": "NME x 100: mean 2D landmark distance / " + NORMALISATION,
        "normalisation": NORMALISATION, "landmarks": LANDMARK_DEFINITION,
        "yaw_source": "|Pose_Para[1]| in degrees; |yaw| > 90 counted in (60, 90]",
        "headline": "nme_balanced_percent (mean of the three yaw-bin means)",
        "images_total": len(rows), "annotated": sum(1 for r in rows if r["bbox_size_px"] is not None),
        "scored": len(ok),
        "nme_balanced_percent": float(np.mean(bin_means)) if all(m is not None for m in bin_means) else None,
        "nme_mean_percent": float(np.mean([r["nme_percent"] for r in ok])) if ok else None,
        "detector_nme_balanced_percent": float(np.mean(detector_means))
        if all(m is not None for m in detector_means) else None,
        "detector_nme_mean_percent": float(np.mean([r["detector_nme_percent"] for r in ok
                                                    if r["detector_nme_percent"] is not None]))
        if any(r["detector_nme_percent"] is not None for r in ok) else None,
        "images_fitted_this_run": fitted_now,
        "images_resumed": sum(1 for r in rows if r["resumed"]),
        "fit_seconds": round(fit_seconds, 3),
        "seconds_per_image": round(fit_seconds / processed_now, 3) if processed_now else None,
        "elapsed_seconds": round(time.perf_counter() - started, 3), "interrupted": interrupted,
        "fit_notes": list(fit_summary.notes) if fit_summary is not None else [],
        "failures": [{"image": r["image"], "reason": r["reason"]} for r in rows if r["status"] != STATUS_OK],
    }
    result = AflwResult(rows, by_yaw, summary)
    write_reports(result, out_dir)
    return result


# --------------------------------------------------------------------------- reports

CSV_FIELDS = ["image", "status", "reason", "yaw_degrees", "yaw_bin", "nme_percent", "detector_nme_percent",
              "bbox_size_px", "faces_fitted", "face", "box_iou", "resumed", "path", "annotation"]


def write_reports(result: AflwResult, out_dir: Path) -> None:
    """aflw2000_results.json, aflw2000_results.csv, aflw2000_nme_by_yaw.png and
    aflw2000_cumulative_nme.png (written atomically)."""
    from facerecon.evaluation.plots import plot_bar_groups, plot_cumulative_errors

    plots = {"nme_by_yaw": str(out_dir / "aflw2000_nme_by_yaw.png"),
             "cumulative_nme": str(out_dir / "aflw2000_cumulative_nme.png")}
    labels = [f"{b['yaw_bin']}\nn={b['scored']}/{b['images']}" for b in result.by_yaw]
    plot_bar_groups(labels, {"reconstruction": [b["nme_mean_percent"] for b in result.by_yaw],
                             "detector landmarks": [b["detector_nme_mean_percent"] for b in result.by_yaw]},
                    out_dir / "aflw2000_nme_by_yaw.png", "mean NME x 100", xlabel="|yaw| (degrees)",
                    title="AFLW2000-3D: 68-point NME by yaw",
                    errors={"reconstruction": [b["nme_std_percent"] for b in result.by_yaw]})
    curves = {label: [r["nme_percent"] for r in result.rows if r["yaw_bin"] == label and r["status"] == STATUS_OK]
              for label in YAW_BIN_LABELS}
    curves["all"] = [r["nme_percent"] for r in result.rows if r["status"] == STATUS_OK]
    plot_cumulative_errors(curves, out_dir / "aflw2000_cumulative_nme.png", "NME x 100",
                           ylabel="fraction of images", title="AFLW2000-3D: cumulative NME")
    result.summary["plots"] = plots
    write_result_files(out_dir, "aflw2000_results", result.to_dict(), result.rows, CSV_FIELDS)
