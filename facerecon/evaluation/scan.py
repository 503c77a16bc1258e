"""Real-scan protocols: shape recovery scored against a real 3D scan of the face.

Two variants share the scoring:

* **photos** (``--photos DIR``): real photos of the scanned person are reconstructed with
  ``detect + fit`` (largest face per photo);
* **rendered** (semi-real, the default without photos): the scan itself is rendered with a
  plausible skin albedo (lips, brows and eyes coloured from its landmarks) and light over a
  pitch x yaw grid, and the renders are reconstructed. The face is a real one, outside every
  face model's span, so this measures shape recovery on a face that is not a sample of our
  own model (the rendered-pose protocol's faces are).

Scoring of one predicted mesh (the exported mesh with its expression, its neutral version
and the model's mean face as the baseline):

1. the scan is read in millimetres (``--scan-units``: m, cm, mm, or auto from its size) and
   cropped to the vertices within 95 mm of its nose tip (iBUG landmark 30 when the scan has
   landmarks, else found from the geometry as in the MICC protocol);
2. landmark initialisation: the similarity taking the prediction's landmarks (the fit's 68,
   on the surface) onto the scan's landmarks (68, or 51 without the jaw line); without
   landmarks the MICC start (nose tip on nose tip);
3. ICP with rotation, translation and one isotropic scale;
4. error = mean distance of the cropped scan vertices to the aligned predicted surface (the
   headline), with the median and the point-to-plane RMSE.

Neutrality (the scanned face is neutral): for every fitted face, the largest blendshape
weight and the opposing pairs that are both on (:mod:`facerecon.facemodel.blendshape_pairs`).
Fits are resumable (renders are re-rendered identically from the seed).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from scipy.spatial import cKDTree
from facerecon.errors import InputError
from facerecon.evaluation.micc import GroundTruth
from facerecon.evaluation.plots import plot_bar_groups
from facerecon.facemodel.resolve import resolve_face_model
from facerecon.stages.fit import FitOptions, pick_device, read_fits, run_fit
from facerecon.synthetic import textured_backgrounds, to_uint8

from facerecon.evaluation.geometry import Similarity, chunked_surface_distances, crop_sphere, icp_similarity, umeyama
from facerecon.evaluation.landmarks import landmark_points68
from facerecon.evaluation.micc import find_scan_nose_tip, initial_alignment, read_obj
from facerecon.evaluation.results import mean_or_none, write_result_files
from facerecon.export.meshio import write_png
from facerecon.facemodel.blendshape_pairs import expression_report
from facerecon.fitting.camera import crop_intrinsics, model_to_camera
from facerecon.fitting.optimize import FitSettings
from facerecon.render.renderer import MeshRenderer
from facerecon.render.shading import SH_CONSTANTS

CROP_RADIUS_MM = 95.0
UNITS = {"m": 1000.0, "cm": 10.0, "mm": 1.0}
IBUG_NOSE_TIP = 30
MIN_SCAN_POINTS = 200
YAWS = (-40.0, -20.0, 0.0, 20.0, 40.0)
PITCHES = (-10.0, 0.0, 10.0)
METRIC = ("mean distance of the scan vertices within 95 mm of the nose tip to the predicted surface, after landmark "
          "initialisation and ICP with rotation, translation and one isotropic scale")


# --------------------------------------------------------------------------- the scan


@dataclass
class Scan:
    """A scan in millimetres: vertices (N, 3), triangles (F, 3), landmarks (L, 3) or None with
    their iBUG indices (L,) (17..67 for a 51-point file, 0..67 for 68)."""

    vertices: np.ndarray
    triangles: np.ndarray
    landmarks: np.ndarray | None
    landmark_ids: np.ndarray | None
    units: str


def units_factor(vertices: np.ndarray, units: str = "auto") -> tuple[float, str]:
    """Millimetres per scan unit and the unit's name; ``auto`` decides from the bounding-box
    diagonal (a head is about 0.3-0.5 m across: below 3 it is metres, below 100 centimetres)."""
    if units != "auto":
        if units not in UNITS:
            raise InputError(f"unknown scan units {units!r}: use auto, m, cm or mm")
        return UNITS[units], units
    diagonal = float(np.linalg.norm(vertices.max(axis=0) - vertices.min(axis=0)))
    name = "m" if diagonal < 3.0 else "cm" if diagonal < 100.0 else "mm"
    return UNITS[name], name


def read_scan_landmarks(path: str | Path) -> np.ndarray:
    """(L, 3) landmarks from ``.npy`` or a text file (one ``x y z`` per line); L is 68 or 51."""
    path = Path(path)
    try:
        points = np.load(path) if path.suffix.lower() == ".npy" else np.loadtxt(path, ndmin=2)
    except (OSError, ValueError) as exc:
        raise InputError(f"unreadable scan landmarks {path.name}: {' '.join(str(exc).split())[:200]}") from None
    points = np.asarray(points, dtype=np.float64)
    if points.ndim != 2 or points.shape[1] != 3 or points.shape[0] not in (51, 68):
        raise InputError(f"scan landmarks {path.name} have shape {points.shape}, expected (68, 3) or (51, 3)")
    if not np.all(np.isfinite(points)):
        raise InputError(f"scan landmarks {path.name} have non-finite values")
    return points


def load_scan(path: str | Path, landmarks: str | Path | None = None, units: str = "auto") -> Scan:
    """Read a scan OBJ (and its landmarks, in the scan's units) into millimetres."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"scan {path} is not a file")
    vertices, triangles = read_obj(path)
    if len(vertices) < MIN_SCAN_POINTS or not len(triangles):
        raise InputError(f"scan {path.name} has {len(vertices)} vertices and {len(triangles)} faces: not a scan mesh")
    factor, name = units_factor(vertices, units)
    points = ids = None
    if landmarks is not None:
        points = read_scan_landmarks(landmarks) * factor
        ids = np.arange(68) if len(points) == 68 else np.arange(17, 68)
    return Scan(vertices * factor, triangles, points, ids, name)


@dataclass
class ScanTruth:
    """The scored part of a scan: points (P, 3) within the crop radius of the nose tip (mm)."""

    points: np.ndarray
    tip: np.ndarray
    landmarks: np.ndarray | None
    landmark_ids: np.ndarray | None
    tip_source: str


def prepare_truth(scan: Scan, radius_mm: float = CROP_RADIUS_MM) -> ScanTruth:
    """Crop the scan around its nose tip (landmark 30 when present, else from the geometry)."""
    if scan.landmarks is not None and IBUG_NOSE_TIP in scan.landmark_ids:
        tip = scan.landmarks[int(np.flatnonzero(scan.landmark_ids == IBUG_NOSE_TIP)[0])]
        # the annotated tip may float off the skin: use the closest scan vertex
        tip = scan.vertices[int(cKDTree(scan.vertices).query(tip)[1])]
        source = "landmark 30"
    else:
        tip, source = find_scan_nose_tip(scan.vertices, radius_mm), "geometry"
    points, _, _ = crop_sphere(scan.vertices, tip, radius_mm)
    if len(points) < MIN_SCAN_POINTS:
        raise InputError(f"only {len(points)} scan vertices within {radius_mm:g} mm of the nose tip")
    return ScanTruth(points, tip, scan.landmarks, scan.landmark_ids, source)


def align_to_scan(vertices: np.ndarray, landmarks68: np.ndarray, truth: ScanTruth, tip_index: int) -> Similarity:
    """The similarity taking a predicted mesh (N, 3) with its 68 surface landmarks (68, 3) onto
    the scan: landmark initialisation (MICC start without scan landmarks), then ICP with
    rotation, translation and one isotropic scale."""
    vertices = np.asarray(vertices, dtype=np.float64)
    if truth.landmarks is not None:
        start = umeyama(np.asarray(landmarks68, dtype=np.float64)[truth.landmark_ids], truth.landmarks)
    else:
        start = initial_alignment(vertices, tip_index, GroundTruth(truth.points, truth.tip, len(truth.points), 1.0))
    return icp_similarity(vertices, truth.points, start)


def score_mesh(vertices: np.ndarray, triangles: np.ndarray, landmarks68: np.ndarray, truth: ScanTruth,
               tip_index: int) -> dict[str, float]:
    """Errors (mm) of one predicted mesh (N, 3) with its 68 surface landmarks (68, 3) against the
    scan: ``mean_mm`` (headline), ``median_mm``, ``rmse_mm`` (point-to-plane) and ``scale``."""
    vertices = np.asarray(vertices, dtype=np.float64)
    alignment = align_to_scan(vertices, landmarks68, truth, tip_index)
    distance, plane = chunked_surface_distances(truth.points, alignment.apply(vertices), np.asarray(triangles))
    return {"mean_mm": float(distance.mean()), "median_mm": float(np.median(distance)),
            "rmse_mm": float(np.sqrt((plane ** 2).mean())), "scale": float(alignment.scale)}


# --------------------------------------------------------------------------- semi-real renders


def scan_albedo(scan: Scan, seed: int = 0) -> np.ndarray:
    """A plausible per-vertex reflectance (N, 3) in [0, 1] for an untextured scan: skin with a
    gentle low-frequency variation, and, from the landmarks (iBUG indices), darker brows, red
    lips, a dark mouth opening and eyes with a white sclera and a dark iris. Regions are found
    in the frontal (x, y) projection of the front of the head (+z is out of the face)."""
    from matplotlib.path import Path as Polygon

    rng = np.random.default_rng(seed)
    v = scan.vertices
    centre = v.mean(axis=0)
    waves = sum(np.sin((v - centre) @ rng.normal(size=3) / rng.uniform(30, 80) + rng.uniform(0, 6.3))
                for _ in range(4)) / 4
    albedo = np.array([0.80, 0.60, 0.50]) * (1 + 0.06 * waves[:, None])
    if scan.landmarks is None:
        return albedo.clip(0, 1)
    lm = {int(i): p for i, p in zip(scan.landmark_ids, scan.landmarks)}
    front = v[:, 2] > lm[IBUG_NOSE_TIP][2] - 45.0
    xy = v[:, :2]

    def inside(ids):
        return front & Polygon(np.array([lm[i][:2] for i in ids])).contains_points(xy)

    def near_polyline(ids, width):
        pts = np.array([lm[i][:2] for i in ids])
        best = np.full(len(v), np.inf)
        for a, b in zip(pts[:-1], pts[1:]):
            t = np.clip(((xy - a) @ (b - a)) / max((b - a) @ (b - a), 1e-9), 0, 1)
            best = np.minimum(best, np.linalg.norm(xy - (a + t[:, None] * (b - a)), axis=1))
        return front & (best <= width)

    albedo[near_polyline(range(17, 22), 3.5) | near_polyline(range(22, 27), 3.5)] = [0.30, 0.20, 0.15]
    albedo[inside(range(48, 60))] = [0.72, 0.38, 0.36]
    albedo[inside(range(60, 68))] = [0.25, 0.10, 0.10]
    for eye in (range(36, 42), range(42, 48)):
        ids = list(eye)
        mask = inside(ids)
        albedo[mask] = [0.85, 0.82, 0.78]
        centre_xy = np.mean([lm[i][:2] for i in ids], axis=0)
        width = np.linalg.norm(lm[ids[0]][:2] - lm[ids[3]][:2])
        albedo[mask & (np.linalg.norm(xy - centre_xy, axis=1) < 0.22 * width)] = [0.22, 0.14, 0.09]
    return albedo.clip(0, 1)


def render_scan(scan: Scan, albedo: np.ndarray, pitch: float, yaw: float, size: int = 512, seed: int = 0,
                distance_mm: float = 1200.0, zoom: float = 0.6) -> np.ndarray:
    """One (size, size, 3) uint8 render of the scan at head pitch / yaw (degrees) on the fitting
    camera, with soft white light from the front-top and a smooth random background."""
    generator = torch.Generator().manual_seed(seed)
    centre = scan.landmarks.mean(axis=0) if scan.landmarks is not None else scan.vertices.mean(axis=0)
    verts = torch.as_tensor(scan.vertices - centre, dtype=torch.float32)[None]
    angles = torch.tensor([[math.radians(pitch), math.radians(yaw), 0.0]])
    cam = model_to_camera(verts, angles, torch.tensor([[0.0, 0.0, distance_mm]]))
    k = crop_intrinsics(size, 1)
    k[:, 0, 0] *= zoom
    k[:, 1, 1] *= zoom
    sh = torch.zeros(1, 27)
    for c in range(3):  # ambient plus a light from above the camera (SH band 1: y, z, x)
        sh[0, 9 * c] = 0.95 / SH_CONSTANTS[0]
        sh[0, 9 * c + 1:9 * c + 4] = torch.tensor([-0.15, -0.25, 0.05])
    out = MeshRenderer(image_size=(size, size), backend="torch").render(
        cam, torch.as_tensor(scan.triangles), k, torch.as_tensor(albedo, dtype=torch.float32)[None], sh,
        background=textured_backgrounds(1, size, generator))
    return to_uint8(out.image)[0]


# --------------------------------------------------------------------------- the run


@dataclass
class ScanOptions:
    landmarks: str | None = None
    units: str = "auto"
    photos: str | None = None
    yaws: tuple[float, ...] = YAWS
    pitches: tuple[float, ...] = PITCHES
    image_size: int = 512
    seed: int = 0
    face_model: str | None = None
    device: str = "auto"
    batch_size: int = 16
    settings: FitSettings = field(default_factory=FitSettings)


@dataclass
class ScanResult:
    rows: list[dict]
    summary: dict

    def to_dict(self) -> dict:
        return {"protocol": "scan", **self.summary, "images": self.rows}


def _render_views(scan: Scan, options: ScanOptions, folder: Path) -> dict[str, dict]:
    """Write the semi-real renders (kept when present); name -> {pitch, yaw}."""
    folder.mkdir(parents=True, exist_ok=True)
    albedo = scan_albedo(scan, options.seed)
    views = {}
    for i, pitch in enumerate(options.pitches):
        for j, yaw in enumerate(options.yaws):
            name = f"scan_p{pitch:+.0f}_y{yaw:+.0f}.png"
            if not (folder / name).is_file():
                write_png(folder / name, render_scan(scan, albedo, pitch, yaw, options.image_size,
                                                     options.seed * 1000 + i * 100 + j))
            views[name] = {"pitch": pitch, "yaw": yaw}
    return views


def _score_face(model, face: dict, truth: ScanTruth, tip_index: int) -> dict[str, Any]:
    row: dict[str, Any] = {}
    for label, key in (("fit", "vertices"), ("neutral", "vertices_neutral")):
        vertices = face[key].astype(np.float64)
        scores = score_mesh(vertices, model.triangles, landmark_points68(model, vertices, on_surface=True), truth,
                            tip_index)
        row.update({f"{label}_{k}": v for k, v in scores.items()})
    if model.expression_kind == "blendshape" and "expression" in face:
        report = expression_report(face["expression"], model.expression_names)
        row.update({"max_blendshape": report["max_weight"], "max_blendshape_name": report["max_name"],
                    "opposing_active": ";".join(report["opposing_active"]), "neutral_ok": report["neutral_ok"]})
    return row


def run_scan(scan_path: str | Path, out_dir: str | Path, options: ScanOptions | None = None, progress=None,
             detect_progress=None, should_stop: Callable[[], bool] | None = None) -> ScanResult:
    """Fit the photos (or the scan's renders) and score them; writes scan_results.json,
    scan_results.csv and scan_error_by_image.png in ``out_dir``."""
    options = options or ScanOptions()
    out_dir = Path(out_dir)
    started = time.perf_counter()
    scan = load_scan(scan_path, options.landmarks, options.units)
    truth = prepare_truth(scan)
    if options.photos is not None and not Path(options.photos).exists():
        raise InputError(f"photos {options.photos} do not exist")
    model = resolve_face_model(options.face_model)
    pick_device(options.device)
    out_dir.mkdir(parents=True, exist_ok=True)
    views: dict[str, dict] = {}
    if options.photos is None:
        views = _render_views(scan, options, out_dir / "renders")
        inputs = [str(out_dir / "renders")]
    else:
        inputs = [str(options.photos)]
    fit_options = FitOptions(face_model=options.face_model, device=options.device, batch_size=options.batch_size,
                             formats=["ply"], largest=True, overlays=True, texture_size=256, settings=options.settings)
    fit_summary = run_fit(inputs, out_dir / "fit", fit_options, progress=progress, detect_progress=detect_progress,
                          should_stop=should_stop)
    tip_index = int(np.argmax(model.mean_shape[:, 2]))
    mean_face = model.mean_shape.astype(np.float64)
    baseline = score_mesh(mean_face, model.triangles, landmark_points68(model, mean_face, on_surface=True), truth,
                          tip_index)
    fitted = {key: faces for key, _attrs, faces in read_fits(out_dir / "fit" / "fits.h5")}
    keys = sorted(set(fit_summary.images) | set(fitted) | set(views))
    rows = []
    for key in keys:
        row: dict[str, Any] = {"image": key, **views.get(Path(key).name, {}), "status": "failed", "reason": ""}
        faces = [f for f in fitted.get(key, []) if "vertices" in f]
        if faces and fit_summary.images.get(key) in ("ok", "skipped"):
            row.update(status="ok", **_score_face(model, faces[0], truth, tip_index))
        else:
            row["reason"] = fit_summary.image_reasons.get(key) or (
                "no face detected" if fit_summary.images.get(key) == "no_face" else "not reconstructed")
        rows.append(row)
    ok = [r for r in rows if r["status"] == "ok"]
    fit_mean = mean_or_none(r.get("fit_mean_mm") for r in ok)
    neutral_mean = mean_or_none(r.get("neutral_mean_mm") for r in ok)
    summary = {
        "variant": "photos" if options.photos is not None else "rendered", "scan": str(scan_path),
        "scan_units": scan.units, "scan_landmarks": 0 if scan.landmarks is None else int(len(scan.landmarks)),
        "nose_tip": truth.tip_source, "crop_radius_mm": CROP_RADIUS_MM, "crop_points": int(len(truth.points)),
        "metric": METRIC, "model_id": model.model_id, "images": len(rows), "reconstructed": len(ok),
        "missed": [r["image"] for r in rows if r["status"] != "ok"],
        "fit_mean_mm": fit_mean, "neutral_mean_mm": neutral_mean,
        "fit_rmse_mm": mean_or_none(r.get("fit_rmse_mm") for r in ok), "mean_face_mean_mm": baseline["mean_mm"],
        "mean_face_rmse_mm": baseline["rmse_mm"],
        "fit_improvement": None if fit_mean is None else 1.0 - fit_mean / baseline["mean_mm"],
        "neutral_improvement": None if neutral_mean is None else 1.0 - neutral_mean / baseline["mean_mm"],
        "max_blendshape": max((r["max_blendshape"] for r in ok if "max_blendshape" in r), default=None),
        "neutral_ok_fraction": (sum(bool(r.get("neutral_ok")) for r in ok) / len(ok)) if ok else None,
        "opposing_pairs_active": sorted({p for r in ok for p in (r.get("opposing_active") or "").split(";") if p}),
        "interrupted": fit_summary.interrupted, "elapsed_seconds": round(time.perf_counter() - started, 3),
        "fit_notes": list(fit_summary.notes),
    }
    result = ScanResult(rows, summary)
    write_reports(result, out_dir)
    return result


CSV_FIELDS = ["image", "pitch", "yaw", "status", "reason", "fit_mean_mm", "fit_median_mm", "fit_rmse_mm",
              "neutral_mean_mm", "neutral_median_mm", "neutral_rmse_mm", "fit_scale", "max_blendshape",
              "max_blendshape_name", "opposing_active", "neutral_ok"]


def write_reports(result: ScanResult, out_dir: Path) -> None:
    """scan_results.json, scan_results.csv and scan_error_by_image.png (atomic)."""
    ok = [r for r in result.rows if r["status"] == "ok"]
    if ok:
        labels = [Path(r["image"]).stem.replace("scan_", "") for r in ok]
        plot_bar_groups(labels, {"exported mesh": [r["fit_mean_mm"] for r in ok],
                                 "neutral": [r["neutral_mean_mm"] for r in ok],
                                 "mean face": [result.summary["mean_face_mean_mm"]] * len(ok)},
                        out_dir / "scan_error_by_image.png", "mean scan-to-mesh distance (mm)", xlabel="image",
                        title=f"scan protocol ({result.summary['variant']})")
        result.summary["plots"] = {"error_by_image": str(out_dir / "scan_error_by_image.png")}
    write_result_files(out_dir, "scan_results", result.to_dict(), result.rows, CSV_FIELDS)
