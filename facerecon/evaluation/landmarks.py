"""68-point landmark protocols on real photos (AFLW2000-3D, 300-W, menpo): NME by yaw bin.

Layouts read: a folder of photos, each with a ground-truth file of the same stem beside it
(:func:`read_annotation`): iBUG / 300-W ``.pts`` (1-based ``x y``), menpo ``.ljson`` (points
as ``(y, x)``), AFLW2000-3D ``.mat`` (``pt3d_68``, 3 x 68) and 300W-LP ``.mat`` (``pt2d``,
2 x 68), both with ``Pose_Para`` (1 x 7: pitch, yaw, roll in radians, translation, scale).

Per image:

1. the photo is reconstructed with ``detect + fit`` (every detected face) into ``OUT/fit/``
   (resumable: images already fitted with the same settings are skipped on rerun);
2. the 68 landmarks of each fitted face are projected into the photo (the fit's own
   68-point definition, :func:`landmark_points68`); the face scored is the one whose
   landmarks' bounding box overlaps the annotated landmarks' box most (IoU at least
   :data:`MIN_BOX_IOU`), so a second person in the photo is never scored by mistake;
3. NME = mean 2D distance over the 68 points / sqrt(width x height) of the ground-truth
   landmarks' bounding box (:func:`nme`), reported x 100 (``nme_percent``);
4. images are binned on |yaw| (``Pose_Para[1]``, or the fitted head yaw for files without a
   pose, ``yaw_source``): [0, 30], (30, 60], (60, 90] degrees; |yaw| above 90 goes to the
   last bin (as the public 3DDFA benchmark code does).

Reported: each bin's mean, the mean of the three bin means (the headline number, as in
MGCNet's 2.72 / 3.12 / 3.76 -> 3.20) and the plain mean over all scored images, with the
NME of the face detector's own 68 landmarks on the same faces as a reference. A photo whose
annotated face is not detected (or not reconstructed where it is annotated) is a **miss**: it
has no NME, so it is counted and listed (``missed``, ``missed_images``, per bin) as a failure
of the protocol, never silently dropped.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from facerecon.detection.align import invert_affine
from facerecon.detection.landmarks import IBUG68_FROM_MP478
from facerecon.errors import InputError
from facerecon.evaluation.plots import plot_bar_groups, plot_cumulative_errors
from facerecon.evaluation.results import mean_or_none, write_result_files
from facerecon.facemodel.resolve import resolve_face_model
from facerecon.facemodel.tensors import embedded_points
from facerecon.fitting.optimize import FitSettings
from facerecon.io.images import IMAGE_EXTENSIONS
from facerecon.io.store import attrs_dict, open_results
from facerecon.stages import detect as detect_stage
from facerecon.stages.fit import STATUS_SKIPPED, FitOptions, pick_device, run_fit

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


#: iBUG 68 index ranges of the face parts the protocol also scores separately
REGIONS_68 = {"jaw": range(0, 17), "brows": range(17, 27), "nose": range(27, 36), "eyes": range(36, 48),
              "outer_lips": range(48, 60), "inner_lips": range(60, 68)}
#: a mouth counts as open when its inner lips are this far apart (mean of the three upper/lower
#: pairs 61-67, 62-66, 63-65) in units of the ground-truth box size sqrt(w * h)
OPEN_MOUTH_GAP = 0.04


def nme_by_region(predicted: np.ndarray, truth: np.ndarray) -> dict[str, float]:
    """Per-part NME x 100 (:data:`REGIONS_68`), normalised like :func:`nme` by the whole face's box.

    predicted, truth: (68, 2+) pixels."""
    predicted = np.asarray(predicted, dtype=np.float64)[:, :2]
    truth = np.asarray(truth, dtype=np.float64)[:, :2]
    extent = truth.max(axis=0) - truth.min(axis=0)
    size = max(float(np.sqrt(extent[0] * extent[1])), 1e-12)
    error = np.linalg.norm(predicted - truth, axis=1) / size
    return {name: 100.0 * float(error[list(index)].mean()) for name, index in REGIONS_68.items()}


def mouth_open(truth: np.ndarray) -> bool:
    """The annotated inner lips (68, 2+) are apart by more than :data:`OPEN_MOUTH_GAP` of the box size."""
    truth = np.asarray(truth, dtype=np.float64)[:, :2]
    extent = truth.max(axis=0) - truth.min(axis=0)
    gap = np.linalg.norm(truth[[61, 62, 63]] - truth[[67, 66, 65]], axis=1).mean()
    return bool(gap > OPEN_MOUTH_GAP * np.sqrt(extent[0] * extent[1]))


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

    p = np.asarray(points_camera, dtype=np.float64)
    k = np.asarray(intrinsics, dtype=np.float64)
    z = np.where(np.abs(p[:, 2]) < 1e-9, 1e-9, p[:, 2])
    u = k[0, 0] * p[:, 0] / z + k[0, 1] * p[:, 1] / z + k[0, 2]
    v = k[1, 1] * p[:, 1] / z + k[1, 2]
    back = invert_affine(align_matrix)
    crop = np.stack([u, v], axis=1)
    return crop @ back[:, :2].T + back[:, 2]


# --------------------------------------------------------------------------- layout

#: ground-truth files read, in the order tried when several sit beside one photo
ANNOTATION_SUFFIXES = (".pts", ".ljson", ".mat")


@dataclass
class Annotation:
    """One image's ground truth: 68 points (68, 3) (x, y in 0-based photo pixels, z or 0),
    pose (7,) (NaN when the file has none), yaw in degrees (NaN when unknown) and the format."""

    landmarks: np.ndarray
    pose: np.ndarray
    yaw_degrees: float
    format: str = "mat"


def _points68(points, name: str, what: str) -> np.ndarray:
    """(68, 3) float array from (68, 2|3) or (2|3, 68) points; ValueError with a one-line reason."""
    points = np.asarray(points, dtype=np.float64)
    if points.ndim != 2 or 68 not in points.shape or min(points.shape) not in (2, 3):
        raise InputError(f"annotation {name}: {what} has shape {points.shape}, expected 68 points")
    if points.shape[0] != 68:
        points = points.T
    if points.shape[1] == 2:
        points = np.concatenate([points, np.zeros((68, 1))], axis=1)
    if not np.all(np.isfinite(points[:, :2])):
        raise InputError(f"annotation {name}: {what} has non-finite values")
    return points


def read_pts(path: str | Path) -> Annotation:
    """An iBUG / 300-W ``.pts`` file: ``n_points: 68`` and 68 ``x y`` lines between braces,
    1-based pixel coordinates (shifted here to 0-based pixel centres)."""
    name = Path(path).name
    try:
        text = Path(path).read_text(encoding="utf-8", errors="replace")
    except OSError as exc:
        raise InputError(f"unreadable annotation {name}: {exc.strerror or exc}") from None
    if "{" not in text or "}" not in text:
        raise InputError(f"annotation {name}: not a .pts file (no '{{ ... }}' point block)")
    body = text[text.index("{") + 1:text.rindex("}")]
    try:
        rows = [[float(v) for v in line.split()[:2]] for line in body.splitlines() if line.strip()]
    except ValueError:
        raise InputError(f"annotation {name}: a point line is not two numbers") from None
    points = _points68(rows, name, f"the point block ({len(rows)} points)")
    points[:, :2] -= 1.0
    return Annotation(points, np.full(7, np.nan), float("nan"), "pts")


def read_ljson(path: str | Path) -> Annotation:
    """A menpo ``.ljson`` file: points stored as (y, x) in 0-based pixels, under
    ``groups/<group>/landmarks/points`` (version 2/3) or ``landmarks/points`` (version 1)."""
    import json

    name = Path(path).name
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise InputError(f"unreadable annotation {name}: {' '.join(str(exc).split())[:200]}") from None
    candidates = []
    if isinstance(data, dict):
        if isinstance(data.get("landmarks"), dict):
            candidates.append(data["landmarks"].get("points"))
        for group in (data.get("groups") or {}).values():
            if isinstance(group, dict) and isinstance(group.get("landmarks"), dict):
                candidates.append(group["landmarks"].get("points"))
    for points in candidates:
        if isinstance(points, list) and len(points) == 68:
            yx = _points68(points, name, "points")
            return Annotation(np.stack([yx[:, 1], yx[:, 0], yx[:, 2]], axis=1), np.full(7, np.nan), float("nan"),
                              "ljson")
    raise InputError(f"annotation {name}: no group of 68 landmark points")


def read_mat(path: str | Path) -> Annotation:
    """An AFLW2000-3D / 300W-LP ``.mat``: ``pt3d_68`` (3, 68) or, without it, ``pt2d`` (2, 68)
    (also accepted transposed), x, y used as stored (no 1-based shift, as the public Python
    evaluations do); ``Pose_Para`` (1, 7) [pitch, yaw, roll (radians), tx, ty, tz, scale] when present."""
    from scipy.io import loadmat

    name = Path(path).name
    try:
        data = loadmat(str(path))
    except Exception as exc:  # noqa: BLE001 - scipy raises several types for bad files
        raise InputError(f"unreadable annotation {name}: {' '.join(str(exc).split())[:200]}") from None
    key = next((k for k in ("pt3d_68", "pt2d") if k in data), None)
    if key is None:
        raise InputError(f"annotation {name} has no pt3d_68 or pt2d")
    points = _points68(data[key], name, key)
    pose = np.asarray(data.get("Pose_Para", np.full(7, np.nan)), dtype=np.float64).ravel()
    yaw = math.degrees(float(pose[1])) if pose.size >= 2 and np.isfinite(pose[1]) else float("nan")
    return Annotation(points, pose, yaw, "mat")


READERS = {".pts": read_pts, ".ljson": read_ljson, ".mat": read_mat}


def read_annotation(path: str | Path) -> Annotation:
    """Read a 68-point ground-truth file by its suffix (:data:`ANNOTATION_SUFFIXES`).
    Raises ValueError with a one-line reason."""
    reader = READERS.get(Path(path).suffix.lower())
    if reader is None:
        raise InputError(f"annotation {Path(path).name}: unknown format (expected {', '.join(ANNOTATION_SUFFIXES)})")
    return reader(path)


@dataclass
class LandmarkItem:
    """An image of the set and its annotation file (either may be missing)."""

    name: str
    image: Path | None
    annotation: Path | None


def discover_items(root: str | Path, suffixes: tuple[str, ...] = ANNOTATION_SUFFIXES) -> list[LandmarkItem]:
    """The photos of a folder with their ground truth (same stem, first of ``suffixes`` found),
    sorted by name; an image without annotation, or an annotation without image, is an item
    too (scored as missing). ROOT may also be the folder holding ``AFLW2000/``."""
    root = Path(root)
    if not root.is_dir():
        raise InputError(f"{root} is not a folder")
    wanted = tuple(s.lower() for s in suffixes)

    def scan(folder: Path) -> tuple[dict[str, Path], dict[str, Path]]:
        images, notes = {}, {}
        for path in sorted(folder.iterdir()):
            if not path.is_file() or path.name.startswith("."):
                continue
            suffix = path.suffix.lower()
            if suffix in IMAGE_EXTENSIONS:
                images.setdefault(path.stem, path)
            elif suffix in wanted:
                known = notes.get(path.stem)
                if known is None or wanted.index(suffix) < wanted.index(known.suffix.lower()):
                    notes[path.stem] = path
        return images, notes

    images, notes = scan(root)
    if not images and not notes:
        for name in ("AFLW2000", "AFLW2000-3D"):
            if (root / name).is_dir():
                images, notes = scan(root / name)
                break
    if not notes:
        raise InputError(f"{root} has no {'/'.join(wanted)} annotations (expected photos with a 68-point "
                         "file of the same name beside them, e.g. image00002.jpg + image00002.mat)")
    return [LandmarkItem(images[stem].name if stem in images else f"{stem}.jpg", images.get(stem), notes.get(stem))
            for stem in sorted(set(images) | set(notes))]


# --------------------------------------------------------------------------- the run


@dataclass
class LandmarkOptions:
    face_model: str | None = None
    device: str = "auto"
    batch_size: int = 16
    limit: int | None = None
    checkpoint: str | None = None
    refine: int = 0
    settings: FitSettings = field(default_factory=FitSettings)
    #: report name: ``<protocol>_results.json`` etc. ("aflw2000" keeps that command's file names)
    protocol: str = "landmarks"
    #: ground-truth formats read (``evaluate aflw2000`` reads only ``.mat``)
    suffixes: tuple[str, ...] = ANNOTATION_SUFFIXES


@dataclass
class LandmarkResult:
    rows: list[dict]     # one per image
    by_yaw: list[dict]   # one per yaw bin
    summary: dict

    def to_dict(self) -> dict:
        return {"protocol": self.summary.get("protocol", "landmarks"), **self.summary, "yaw_bins": self.by_yaw,
                "images": self.rows}


def _new_row(item: LandmarkItem) -> dict[str, Any]:
    return {"image": item.name, "status": STATUS_FAILED, "reason": "", "missed": False, "format": None,
            "yaw_degrees": None, "yaw_source": None, "yaw_bin": None,
            "nme_percent": None, "detector_nme_percent": None, "bbox_size_px": None, "faces_fitted": None,
            "face": None, "box_iou": None, "resumed": False,
            "path": str(item.image) if item.image else None,
            "annotation": str(item.annotation) if item.annotation else None}


def _detector_landmarks(detections: Path, keys: set[str]) -> dict[tuple[str, int], np.ndarray]:
    """(key, face index) -> the detector's 68 landmarks (68, 2) in photo pixels."""

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
    """Per yaw bin: annotated images, scored images, missed faces, mean / median / std
    (population) of the NME x 100 and the detector's mean NME x 100 on the same faces. Images
    whose yaw is unknown (no pose in the annotation and no fit) form an extra "unknown" bin
    when there are any."""
    table = []
    labels = list(YAW_BIN_LABELS) + (["unknown"] if any(r["yaw_bin"] is None and r.get("bbox_size_px") is not None
                                                        for r in rows) else [])
    for index, label in enumerate(labels):
        group = [r for r in rows if (r["yaw_bin"] or "unknown") == label and
                 (label != "unknown" or r.get("bbox_size_px") is not None)]
        ok = [r for r in group if r["status"] == STATUS_OK]
        values = np.asarray([r["nme_percent"] for r in ok], dtype=np.float64)
        detector = [r["detector_nme_percent"] for r in ok if r["detector_nme_percent"] is not None]
        lo, hi = YAW_BINS[index] if index < len(YAW_BINS) else (None, None)
        table.append({"yaw_bin": label, "yaw_min": lo, "yaw_max": hi,
                      "images": len(group), "scored": len(ok), "missed": sum(1 for r in group if r.get("missed")),
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

    if key not in results:
        return None, []
    group = results[key]
    faces = []
    container = group.get("faces")
    for name in sorted(container or {}, key=int):
        g = container[name]
        face = {k: g[k][()] for k in ("vertices_camera", "intrinsics", "align_matrix", "angles") if k in g}
        face["attrs"] = attrs_dict(g)
        faces.append(face)
    return attrs_dict(group), faces


def _score_row(row: dict, key: str, truth: Annotation, status: str | None, attrs: dict | None, faces: list[dict],
               fit_summary, model, detector: dict[tuple[str, int], np.ndarray]) -> None:
    """Fill one image's row from its fit: the face matching the annotation and its NME. A photo
    whose annotated face was not detected (or not reconstructed where it is annotated) is a
    miss: ``missed`` is set and it counts against the protocol, never silently dropped."""

    # the stored fit counts only when this run fitted it or found it done with the same settings
    current = status in ("ok", STATUS_SKIPPED, "no_face")
    if attrs is None or not current or attrs.get("status") != "ok":
        row["reason"] = _reason_for(key, attrs if current else None, fit_summary)
        row["missed"] = current and attrs is not None and attrs.get("status") == "no_face"
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
        row["missed"] = True
        return
    if row["yaw_degrees"] is None and "angles" in faces[choice]:
        row["yaw_degrees"] = math.degrees(float(np.asarray(faces[choice]["angles"]).ravel()[1]))
        row["yaw_source"] = "fit"
        index = yaw_bin(row["yaw_degrees"])
        row["yaw_bin"] = YAW_BIN_LABELS[index] if index is not None else None
    row["status"] = STATUS_OK
    row["nme_percent"] = 100.0 * nme(points, truth.landmarks)
    row["nme_by_region"] = nme_by_region(points, truth.landmarks)
    row["mouth_open"] = mouth_open(truth.landmarks)
    detected = detector.get((key, face_index))
    if detected is not None and detected.shape == (68, 2):
        row["detector_nme_percent"] = 100.0 * nme(detected, truth.landmarks)
        row["detector_nme_by_region"] = nme_by_region(detected, truth.landmarks)


def _read_truths(items: list[LandmarkItem]) -> tuple[list[dict], dict[str, Annotation], list[LandmarkItem]]:
    """One row per item; the readable annotations by image name; the items to reconstruct."""
    rows: list[dict] = []
    truths: dict[str, Annotation] = {}
    to_fit: list[LandmarkItem] = []
    for item in items:
        row = _new_row(item)
        rows.append(row)
        if item.annotation is None:
            row["reason"] = f"missing annotation: no 68-point file named {Path(item.name).stem}.* beside the image"
            continue
        try:
            truth = read_annotation(item.annotation)
        except ValueError as exc:
            row["reason"] = str(exc)
            continue
        row["format"] = truth.format
        index = yaw_bin(truth.yaw_degrees)
        if math.isfinite(truth.yaw_degrees):
            row["yaw_degrees"], row["yaw_source"] = truth.yaw_degrees, "annotation"
        row["yaw_bin"] = YAW_BIN_LABELS[index] if index is not None else None
        extent = truth.landmarks[:, :2].max(axis=0) - truth.landmarks[:, :2].min(axis=0)
        row["bbox_size_px"] = float(np.sqrt(extent[0] * extent[1]))
        if item.image is None:
            row["reason"] = f"missing image: {item.annotation.name} has no photo beside it"
            continue
        truths[item.image.name] = truth
        to_fit.append(item)
    return rows, truths, to_fit


def _summary(root, model, options: LandmarkOptions, rows: list[dict], by_yaw: list[dict], fit_summary,
             fit_seconds: float, started: float) -> dict:
    ok = [r for r in rows if r["status"] == STATUS_OK]
    bins = by_yaw[:len(YAW_BINS)]
    bin_means = [b["nme_mean_percent"] for b in bins]
    detector_means = [b["detector_nme_mean_percent"] for b in bins]
    statuses = list(fit_summary.images.values()) if fit_summary is not None else []
    processed_now = statuses.count("ok") + statuses.count("no_face")
    with_photo = [r for r in rows if r["bbox_size_px"] is not None and r["path"]]
    return {
        "protocol": options.protocol, "root": str(root), "model_id": model.model_id,
        "method": "network" if options.checkpoint else "optimize",
        "metric": "NME x 100: mean 2D landmark distance / " + NORMALISATION,
        "normalisation": NORMALISATION, "landmarks": LANDMARK_DEFINITION,
        "yaw_source": "|Pose_Para[1]| of the annotation in degrees where it has one, else the fitted head yaw; "
                      "|yaw| > 90 counted in (60, 90]",
        "headline": "nme_balanced_percent (mean of the three yaw-bin means; bins without images are left out)",
        "images_total": len(rows), "annotated": sum(1 for r in rows if r["bbox_size_px"] is not None),
        "scored": len(ok), "missed": sum(1 for r in rows if r["missed"]),
        "missed_images": [r["image"] for r in rows if r["missed"]],
        "miss_rate": (sum(1 for r in rows if r["missed"]) / len(with_photo)) if with_photo else None,
        "nme_balanced_percent": mean_or_none(bin_means),
        "nme_mean_percent": mean_or_none(r["nme_percent"] for r in ok),
        "detector_nme_balanced_percent": mean_or_none(detector_means),
        "detector_nme_mean_percent": mean_or_none(r["detector_nme_percent"] for r in ok),
        "images_fitted_this_run": statuses.count("ok"),
        "images_resumed": sum(1 for r in rows if r["resumed"]),
        "fit_seconds": round(fit_seconds, 3),
        "seconds_per_image": round(fit_seconds / processed_now, 3) if processed_now else None,
        "elapsed_seconds": round(time.perf_counter() - started, 3),
        "interrupted": bool(fit_summary is not None and fit_summary.interrupted),
        "fit_notes": list(fit_summary.notes) if fit_summary is not None else [],
        "failures": [{"image": r["image"], "reason": r["reason"]} for r in rows if r["status"] != STATUS_OK],
        "regions": _region_summary(ok),
        "open_mouth_images": sum(1 for r in ok if r.get("mouth_open")),
        "inner_lips_open_mouth": _region_summary([r for r in ok if r.get("mouth_open")]).get("inner_lips"),
    }


def _region_summary(rows: list[dict]) -> dict[str, dict[str, float | None]]:
    """Mean per-part NME x 100 of the fit and of the detector over ``rows`` (scored photos)."""
    return {name: {"fit": mean_or_none(r["nme_by_region"][name] for r in rows if "nme_by_region" in r),
                   "detector": mean_or_none(r["detector_nme_by_region"][name] for r in rows
                                            if "detector_nme_by_region" in r)}
            for name in REGIONS_68}


def run_landmarks(root: str | Path, out_dir: str | Path, options: LandmarkOptions | None = None, progress=None,
                  detect_progress=None, should_stop: Callable[[], bool] | None = None) -> LandmarkResult:
    """Reconstruct and score every annotated photo under ``root``; writes
    ``<protocol>_results.json``, ``<protocol>_results.csv``, ``<protocol>_nme_by_yaw.png`` and
    ``<protocol>_cumulative_nme.png`` in ``out_dir``.

    ``progress`` / ``detect_progress``: ``start(total)`` / ``advance()`` callbacks of the fit
    and detect stages; ``should_stop()`` is polled between images and fit batches (an
    interrupted run scores what is fitted and reports ``interrupted``).
    """

    options = options or LandmarkOptions()
    out_dir = Path(out_dir)
    started = time.perf_counter()
    items = discover_items(root, options.suffixes)
    if options.limit is not None:
        items = items[:max(options.limit, 0)]
    model = resolve_face_model(options.face_model)
    pick_device(options.device)
    out_dir.mkdir(parents=True, exist_ok=True)
    rows, truths, to_fit = _read_truths(items)

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
    result = LandmarkResult(rows, by_yaw, _summary(root, model, options, rows, by_yaw, fit_summary, fit_seconds,
                                                   started))
    write_reports(result, out_dir)
    return result


# --------------------------------------------------------------------------- reports

CSV_FIELDS = ["image", "status", "reason", "missed", "format", "yaw_degrees", "yaw_source", "yaw_bin", "nme_percent",
              "detector_nme_percent", "bbox_size_px", "faces_fitted", "face", "box_iou", "resumed", "path",
              "annotation", "mouth_open"]


def write_reports(result: LandmarkResult, out_dir: Path) -> None:
    """<protocol>_results.json, <protocol>_results.csv, <protocol>_nme_by_yaw.png and
    <protocol>_cumulative_nme.png (written atomically)."""

    stem = result.summary.get("protocol", "landmarks")
    plots = {"nme_by_yaw": str(out_dir / f"{stem}_nme_by_yaw.png"),
             "cumulative_nme": str(out_dir / f"{stem}_cumulative_nme.png")}
    labels = [f"{b['yaw_bin']}\nn={b['scored']}/{b['images']}" for b in result.by_yaw]
    plot_bar_groups(labels, {"reconstruction": [b["nme_mean_percent"] for b in result.by_yaw],
                             "detector landmarks": [b["detector_nme_mean_percent"] for b in result.by_yaw]},
                    out_dir / f"{stem}_nme_by_yaw.png", "mean NME x 100", xlabel="|yaw| (degrees)",
                    title=f"{stem}: 68-point NME by yaw",
                    errors={"reconstruction": [b["nme_std_percent"] for b in result.by_yaw]})
    curves = {b["yaw_bin"]: [r["nme_percent"] for r in result.rows
                             if (r["yaw_bin"] or "unknown") == b["yaw_bin"] and r["status"] == STATUS_OK]
              for b in result.by_yaw}
    curves["all"] = [r["nme_percent"] for r in result.rows if r["status"] == STATUS_OK]
    plot_cumulative_errors(curves, out_dir / f"{stem}_cumulative_nme.png", "NME x 100",
                           ylabel="fraction of images", title=f"{stem}: cumulative NME")
    result.summary["plots"] = plots
    write_result_files(out_dir, f"{stem}_results", result.to_dict(), result.rows, CSV_FIELDS)
