"""The rendered-pose protocol (paper 000 table 5 / fig. 6, paper 001 fig. 7b).

Faces sampled from the face model (in-span ground truth: a floor, not a claim about real
faces) are rendered with a plausible skin albedo and light at pitch {-15, -20, -25} x yaw
{-80, -40, 0, 40, 80}, written as photos, reconstructed by ``detect + fit`` and scored against
their ground truth: ground truth cropped to 95 mm around its nose tip (found from the
geometry), prediction aligned by ICP with isotropic scale, point-to-plane RMSE and mean
point-to-surface distance of the ground-truth vertices. The mean face, scored the same way,
is the baseline. Runs are resumable: photos are re-rendered identically from the seed and
finished fits are skipped.
"""

from __future__ import annotations

import io
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from facerecon.evaluation.geometry import crop_sphere, find_nose_tip, scan_error
from facerecon.evaluation.results import write_result_files
from facerecon.export.meshio import write_png
from facerecon.facemodel.resolve import resolve_face_model
from facerecon.facemodel.tensors import FaceModelTensors
from facerecon.fitting.optimize import FitSettings
from facerecon.io.atomic import atomic_write_bytes
from facerecon.stages.fit import FitOptions, read_fits, run_fit
from facerecon.synthetic import random_parameters, render_faces, textured_backgrounds, to_uint8

PITCHES = (-15.0, -20.0, -25.0)
YAWS = (-80.0, -40.0, 0.0, 40.0, 80.0)
CROP_RADIUS_MM = 95.0


@dataclass
class RenderedOptions:
    face_model: str | None = None
    samples: int = 3
    seed: int = 0
    pitches: tuple[float, ...] = PITCHES
    yaws: tuple[float, ...] = YAWS
    image_size: int = 512
    device: str = "auto"
    batch_size: int = 16
    settings: FitSettings = field(default_factory=FitSettings)
    #: render paper 002's specular highlights (synthetic.random_parameters(specular=True))
    specular: bool = False


@dataclass
class RenderedResult:
    rows: list[dict]            # one per rendered image
    by_yaw: list[dict]          # aggregated table
    summary: dict

    def to_dict(self) -> dict:
        return {"protocol": "rendered", "by_yaw": self.by_yaw, "images": self.rows, **self.summary}


def _render_photos(model, options: RenderedOptions, photos: Path) -> dict[str, dict]:
    """Render every (sample, pitch, yaw) photo; returns name -> ground truth record."""
    tensors = FaceModelTensors(model)
    generator = torch.Generator().manual_seed(options.seed)
    truth = {}
    photos.mkdir(parents=True, exist_ok=True)
    for sample in range(options.samples):
        base = random_parameters(tensors, 1, generator, specular=options.specular)
        for pitch in options.pitches:
            for yaw in options.yaws:
                params = {k: v.clone() for k, v in base.items()}
                params["angles"][:, 0] = np.deg2rad(pitch)
                params["angles"][:, 1] = np.deg2rad(yaw)
                params["angles"][:, 2] = 0.0
                batch = render_faces(tensors, params, options.image_size,
                                     textured_backgrounds(1, options.image_size, generator), zoom=0.6)
                name = f"s{sample:03d}_p{pitch:+.0f}_y{yaw:+.0f}.png"
                path = photos / name
                if not path.exists():
                    write_png(path, to_uint8(batch.images)[0])
                truth[name] = {"sample": sample, "pitch": pitch, "yaw": yaw,
                               "vertices": batch.vertices[0].numpy().astype(np.float64),
                               "albedo": tensors.albedo(params["albedo"]).clamp(0, 1)[0].numpy().astype(np.float64)}
    return truth


def albedo_errors(fitted_colors: np.ndarray, truth: np.ndarray, skin: np.ndarray) -> dict[str, float]:
    """The de-lit diffuse albedo's error over the skin vertices: mean RGB distance (channels in
    [0, 1]) as fitted (``albedo_error``) and after the per-channel gain that best matches the truth
    (``albedo_error_gain``: albedo and light share a scale, which one photo cannot separate).

    Args:
        fitted_colors: (N, 3) uint8, the fit's ``albedo_colors``; truth: (N, 3) in [0, 1]; skin: vertex indices.
    """
    fitted = fitted_colors[skin].astype(np.float64) / 255.0
    true = truth[skin]
    gain = (fitted * true).sum(0) / np.maximum((fitted * fitted).sum(0), 1e-12)
    return {"albedo_error": float(np.linalg.norm(fitted - true, axis=1).mean()),
            "albedo_error_gain": float(np.linalg.norm(fitted * gain - true, axis=1).mean())}


def run_rendered(out_dir: str | Path, options: RenderedOptions | None = None, progress=None,
                 detect_progress=None, should_stop=None) -> RenderedResult:
    """Render, reconstruct and score; writes results.json, results.csv and plots in ``out_dir``."""
    options = options or RenderedOptions()
    out_dir = Path(out_dir)
    model = resolve_face_model(options.face_model)
    truth = _render_photos(model, options, out_dir / "photos")
    fit_options = FitOptions(face_model=options.face_model, device=options.device, batch_size=options.batch_size,
                             formats=["ply"], largest=True, overlays=False, texture_size=256,
                             settings=options.settings)
    summary = run_fit([str(out_dir / "photos")], out_dir / "fit", fit_options, progress=progress,
                      detect_progress=detect_progress, should_stop=should_stop)
    fitted = {key: faces for key, _a, faces in read_fits(out_dir / "fit" / "fits.h5")}
    region, skin = model.regions["face"], model.regions["skin"]
    rows = []
    per_sample: dict[int, tuple] = {}  # every pose of a sample shares its ground truth
    for name, record in sorted(truth.items()):
        if record["sample"] not in per_sample:
            gt = record["vertices"][region]
            gt_points, _, _ = crop_sphere(gt, find_nose_tip(gt), CROP_RADIUS_MM)
            per_sample[record["sample"]] = (gt_points, scan_error(model.mean_shape.astype(np.float64),
                                                                  model.triangles, gt_points))
        gt_points, baseline = per_sample[record["sample"]]
        row = {"image": name, "sample": record["sample"], "pitch": record["pitch"], "yaw": record["yaw"],
               "baseline_rmse_mm": baseline.rmse_point_to_plane, "baseline_mean_mm": baseline.mean_point_to_surface}
        faces = fitted.get(name, [])
        if faces and "vertices_neutral" in faces[0]:
            # the ground truth carries its expression: score the fitted mesh with expression
            error = scan_error(faces[0]["vertices"].astype(np.float64), model.triangles, gt_points)
            row.update({"status": "ok", "rmse_mm": error.rmse_point_to_plane, "mean_mm": error.mean_point_to_surface,
                        **albedo_errors(faces[0]["albedo_colors"], record["albedo"], skin)})
        else:
            row.update({"status": "not reconstructed", "rmse_mm": None, "mean_mm": None, "albedo_error": None,
                        "albedo_error_gain": None})
        rows.append(row)
    by_yaw = []
    for yaw in options.yaws:
        group = [r for r in rows if r["yaw"] == yaw]
        ok = [r for r in group if r["status"] == "ok"]
        fit = np.array([r["rmse_mm"] for r in ok])
        base = np.array([r["baseline_rmse_mm"] for r in ok]) if ok else np.array([])
        by_yaw.append({
            "albedo_error_mean": float(np.mean([r["albedo_error"] for r in ok])) if ok else None,
            "albedo_error_gain_mean": float(np.mean([r["albedo_error_gain"] for r in ok])) if ok else None,
            "yaw": yaw, "images": len(group), "reconstructed": len(ok),
            "rmse_mean_mm": float(fit.mean()) if ok else None, "rmse_std_mm": float(fit.std()) if ok else None,
            "baseline_rmse_mean_mm": float(base.mean()) if ok else None,
            "improvement_over_baseline": float(1 - fit.mean() / base.mean()) if ok else None,
        })
    result = RenderedResult(rows, by_yaw, {"samples": options.samples, "seed": options.seed,
                                           "model_id": model.model_id, "interrupted": summary.interrupted,
                                           "crop_radius_mm": CROP_RADIUS_MM,
                                           "metric": "point-to-plane RMSE after ICP with isotropic scale"})
    write_reports(result, out_dir)
    return result


def write_reports(result: RenderedResult, out_dir: Path) -> None:
    """results.json, results.csv (one row per image) and error_by_yaw.png."""
    fields = ["image", "sample", "pitch", "yaw", "status", "rmse_mm", "mean_mm", "baseline_rmse_mm",
              "baseline_mean_mm"]
    write_result_files(out_dir, "results", result.to_dict(), result.rows, fields)
    plot_error_by_yaw(result.by_yaw, out_dir / "error_by_yaw.png")


def plot_error_by_yaw(by_yaw: list[dict], path: Path) -> None:
    """Line plot of the fit's and the mean face's RMSE by yaw."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in by_yaw if r["rmse_mean_mm"] is not None]
    figure, axis = plt.subplots(figsize=(5, 3.2), dpi=120)
    if rows:
        yaws = [r["yaw"] for r in rows]
        axis.errorbar(yaws, [r["rmse_mean_mm"] for r in rows], yerr=[r["rmse_std_mm"] for r in rows],
                      marker="o", capsize=3, label="facerecon fit")
        axis.plot(yaws, [r["baseline_rmse_mean_mm"] for r in rows], marker="s", linestyle="--", label="mean face")
    axis.set_xlabel("yaw (degrees)")
    axis.set_ylabel("point-to-plane RMSE (mm)")
    axis.set_title("rendered-pose protocol")
    axis.grid(alpha=0.3)
    axis.legend()
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    plt.close(figure)

    atomic_write_bytes(path, buffer.getvalue())
