"""``evaluate lap``: paper 003's protocols for ``aggregate --method lap`` against the 3DMM.

Two parts (either or both):

* **depth** (``--scan``): a real scan is rendered (semi-real, as ``evaluate scan``) at 8 views;
  albums of its first 1, 2, 4 and 8 views are aggregated with ``--method lap`` (which runs the
  ``joint`` 3DMM aggregation first). Each prediction is aligned to the scan (landmark start,
  ICP with isotropic scale, as ``evaluate scan``), rendered with the true camera of every
  view, and scored against the scan's render on the pixels that the scan (cropped to 95 mm
  around its nose tip), the 3DMM face and LAP's canonical face all cover: SIDE (x 10^-2) and MAD (degrees) of paper 003 table 2, and the scan-to-mesh mean
  distance (mm). Predictions: the 3DMM ``joint`` neutral face, LAP's canonical face (both
  scored on all 8 views, so album sizes compare on the same views) and LAP's personalised
  faces (each on its own view).
* **albums** (``ROOT``, one folder per person): every album is aggregated with ``--method lap``
  and each photo scored as paper 003 table 5: identity similarity (cosine of face-recognition
  embeddings of the photo and of the render composited over it) and SSIM of that composite
  against the photo, over the face pixels all three predictions cover, for the 3DMM fit, the
  canonical and the personalised LAP face.

Outputs in OUT: ``lap_results.json`` (everything), ``lap_results.csv`` (depth rows),
``lap_albums.json/.csv`` (album rows), ``lap_depth_by_size.png``.
Resumable: the aggregate runs keep their ``aggregate.h5`` and skip finished albums.
"""

from __future__ import annotations

import math
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from facerecon.aggregation.lap import CanonicalGrid, LapSettings, grid_triangles, grid_vertices, sample_grid
from facerecon.errors import InputError
from facerecon.evaluation.landmarks import landmark_points68
from facerecon.evaluation.lap_metrics import mad, side
from facerecon.evaluation.plots import plot_bar_groups
from facerecon.evaluation.results import mean_or_none, write_result_files
from facerecon.evaluation.scan import align_to_scan, load_scan, prepare_truth, render_scan, scan_albedo, score_mesh
from facerecon.export.meshio import write_png
from facerecon.facemodel.resolve import resolve_face_model
from facerecon.facemodel.tensors import FaceModelTensors
from facerecon.fitting.camera import crop_intrinsics, model_to_camera
from facerecon.fitting.optimize import FitSettings
from facerecon.io.store import open_results
from facerecon.render.renderer import MeshRenderer
from facerecon.stages.aggregate import AggregateOptions, run_aggregate

#: the semi-real views (pitch, yaw) in degrees; albums of size n use the first n
VIEWS = ((0.0, 0.0), (0.0, -20.0), (0.0, 20.0), (0.0, -40.0), (0.0, 40.0), (-10.0, 0.0), (10.0, 0.0), (10.0, 20.0))
SIZES = (1, 2, 4, 8)
PREDICTIONS = ("joint", "canonical", "personal")


@dataclass
class LapEvalOptions:
    scan: str | None = None
    scan_landmarks: str | None = None
    scan_units: str = "auto"
    albums: str | None = None
    sizes: tuple[int, ...] = SIZES
    image_size: int = 512
    seed: int = 0
    face_model: str | None = None
    device: str = "auto"
    lap: LapSettings = field(default_factory=LapSettings)
    settings: FitSettings = field(default_factory=FitSettings)  #: the joint 3DMM fit's


@dataclass
class LapEvalResult:
    depth_rows: list[dict]
    album_rows: list[dict]
    summary: dict

    def to_dict(self) -> dict:
        return {"protocol": "lap", **self.summary, "depth": self.depth_rows, "albums": self.album_rows}


# --------------------------------------------------------------------------- depth on scan renders


def _view_camera(size: int, zoom: float = 0.6):
    k = crop_intrinsics(size, 1)
    k[:, 0, 0] *= zoom
    k[:, 1, 1] *= zoom
    return k


def render_geometry(vertices: np.ndarray, triangles: np.ndarray, centre: np.ndarray, pitch: float, yaw: float,
                    size: int, distance_mm: float = 1200.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Depth (H, W), camera-frame normals (H, W, 3) and mask (H, W) of a mesh (N, 3) in the scan's
    frame seen by the semi-real camera of :func:`facerecon.evaluation.scan.render_scan`."""

    verts = torch.as_tensor(vertices - centre, dtype=torch.float32)[None]
    angles = torch.tensor([[math.radians(pitch), math.radians(yaw), 0.0]])
    cam = model_to_camera(verts, angles, torch.tensor([[0.0, 0.0, distance_mm]]))
    out = MeshRenderer(image_size=(size, size), backend="torch").render(
        cam, torch.as_tensor(np.asarray(triangles), dtype=torch.int64), _view_camera(size),
        torch.ones_like(verts), None)
    return out.depth[0], out.normals[0], out.mask[0]


def _lap_meshes(group, grid: CanonicalGrid) -> dict[str, Any]:
    """Canonical and personalised LAP meshes (vertices, triangles, 68 landmarks) of an
    aggregate.h5 ``lap`` group."""
    valid = torch.as_tensor(group["valid"][()])
    tris = grid_triangles(valid).numpy()
    xy = torch.as_tensor(group["landmarks"][()])

    def mesh(depth):
        d = torch.as_tensor(depth, dtype=torch.float32)[None]
        z = sample_grid(d, grid, xy)[0]
        return grid_vertices(grid, d)[0].numpy().astype(np.float64), \
            torch.cat([xy, z[:, None]], dim=1).numpy().astype(np.float64)

    canonical = mesh(group["depth"][()])
    personal = [mesh(d) for d in group["personal_depth"][()]]
    faces = [f.decode() if isinstance(f, bytes) else str(f) for f in group["faces"][()]]
    return {"triangles": tris, "canonical": canonical, "personal": dict(zip(faces, personal))}


def _aligned_views(vertices, triangles, landmarks68, truth, tip_index, views, centre, size):
    """A prediction aligned to the scan (landmarks + ICP), rendered in each view: {view: (depth,
    normals, mask)}, and its scan-to-mesh mean distance (mm)."""
    aligned = align_to_scan(vertices, landmarks68, truth, tip_index).apply(vertices)
    renders = {name: render_geometry(aligned, triangles, centre, *views[name], size) for name in views}
    return renders, score_mesh(vertices, triangles, landmarks68, truth, tip_index)["mean_mm"]


def run_depth(options: LapEvalOptions, out_dir: Path, model, progress=None, should_stop=None) -> list[dict]:
    """The depth part (module docstring); one row per (album size, prediction, view)."""

    scan = load_scan(options.scan, options.scan_landmarks, options.scan_units)
    if scan.landmarks is None:
        raise InputError("evaluate lap --scan needs the scan's landmarks (--scan-landmarks)")
    truth = prepare_truth(scan)
    centre = scan.landmarks.mean(axis=0)
    size = options.image_size
    renders = out_dir / "renders"
    renders.mkdir(parents=True, exist_ok=True)
    albedo = scan_albedo(scan, options.seed)
    views: dict[str, tuple[float, float]] = {}
    for i, (pitch, yaw) in enumerate(VIEWS):
        name = f"v{i}_p{pitch:+.0f}_y{yaw:+.0f}.png"
        if not (renders / name).is_file():
            write_png(renders / name, render_scan(scan, albedo, pitch, yaw, size, options.seed * 1000 + i))
        views[name] = (pitch, yaw)
    # the scan's own depth in every view, cropped to 95 mm around the nose tip
    near = np.linalg.norm(scan.vertices - truth.tip, axis=1) <= 95.0
    crop_tris = scan.triangles[near[scan.triangles].all(axis=1)]
    truth_renders = {n: render_geometry(scan.vertices, crop_tris, centre, p, y, size) for n, (p, y) in views.items()}
    tensors = FaceModelTensors(model)
    tip_index = int(np.argmax(model.mean_shape[:, 2]))
    names = list(views)
    rows: list[dict] = []
    if progress is not None:
        progress.start(len(options.sizes))
    for n in options.sizes:
        if should_stop is not None and should_stop():
            break
        album = out_dir / "albums" / f"size{n}" / f"scan{n}"
        album.mkdir(parents=True, exist_ok=True)
        for name in names[:n]:
            if not (album / name).is_file():
                shutil.copyfile(renders / name, album / name)
        agg_dir = out_dir / "aggregate" / f"size{n}"
        run_aggregate([str(album)], agg_dir, AggregateOptions(
            face_model=options.face_model, device=options.device, method="lap", formats=["obj"], texture_size=256,
            identity_check="shape", lap=options.lap, settings=options.settings), should_stop=should_stop)
        with open_results(agg_dir / "aggregate.h5", "identities") as results:
            if album.name not in results or "lap" not in results[album.name]:
                rows.append({"size": n, "prediction": "all", "status": "failed"})
                continue
            group = results[album.name]
            identity = torch.as_tensor(group["identity"][()])[None]
            lap = group["lap"]
            grid = CanonicalGrid(int(lap.attrs["grid_size"]), float(lap.attrs["grid_x_half"]),
                                 float(lap.attrs["grid_y_top"]))
            meshes = _lap_meshes(lap, grid)
        with torch.no_grad():
            neutral = tensors.shape(identity.float(), torch.zeros(1, tensors.n_expression))[0].numpy().astype(np.float64)
        candidates = [("joint", neutral, model.triangles, landmark_points68(model, neutral, on_surface=True), names),
                      ("canonical", *meshes["canonical"][:1], meshes["triangles"], meshes["canonical"][1], names)]
        for face, (verts, lms) in meshes["personal"].items():
            view = Path(face.split("#")[0]).name
            candidates.append(("personal", verts, meshes["triangles"], lms, [view]))
        rendered = [(label, *_aligned_views(verts, tris, lms, truth, tip_index, {v: views[v] for v in own},
                                            centre, size), own) for label, verts, tris, lms, own in candidates]
        # every prediction is scored on the pixels that the scan, the 3DMM face and the canonical
        # LAP face all cover in that view (the same pixels for all)
        common = {v: truth_renders[v][2] & rendered[0][1][v][2] & rendered[1][1][v][2] for v in names}
        for label, view_renders, mesh_mm, own in rendered:
            for v in own:
                d_true, n_true, _ = truth_renders[v]
                d_pred, n_pred, m_pred = view_renders[v]
                mask = (common[v] & m_pred)[None]
                rows.append({"size": n, "prediction": label, "status": "ok", "mesh_mm": mesh_mm, "view": v,
                             "side": float(side(d_pred[None], d_true[None], mask)[0]) * 100,
                             "mad": float(mad(n_pred[None], n_true[None], mask)[0]), "pixels": int(mask.sum())})
        if progress is not None:
            progress.advance()
    return rows


def summarise_depth(rows: list[dict]) -> list[dict]:
    """Mean SIDE / MAD / scan-to-mesh per (album size, prediction)."""
    out = []
    keys = sorted({(r["size"], r["prediction"]) for r in rows if r["status"] == "ok"},
                  key=lambda k: (k[0], PREDICTIONS.index(k[1])))
    for size_, prediction in keys:
        chosen = [r for r in rows if r["status"] == "ok" and r["size"] == size_ and r["prediction"] == prediction]
        out.append({"size": size_, "prediction": prediction, "views": len(chosen),
                    "side_x100": mean_or_none(r["side"] for r in chosen),
                    "mad_deg": mean_or_none(r["mad"] for r in chosen),
                    "mesh_mm": mean_or_none(r["mesh_mm"] for r in chosen)})
    return out


# --------------------------------------------------------------------------- real albums


def run_albums(options: LapEvalOptions, out_dir: Path, progress=None, should_stop=None) -> list[dict]:
    """The albums part (module docstring); one row per photo."""
    agg_dir = out_dir / "albums_aggregate"
    summary = run_aggregate([str(options.albums)], agg_dir, AggregateOptions(
        face_model=options.face_model, device=options.device, method="lap", formats=["obj"], texture_size=256,
        lap=options.lap, settings=options.settings), progress=progress, should_stop=should_stop)
    rows: list[dict] = []
    with open_results(agg_dir / "aggregate.h5", "identities") as results:
        for outcome in summary.albums:
            if outcome.name not in results or "lap" not in results[outcome.name]:
                rows.append({"album": outcome.name, "status": "failed", "reason": outcome.reason or "no result"})
                continue
            lap = results[outcome.name]["lap"]
            faces = [f.decode() if isinstance(f, bytes) else str(f) for f in lap["faces"][()]]
            for i, face in enumerate(faces):
                row: dict[str, Any] = {"album": outcome.name, "face": face, "status": "ok"}
                for key in ("ssim_fit", "ssim_canonical", "ssim_personal", "identity_fit", "identity_canonical",
                            "identity_personal", "photometric_canonical", "photometric_personal"):
                    if key in lap:
                        row[key] = float(lap[key][i])
                rows.append(row)
    return rows


def summarise_albums(rows: list[dict]) -> dict[str, float | None]:
    ok = [r for r in rows if r["status"] == "ok"]
    return {key: mean_or_none(r.get(key) for r in ok) for key in
            ("ssim_fit", "ssim_canonical", "ssim_personal", "identity_fit", "identity_canonical", "identity_personal")}


# --------------------------------------------------------------------------- the run


def run_lap_eval(out_dir: str | Path, options: LapEvalOptions, progress=None,
                 should_stop: Callable[[], bool] | None = None) -> LapEvalResult:
    """Run the asked parts and write the reports (module docstring)."""

    if options.scan is None and options.albums is None:
        raise InputError("evaluate lap needs --scan SCAN and/or an albums ROOT")
    if options.albums is not None and not Path(options.albums).is_dir():
        raise InputError(f"albums root {options.albums} is not a folder")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    model = resolve_face_model(options.face_model)
    depth_rows = run_depth(options, out_dir, model, progress, should_stop) if options.scan else []
    album_rows = run_albums(options, out_dir, progress, should_stop) if options.albums else []
    depth_table = summarise_depth(depth_rows)
    summary = {"scan": options.scan, "albums_root": options.albums, "views": [list(v) for v in VIEWS],
               "sizes": list(options.sizes), "lap_settings": options.lap.to_dict(), "depth_summary": depth_table,
               "albums_summary": summarise_albums(album_rows) if album_rows else None,
               "interrupted": bool(should_stop is not None and should_stop()),
               "elapsed_seconds": round(time.perf_counter() - started, 3)}
    result = LapEvalResult(depth_rows, album_rows, summary)
    write_reports(result, out_dir)
    return result


def write_reports(result: LapEvalResult, out_dir: Path) -> None:
    write_result_files(out_dir, "lap_results", result.to_dict(), result.depth_rows,
                       ["size", "prediction", "status", "view", "side", "mad", "pixels", "mesh_mm"])
    if result.album_rows:
        write_result_files(out_dir, "lap_albums", {"albums": result.album_rows}, result.album_rows,
                           ["album", "face", "status", "reason", "ssim_fit", "ssim_canonical", "ssim_personal",
                            "identity_fit", "identity_canonical", "identity_personal", "photometric_canonical",
                            "photometric_personal"])
    table = result.summary["depth_summary"]
    if table:

        sizes = sorted({r["size"] for r in table})
        groups = {p: [next((r["side_x100"] for r in table if r["size"] == s and r["prediction"] == p), None) or 0.0
                      for s in sizes] for p in PREDICTIONS}
        plot_bar_groups([f"{s} photo{'s' if s > 1 else ''}" for s in sizes], groups, out_dir / "lap_depth_by_size.png",
                        "SIDE x 10^-2 (lower is better)", xlabel="album size")
