"""Identity consistency on real photo albums: one person's fitted shapes agree, different
people's differ, and a photo's shape does not depend on its resolution.

Layout: ROOT holds one folder per person (photos directly inside; deeper folders belong to
that person too). Every photo is reconstructed with ``detect + fit`` (largest face).

* **Verification**: the neutral shape of each photo (identity with expression zero, the
  model's photometric region: the front of the face) is compared with every other photo's after a similarity alignment
  (Umeyama: rotation, translation, one scale): RMS vertex distance in mm. Pairs of one
  person are "same", the rest "different"; reported are the median distance of each kind
  and the ROC AUC of "distance below a threshold means same person" (Mann-Whitney statistic,
  ties count half).
* **Resolution spread**: the first ``resolution_photos`` photos of each person are resized
  (area / cubic filter) to each height in ``resolutions`` (aspect kept) and fitted; a photo's
  spread is the mean pairwise RMS distance between its resolutions' neutral shapes; reported
  is the median spread over photos.

* **Identity similarity** (paper 003 table 5): per photo, the cosine between dlib's
  face-recognition embeddings of the photo and of its fit rendered over it
  (:mod:`facerecon.evaluation.identity`); the summary gives the mean.

Ground truth is identity only. Fits are resumable (OUT/fit, OUT/resolutions_fit).
"""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from facerecon.errors import InputError
from facerecon.evaluation.geometry import umeyama
from facerecon.evaluation.identity import fit_identity_similarity
from facerecon.evaluation.plots import plot_cumulative_errors
from facerecon.evaluation.results import write_result_files
from facerecon.export.meshio import write_png
from facerecon.facemodel.resolve import resolve_face_model
from facerecon.fitting.optimize import FitSettings
from facerecon.io.images import IMAGE_EXTENSIONS
from facerecon.io.images import ImageLoadError, load_image
from facerecon.networks.recognition import load_recognition_network
from facerecon.stages.fit import FitOptions, pick_device, read_fits, run_fit

RESOLUTIONS = (240, 480, 720, 1080)


# --------------------------------------------------------------------------- metrics


def aligned_rms(a: np.ndarray, b: np.ndarray) -> float:
    """RMS distance (mm) between two shapes (N, 3) of one topology after the least-squares
    similarity taking ``a`` onto ``b``."""
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    return float(np.sqrt(((umeyama(a, b).apply(a) - b) ** 2).sum(axis=1).mean()))


def pairwise_distances(shapes: np.ndarray) -> np.ndarray:
    """(S, S) symmetric matrix of :func:`aligned_rms` (the mean of both directions)."""
    count = len(shapes)
    out = np.zeros((count, count))
    for i, j in itertools.combinations(range(count), 2):
        out[i, j] = out[j, i] = 0.5 * (aligned_rms(shapes[i], shapes[j]) + aligned_rms(shapes[j], shapes[i]))
    return out


def verification_auc(same: np.ndarray, different: np.ndarray) -> float | None:
    """Probability that a random same-person distance is below a random different-person one
    (ties count half): the area under the ROC curve of thresholding the distance."""
    same = np.asarray(same, dtype=np.float64)
    different = np.asarray(different, dtype=np.float64)
    if not len(same) or not len(different):
        return None
    below = (same[:, None] < different[None, :]).sum() + 0.5 * (same[:, None] == different[None, :]).sum()
    return float(below / (len(same) * len(different)))


# --------------------------------------------------------------------------- layout


def find_people(root: str | Path) -> dict[str, list[Path]]:
    """Person folder name -> its photos (sorted, recursive); folders without photos are left out."""
    root = Path(root)
    if not root.is_dir():
        raise InputError(f"{root} is not a folder")
    people = {}
    for folder in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        photos = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS
                        and not any(part.startswith(".") for part in p.relative_to(folder).parts))
        if photos:
            people[folder.name] = photos
    if len(people) < 2:
        raise InputError(f"{root} needs at least two person folders with photos (found {len(people)}): "
                         "one sub-folder per person")
    return people


def _resized_copies(people: dict[str, list[Path]], folder: Path, heights: tuple[int, ...], per_person: int
                    ) -> dict[str, tuple[str, str, int]]:
    """Write each person's first photos at every height (kept when present);
    key -> (person, original photo name, height)."""
    import cv2


    made = {}
    for person, photos in people.items():
        for photo in photos[:per_person]:
            try:
                rgb = load_image(photo).rgb
            except ImageLoadError:
                continue
            for height in heights:
                name = f"{photo.stem}_{height}p.png"
                key = f"{person}/{name}"
                target = folder / person / name
                if not target.is_file():
                    width = max(1, round(rgb.shape[1] * height / rgb.shape[0]))
                    filter_ = cv2.INTER_AREA if height < rgb.shape[0] else cv2.INTER_CUBIC
                    target.parent.mkdir(parents=True, exist_ok=True)
                    write_png(target, cv2.resize(rgb, (width, height), interpolation=filter_))
                made[key] = (person, photo.name, height)
    return made


# --------------------------------------------------------------------------- the run


@dataclass
class AlbumOptions:
    face_model: str | None = None
    device: str = "auto"
    batch_size: int = 16
    resolutions: tuple[int, ...] = RESOLUTIONS
    resolution_photos: int = 1
    settings: FitSettings = field(default_factory=FitSettings)


@dataclass
class AlbumResult:
    rows: list[dict]        # one per photo
    pairs: list[dict]       # one per photo pair
    spreads: list[dict]     # one per resized photo
    summary: dict

    def to_dict(self) -> dict:
        return {"protocol": "albums", **self.summary, "photos": self.rows, "resolution_spread": self.spreads}


def _fitted_faces(fits_path: Path, keys) -> dict[str, dict]:
    """key -> the fitted face (the first with a neutral shape) of each fitted key among ``keys``."""
    wanted = set(keys)
    found = {}
    for key, attrs, faces in read_fits(fits_path):
        if key in wanted and attrs.get("status") == "ok":
            face = next((f for f in faces if "vertices_neutral" in f), None)
            if face is not None:
                found[key] = face
    return found


def _neutral_shapes(faces: dict[str, dict], region: np.ndarray) -> dict[str, np.ndarray]:
    """key -> the fitted neutral shape's region vertices."""
    return {key: face["vertices_neutral"][region].astype(np.float64) for key, face in faces.items()}


def _fit(inputs: list[str], out: Path, options: AlbumOptions, progress, detect_progress, should_stop):

    fit_options = FitOptions(face_model=options.face_model, device=options.device, batch_size=options.batch_size,
                             formats=[], largest=True, overlays=False, texture_size=64, settings=options.settings)
    return run_fit(inputs, out, fit_options, progress=progress, detect_progress=detect_progress,
                   should_stop=should_stop)


def _verification(rows: list[dict], shapes: dict[str, np.ndarray]) -> tuple[list[dict], dict[str, Any]]:
    keys = [r["key"] for r in rows if r["key"] in shapes]
    person = {r["key"]: r["person"] for r in rows}
    matrix = pairwise_distances(np.stack([shapes[k] for k in keys])) if len(keys) > 1 else np.zeros((0, 0))
    pairs = [{"a": keys[i], "b": keys[j], "same": person[keys[i]] == person[keys[j]], "rms_mm": float(matrix[i, j])}
             for i, j in itertools.combinations(range(len(keys)), 2)]
    same = np.array([p["rms_mm"] for p in pairs if p["same"]])
    different = np.array([p["rms_mm"] for p in pairs if not p["same"]])
    for row in rows:
        if row["key"] in shapes:
            own = [p["rms_mm"] for p in pairs if p["same"] and row["key"] in (p["a"], p["b"])]
            row["same_person_median_mm"] = float(np.median(own)) if own else None
    return pairs, {"pairs_same": int(len(same)), "pairs_different": int(len(different)),
                   "same_median_mm": float(np.median(same)) if len(same) else None,
                   "different_median_mm": float(np.median(different)) if len(different) else None,
                   "auc": verification_auc(same, different)}


def _spreads(made: dict[str, tuple[str, str, int]], shapes: dict[str, np.ndarray]) -> list[dict]:
    groups: dict[tuple[str, str], list[str]] = {}
    for key, (person, photo, _height) in made.items():
        groups.setdefault((person, photo), []).append(key)
    spreads = []
    for (person, photo), keys in sorted(groups.items()):
        fitted = [k for k in sorted(keys, key=lambda k: made[k][2]) if k in shapes]
        spread = None
        if len(fitted) > 1:
            spread = float(np.mean([aligned_rms(shapes[a], shapes[b]) for a, b in itertools.combinations(fitted, 2)]))
        spreads.append({"person": person, "photo": photo, "heights_fitted": [made[k][2] for k in fitted],
                        "heights_missed": [made[k][2] for k in keys if k not in shapes], "spread_mm": spread})
    return spreads


def _identity_similarity(faces: dict[str, dict], detections: Path, model) -> dict[str, float]:
    """Per fitted photo: cosine of dlib embeddings of the photo and of the fit composited over it
    (:mod:`facerecon.evaluation.identity`); empty when the recognition model is not installed."""
    if not faces:
        return {}
    try:
        network = load_recognition_network("dlib")
    except FileNotFoundError:
        return {}
    by_face = {(key, int(face["attrs"].get("index", 0))): face for key, face in faces.items()}
    return {key: value for (key, _index), value in
            fit_identity_similarity(by_face, detections, model, network).items()}


def run_albums(root: str | Path, out_dir: str | Path, options: AlbumOptions | None = None, progress=None,
               detect_progress=None, should_stop: Callable[[], bool] | None = None) -> AlbumResult:
    """Fit every album photo (and the resized copies) and score; writes albums_results.json,
    albums_results.csv (one row per photo), albums_pairs.csv and albums_distances.png."""

    options = options or AlbumOptions()
    out_dir = Path(out_dir)
    started = time.perf_counter()
    people = find_people(root)
    model = resolve_face_model(options.face_model)
    pick_device(options.device)
    out_dir.mkdir(parents=True, exist_ok=True)
    # the front of the face that photos show (the photometric region), not ears, neck or scalp
    region = np.asarray(model.regions.get("photometric", np.arange(model.n_vertices)))

    fit_summary = _fit([str(root)], out_dir / "fit", options, progress, detect_progress, should_stop)
    rows = [{"key": f"{person}/{photo.relative_to(Path(root) / person).as_posix()}", "person": person,
             "status": "failed", "reason": "", "same_person_median_mm": None, "identity_similarity": None}
            for person, photos in people.items() for photo in photos]
    fitted = _fitted_faces(out_dir / "fit" / "fits.h5", [r["key"] for r in rows])
    shapes = _neutral_shapes(fitted, region)
    for row in rows:
        if row["key"] in shapes:
            row["status"] = "ok"
        else:
            status = fit_summary.images.get(row["key"])
            row["reason"] = fit_summary.image_reasons.get(row["key"]) or (
                "no face detected" if status == "no_face" else "not reconstructed")
    pairs, verification = _verification(rows, shapes)
    similarity = _identity_similarity(fitted, out_dir / "fit" / "detections.h5", model)
    for row in rows:
        row["identity_similarity"] = similarity.get(row["key"])
    values = [v for v in similarity.values() if v is not None]
    verification["identity_similarity_mean"] = float(np.mean(values)) if values else None
    verification["identity_similarity_network"] = "dlib_face_recognition_resnet_model_v1" if similarity else None

    spreads: list[dict] = []
    resolution_summary = None
    if options.resolutions and options.resolution_photos > 0 and not fit_summary.interrupted:
        made = _resized_copies(people, out_dir / "resolutions", tuple(options.resolutions), options.resolution_photos)
        res_summary = _fit([str(out_dir / "resolutions")], out_dir / "resolutions_fit", options, progress,
                           detect_progress, should_stop)
        spreads = _spreads(made, _neutral_shapes(_fitted_faces(out_dir / "resolutions_fit" / "fits.h5", made), region))
        values = [s["spread_mm"] for s in spreads if s["spread_mm"] is not None]
        resolution_summary = {"heights": list(options.resolutions), "photos": len(spreads),
                              "median_spread_mm": float(np.median(values)) if values else None,
                              "max_spread_mm": float(np.max(values)) if values else None,
                              "interrupted": res_summary.interrupted}
    summary = {
        "root": str(root), "model_id": model.model_id, "people": len(people), "photos": len(rows),
        "fitted": len(shapes), "missed": [r["key"] for r in rows if r["status"] != "ok"],
        "metric": "RMS distance (mm) of the fitted neutral shapes' front-face (photometric region) vertices after a "
                  "similarity alignment",
        **verification, "resolution": resolution_summary,
        "interrupted": fit_summary.interrupted, "elapsed_seconds": round(time.perf_counter() - started, 3),
        "fit_notes": list(fit_summary.notes),
    }
    result = AlbumResult(rows, pairs, spreads, summary)
    write_reports(result, out_dir)
    return result


def write_reports(result: AlbumResult, out_dir: Path) -> None:
    """albums_results.json/.csv, albums_pairs.csv and albums_distances.png (atomic)."""

    same = [p["rms_mm"] for p in result.pairs if p["same"]]
    different = [p["rms_mm"] for p in result.pairs if not p["same"]]
    if same or different:
        plot_cumulative_errors({"same person": same, "different people": different}, out_dir / "albums_distances.png",
                               "aligned RMS distance of neutral shapes (mm)", ylabel="fraction of pairs",
                               title="albums: shape distance of photo pairs")
        result.summary["plots"] = {"distances": str(out_dir / "albums_distances.png")}
    write_result_files(out_dir, "albums_results", result.to_dict(), result.rows,
                       ["key", "person", "status", "reason", "same_person_median_mm", "identity_similarity"])
    write_result_files(out_dir, "albums_pairs", {"pairs": result.pairs}, result.pairs, ["a", "b", "same", "rms_mm"])
