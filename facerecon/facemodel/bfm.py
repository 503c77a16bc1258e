"""Import the Basel Face Model 2009 (BFM, licence-restricted, user-supplied) into the facerecon format.

Accepted sources (see docs/bfm.md):

* ``BFM_model_front.mat``: the 35 709-vertex face crop built by Deep3DFaceRecon
  (``util/load_mats.py``; also ``BFM09_model_info.mat`` of 3DMM-Fitting-Pytorch). Variables
  ``meanshape`` (1, 3N), ``idBase`` (3N, 80), ``exBase`` (3N, 64), ``meantex`` (1, 3N) in
  0..255, ``texBase`` (3N, 80), ``tri`` (F, 3) and ``keypoints`` (1, 68), both 1-based; the
  optional ``frontmask2_idx`` (1-based) marks the face area. Lengths are in decimetres
  (the micrometre BFM divided by 1e5) and the bases are already multiplied by the standard
  deviations, so coefficients have an N(0, 1) prior.
* ``01_MorphableModel.mat`` (BFM 2009 ``PublicMM1``: ``shapeMU`` (3N, 1), ``shapePC``
  (3N, 199) orthonormal, ``shapeEV`` (199, 1) standard deviations, ``texMU``, ``texPC``,
  ``texEV`` likewise in 0..255, ``tl`` (F, 3) 1-based; micrometres) together with

  - ``Exp_Pca.bin`` (Guo et al. expression PCA): int32 K, float32 mean (3 N_exp),
    float32 K x 3 N_exp row-major components, little-endian, x/y/z interleaved per vertex;
  - ``std_exp.txt``: the K expression standard deviations;
  - ``BFM_exp_idx.mat`` (``trimIndex``, 1-based): the N_exp BFM vertices Exp_Pca.bin is
    defined on (not needed when N_exp is the full vertex count);
  - 68 landmarks: ``Landmarks68_BFM.anl`` (68 1-based vertex indices into the full model,
    '%' comments, github.com/anilbas/BFMLandmarks), or ``facemodel_info.mat``
    (``keypoints``, 1-based into the front crop) with ``BFM_front_idx.mat``;
  - optionally ``BFM_front_idx.mat`` (``idx``, 1-based into the N_exp vertices): keep only
    the Deep3DFaceRecon front crop.

Both MATLAB v5 (scipy) and v7.3 (HDF5, read with h5py and transposed) files are read. BFM
is +x towards the subject's left, +y up, +z out of the face, as facerecon's canonical
frame; the importer converts to millimetres, makes the triangles counter-clockwise seen
from outside (BFM's are clockwise) and moves the origin to an estimated head centre.
"""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import scipy.io
from scipy.spatial import cKDTree

from facerecon.facemodel.annotate import cylindrical_uv, derive_regions, symmetric_pairs
from facerecon.facemodel.model import FaceModel, FaceModelError

DM_TO_MM = 100.0  # BFM_model_front.mat: micrometres / 1e5 = decimetres
UM_TO_MM = 1e-3  # 01_MorphableModel.mat and Exp_Pca.bin: micrometres
COLOUR_SCALE = 1.0 / 255.0  # BFM colours are stored in 0..255
#: The head centre (origin of the converted model) lies this far behind the eye landmarks.
HEAD_CENTRE_DEPTH_MM = 80.0
MODEL_ID_FRONT = "bfm2009-front"
MODEL_ID_FULL = "bfm2009"

FRONT_KEYS = ("meanshape", "idBase", "exBase", "meantex", "texBase", "tri", "keypoints")
FULL_KEYS = ("shapeMU", "shapePC", "shapeEV", "texMU", "texPC", "texEV", "tl")
LANDMARK_HELP = (
    "pass a 68-landmark file: Landmarks68_BFM.anl (1-based indices into the 53490-vertex BFM, "
    "github.com/anilbas/BFMLandmarks) or facemodel_info.mat with BFM_front_idx.mat (Deep3DFaceRecon BFM folder)"
)
# File names recognised when a folder is given.
FOLDER_FRONT = "BFM_model_front.mat"
FOLDER_FULL = ("01_MorphableModel.mat", "Exp_Pca.bin", "std_exp.txt", "BFM_exp_idx.mat", "BFM_front_idx.mat",
               "facemodel_info.mat", "Landmarks68_BFM.anl")


# ---------------------------------------------------------------------------- file reading
def _read_mat(path: Path) -> dict[str, np.ndarray]:
    """Numeric variables of a MATLAB v5 or v7.3 file, in MATLAB's (rows, cols) orientation."""
    try:
        if h5py.is_hdf5(path):
            out = {}
            with h5py.File(path, "r") as f:
                for name, item in f.items():
                    if isinstance(item, h5py.Dataset) and not name.startswith("#") and item.dtype.kind in "biuf":
                        out[name] = np.asarray(item[()]).T  # HDF5 holds MATLAB's column-major arrays transposed
            return out
        data = scipy.io.loadmat(path)
    except FaceModelError:
        raise
    except Exception as exc:  # noqa: BLE001 - scipy/h5py raise many types for foreign files
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise FaceModelError(f"cannot read {path.name} as a MATLAB .mat file: {reason}") from exc
    return {k: v for k, v in data.items() if not k.startswith("__") and isinstance(v, np.ndarray)}


def _read_exp_pca(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Exp_Pca.bin -> mean (N_exp, 3) and components (K, N_exp, 3), file units (micrometres)."""
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise FaceModelError(f"cannot read {path.name}: {exc}") from exc
    if len(raw) < 4:
        raise FaceModelError(f"{path.name} is too short to be Exp_Pca.bin ({len(raw)} bytes)")
    k = int(np.frombuffer(raw, dtype="<i4", count=1)[0])
    n_floats = (len(raw) - 4) // 4
    if k <= 0 or k > 10000 or (len(raw) - 4) % 4 or n_floats % (k + 1) or (n_floats // (k + 1)) % 3:
        raise FaceModelError(
            f"{path.name} does not have the Exp_Pca.bin layout (int32 K={k}, then float32 mean of 3N and "
            f"K x 3N components; {len(raw)} bytes)"
        )
    values = np.frombuffer(raw, dtype="<f4", offset=4)
    per_mode = n_floats // (k + 1)
    mean = values[:per_mode].reshape(-1, 3)
    components = values[per_mode:].reshape(k, -1, 3)
    return mean, components


def _read_numbers(path: Path) -> np.ndarray:
    """Whitespace/comma separated numbers of a text file; '%' and '#' start comments."""
    try:
        text = path.read_text(errors="strict")
    except (OSError, UnicodeDecodeError) as exc:
        raise FaceModelError(f"cannot read {path.name} as text: {exc}") from exc
    tokens = []
    for line in text.splitlines():
        line = line.split("%", 1)[0].split("#", 1)[0]
        tokens += line.replace(",", " ").split()
    try:
        return np.array([float(t) for t in tokens], dtype=np.float64)
    except ValueError as exc:
        raise FaceModelError(f"{path.name} holds non-numeric text: {exc}") from exc


# ---------------------------------------------------------------------- array validation
def _vector(data: dict, key: str, length: int, name: str) -> np.ndarray:
    arr = np.asarray(data[key])
    if arr.size != length or sum(s > 1 for s in arr.shape) > 1:
        raise FaceModelError(f"{name}: {key} has shape {arr.shape}, expected a vector of {length} values")
    return arr.reshape(-1).astype(np.float64)


def _matrix(data: dict, key: str, rows: int, name: str) -> np.ndarray:
    arr = np.asarray(data[key])
    if arr.ndim != 2 or arr.shape[0] != rows:
        raise FaceModelError(f"{name}: {key} has shape {arr.shape}, expected ({rows}, K)")
    return arr


def _indices(values, upper: int, what: str, name: str, count: int | None = None) -> np.ndarray:
    """1-based MATLAB indices -> 0-based int64, checked to lie in [1, upper]."""
    arr = np.asarray(values, dtype=np.float64)
    if count is not None and arr.size != count:
        raise FaceModelError(f"{name}: {what} has {arr.size} entries, expected {count}")
    if arr.size and (not np.all(np.isfinite(arr)) or np.any(arr != np.round(arr))):
        raise FaceModelError(f"{name}: {what} must hold whole numbers")
    if arr.size and (arr.min() < 1 or arr.max() > upper):
        raise FaceModelError(
            f"{name}: {what} must be 1-based vertex indices in [1, {upper}], got [{int(arr.min())}, {int(arr.max())}]"
        )
    return arr.astype(np.int64) - 1


def _triangles(values, upper: int, what: str, name: str) -> np.ndarray:
    arr = np.asarray(values)
    if arr.ndim != 2 or arr.shape[1] != 3 or arr.shape[0] == 0:
        raise FaceModelError(f"{name}: {what} has shape {arr.shape}, expected (F, 3)")
    return _indices(arr, upper, what, name).reshape(-1, 3)


def _require(data: dict, keys, name: str) -> None:
    missing = [k for k in keys if k not in data]
    if missing:
        raise FaceModelError(f"{name} is missing variable(s) {', '.join(missing)}")


def _count(requested: int | None, available: int, what: str, name: str) -> int:
    if requested is None:
        return available
    if requested < 0 or requested > available:
        raise FaceModelError(f"{name} has {available} {what} modes; cannot keep {requested}")
    return int(requested)


def _basis(columns: np.ndarray, keep: int, scale) -> np.ndarray:
    """(3N, K) column basis, x/y/z interleaved per vertex -> (keep, N, 3) float32 times ``scale``."""
    cols = np.asarray(columns[:, :keep], dtype=np.float64) * scale
    return np.ascontiguousarray(cols.T.reshape(keep, -1, 3), dtype=np.float32)


# ----------------------------------------------------------------------- source handling
def _expand(paths) -> list[Path]:
    if isinstance(paths, (str, Path)):
        paths = [paths]
    files: list[Path] = []
    for p in paths:
        p = Path(p).expanduser()
        if p.is_dir():
            if (p / FOLDER_FRONT).is_file():
                files.append(p / FOLDER_FRONT)
            else:
                found = [p / n for n in FOLDER_FULL if (p / n).is_file()]
                if not found:
                    raise FaceModelError(f"{p} holds neither {FOLDER_FRONT} nor 01_MorphableModel.mat")
                files += found
        elif p.is_file():
            files.append(p)
        else:
            raise FaceModelError(f"{p} does not exist")
    if not files:
        raise FaceModelError("no BFM files given (pass BFM_model_front.mat, or 01_MorphableModel.mat + Exp_Pca.bin)")
    return files


def _classify(path: Path) -> tuple[str, object]:
    """(kind, content) of one source file."""
    suffix = path.suffix.lower()
    lower = path.name.lower()
    if suffix == ".mat":
        data = _read_mat(path)
        keys = set(data)
        if keys & {"meanshape", "idBase", "exBase", "meantex", "texBase"}:
            return "front", data
        if keys & {"shapeMU", "shapePC", "shapeEV", "texMU", "texPC", "texEV"}:
            return "full", data
        if "trimIndex" in keys:
            return "exp_idx", data
        if "idx" in keys:
            return "front_idx", data
        if "keypoints" in keys:
            return "info", data
        listed = ", ".join(sorted(keys)[:8]) or "none"
        raise FaceModelError(f"{path.name} is not a recognised BFM .mat file (numeric variables: {listed})")
    if suffix == ".bin":
        return "exp_pca", _read_exp_pca(path)
    if suffix == ".anl" or (suffix == ".txt" and ("landmark" in lower or "keypoint" in lower)):
        return "landmarks", _read_numbers(path)
    if suffix == ".txt" and "std" in lower:
        return "exp_std", _read_numbers(path)
    raise FaceModelError(
        f"{path.name}: unsupported BFM file (expected .mat files, Exp_Pca.bin, std_exp.txt or a landmark "
        "file *.anl / *landmarks*.txt)"
    )


def _collect(paths) -> dict[str, tuple[Path, object]]:
    sources: dict[str, tuple[Path, object]] = {}
    for path in _expand(paths):
        kind, content = _classify(path)
        if kind in sources:
            raise FaceModelError(f"{path.name} and {sources[kind][0].name} are both {kind.replace('_', ' ')} files")
        sources[kind] = (path, content)
    if "front" in sources and "full" in sources:
        raise FaceModelError(
            f"pass either {sources['front'][0].name} or {sources['full'][0].name} (with its expression files), not both"
        )
    if "front" in sources:
        extra = sorted(p.name for k, (p, _) in sources.items() if k != "front")
        if extra:
            raise FaceModelError(
                f"{sources['front'][0].name} is self-contained; unexpected extra files: {', '.join(extra)}"
            )
    elif "full" not in sources:
        raise FaceModelError(
            "no BFM model among the files: pass BFM_model_front.mat, or 01_MorphableModel.mat with Exp_Pca.bin"
        )
    return sources


# -------------------------------------------------------------------------- conversions
def _front_model(path: Path, data: dict, n_identity, n_expression, n_albedo) -> dict:
    name = path.name
    _require(data, FRONT_KEYS, name)
    mean_raw = np.asarray(data["meanshape"])
    if mean_raw.size == 0 or mean_raw.size % 3 or sum(s > 1 for s in mean_raw.shape) > 1:
        raise FaceModelError(f"{name}: meanshape has shape {mean_raw.shape}, expected (1, 3N)")
    rows = mean_raw.size
    n = rows // 3
    id_base = _matrix(data, "idBase", rows, name)
    ex_base = _matrix(data, "exBase", rows, name)
    tex_base = _matrix(data, "texBase", rows, name)
    k_id = _count(n_identity, id_base.shape[1], "identity", name)
    k_exp = _count(n_expression, ex_base.shape[1], "expression", name)
    k_alb = _count(n_albedo, tex_base.shape[1], "albedo", name)
    face_vertices = None
    if "frontmask2_idx" in data:
        face_vertices = np.unique(_indices(np.asarray(data["frontmask2_idx"]).ravel(), n, "frontmask2_idx", name))
    return {
        "model_id": MODEL_ID_FRONT,
        "mean": mean_raw.reshape(-1, 3).astype(np.float64) * DM_TO_MM,
        "identity": _basis(id_base, k_id, DM_TO_MM),
        "expression": _basis(ex_base, k_exp, DM_TO_MM),
        "albedo_mean": _vector(data, "meantex", rows, name).reshape(-1, 3) * COLOUR_SCALE,
        "albedo_basis": _basis(tex_base, k_alb, COLOUR_SCALE),
        "triangles": _triangles(data["tri"], n, "tri", name),
        "landmarks": _indices(np.asarray(data["keypoints"]).ravel(), n, "keypoints", name, count=68),
        "face_vertices": face_vertices if face_vertices is not None else np.arange(n),
        "units": "dm",
        "provenance": (
            f"{name} (Deep3DFaceRecon layout; bases pre-scaled by standard deviations): decimetres -> mm (x100), "
            "colour 0..255 -> [0, 1] (/255), 1-based tri/keypoints -> 0-based"
        ),
        "files": [name],
    }


def _full_model(sources: dict, n_identity, n_expression, n_albedo) -> dict:
    path, data = sources["full"]
    name = path.name
    _require(data, FULL_KEYS, name)
    for kind, filename in (("exp_pca", "Exp_Pca.bin"), ("exp_std", "std_exp.txt")):
        if kind not in sources:
            raise FaceModelError(
                f"{name} has no expression model: also pass {filename} (it needs Exp_Pca.bin from Guo et al. "
                "plus std_exp.txt and BFM_exp_idx.mat from the Deep3DFaceRecon BFM folder)"
            )
    rows = np.asarray(data["shapeMU"]).size
    if rows == 0 or rows % 3:
        raise FaceModelError(f"{name}: shapeMU has {rows} values, not a multiple of 3")
    n_full = rows // 3
    shape_mu = _vector(data, "shapeMU", rows, name)
    shape_pc = _matrix(data, "shapePC", rows, name)
    shape_ev = _vector(data, "shapeEV", shape_pc.shape[1], name)
    tex_mu = _vector(data, "texMU", rows, name)
    tex_pc = _matrix(data, "texPC", rows, name)
    tex_ev = _vector(data, "texEV", tex_pc.shape[1], name)
    tl = _triangles(data["tl"], n_full, "tl", name)

    exp_path, (exp_mean, exp_pc) = sources["exp_pca"]
    std_path, exp_std = sources["exp_std"]
    n_exp_vertices = exp_mean.shape[0]
    if exp_std.size != exp_pc.shape[0]:
        raise FaceModelError(
            f"{std_path.name} has {exp_std.size} values but {exp_path.name} has {exp_pc.shape[0]} components"
        )
    if "exp_idx" in sources:
        idx_path, idx_data = sources["exp_idx"]
        _require(idx_data, ("trimIndex",), idx_path.name)
        exp_to_full = _indices(np.asarray(idx_data["trimIndex"]).ravel(), n_full, "trimIndex", idx_path.name)
        if exp_to_full.size != n_exp_vertices:
            raise FaceModelError(
                f"{idx_path.name} lists {exp_to_full.size} vertices but {exp_path.name} has {n_exp_vertices}"
            )
    elif n_exp_vertices == n_full:
        exp_to_full = np.arange(n_full)
    else:
        raise FaceModelError(
            f"{exp_path.name} covers {n_exp_vertices} of the {n_full} BFM vertices: also pass BFM_exp_idx.mat "
            "(trimIndex; Deep3DFaceRecon BFM folder)"
        )

    kept_exp = np.arange(n_exp_vertices)  # positions in the Exp_Pca vertex set that we keep
    front_to_exp = None
    if "front_idx" in sources:
        fpath, fdata = sources["front_idx"]
        _require(fdata, ("idx",), fpath.name)
        front_to_exp = _indices(np.asarray(fdata["idx"]).ravel(), n_exp_vertices, "idx", fpath.name)
        kept_exp = front_to_exp
    kept = exp_to_full[kept_exp]  # full-model vertex index of each output vertex
    full_to_out = np.full(n_full, -1, dtype=np.int64)
    full_to_out[kept] = np.arange(kept.size)

    # Landmarks and the face area, as full-model indices.
    face_full = None
    if "landmarks" in sources:
        lpath, values = sources["landmarks"]
        lm_full = _indices(values, n_full, "landmark list", lpath.name, count=68)
        lm_source = lpath.name
    elif "info" in sources:
        ipath, idata = sources["info"]
        if front_to_exp is None:
            raise FaceModelError(f"{ipath.name} indexes the front crop: also pass BFM_front_idx.mat")
        _require(idata, ("keypoints",), ipath.name)
        n_front = front_to_exp.size
        kp = _indices(np.asarray(idata["keypoints"]).ravel(), n_front, "keypoints", ipath.name, count=68)
        lm_full = exp_to_full[front_to_exp[kp]]
        lm_source = ipath.name
        if "frontmask2_idx" in idata:
            mask = _indices(np.asarray(idata["frontmask2_idx"]).ravel(), n_front, "frontmask2_idx", ipath.name)
            face_full = exp_to_full[front_to_exp[np.unique(mask)]]
    else:
        raise FaceModelError(f"{name} has no 68-point landmarks: {LANDMARK_HELP}")
    landmarks = full_to_out[lm_full]
    if np.any(landmarks < 0):
        raise FaceModelError(f"landmark vertices of {lm_source} fall outside the vertices kept ({kept.size})")

    inside = np.all(full_to_out[tl] >= 0, axis=1)
    triangles = full_to_out[tl[inside]]
    if triangles.shape[0] == 0:
        raise FaceModelError(f"no triangle of {name} lies within the kept vertices")

    k_id = _count(n_identity, shape_pc.shape[1], "identity", name)
    k_exp = _count(n_expression, exp_pc.shape[0], "expression", exp_path.name)
    k_alb = _count(n_albedo, tex_pc.shape[1], "albedo", name)
    rows_kept = (3 * kept[:, None] + np.arange(3)).ravel()
    identity = _basis(shape_pc[rows_kept], k_id, shape_ev[None, :k_id] * UM_TO_MM)
    albedo_basis = _basis(tex_pc[rows_kept], k_alb, tex_ev[None, :k_alb] * COLOUR_SCALE)
    expression = (exp_pc[:k_exp, kept_exp].astype(np.float64) * (exp_std[:k_exp, None, None] * UM_TO_MM)).astype(
        np.float32
    )
    if face_full is not None:
        face_vertices = full_to_out[face_full]
        face_vertices = face_vertices[face_vertices >= 0]
    elif front_to_exp is not None:
        face_vertices = np.arange(kept.size)
    else:
        face_vertices = None  # whole head: derive_regions picks the forward-facing face area
    optional = ("exp_idx", "front_idx", "info", "landmarks")
    used = [name, exp_path.name, std_path.name] + [sources[k][0].name for k in optional if k in sources]
    return {
        "model_id": MODEL_ID_FRONT if front_to_exp is not None else MODEL_ID_FULL,
        "mean": shape_mu.reshape(-1, 3)[kept] * UM_TO_MM,
        "identity": identity,
        "expression": expression,
        "albedo_mean": tex_mu.reshape(-1, 3)[kept] * COLOUR_SCALE,
        "albedo_basis": albedo_basis,
        "triangles": triangles,
        "landmarks": landmarks,
        "face_vertices": face_vertices,
        "units": "um",
        "provenance": (
            f"{name} (PCA bases x standard deviations shapeEV/texEV) + {exp_path.name} x {std_path.name} "
            f"(expression mean offset ignored, as Deep3DFaceRecon); {kept.size} of {n_full} vertices"
            f"{' (Deep3DFaceRecon front crop)' if front_to_exp is not None else ''}; micrometres -> mm (/1000), "
            f"colour 0..255 -> [0, 1] (/255), 1-based tl -> 0-based; landmarks from {lm_source}"
        ),
        "files": used,
    }


def _midline_x(mean: np.ndarray, landmarks: np.ndarray) -> float:
    """x of the mirror plane: landmark centroid refined by mirrored nearest-neighbour matching."""
    x0 = float(mean[landmarks, 0].mean())
    tree = cKDTree(mean)
    for _ in range(3):
        mirrored = mean.copy()
        mirrored[:, 0] = 2.0 * x0 - mean[:, 0]
        dist, partner = tree.query(mirrored)
        good = dist <= np.percentile(dist, 50)
        x0 = float(np.median(0.5 * (mean[good, 0] + mean[partner[good], 0])))
    return x0


def _check_orientation(mean: np.ndarray, landmarks: np.ndarray, source: str) -> None:
    right_eye, left_eye = mean[landmarks[36:42]].mean(0), mean[landmarks[42:48]].mean(0)
    mouth, nose_tip = mean[landmarks[48:68]].mean(0), mean[landmarks[30]]
    interocular = float(np.linalg.norm(left_eye - right_eye))
    if not 30.0 <= interocular <= 120.0:
        raise FaceModelError(f"{source}: eye centres are {interocular:.3g} mm apart after conversion; units look wrong")
    if right_eye[0] >= left_eye[0]:
        raise FaceModelError(f"{source}: landmarks 36-41 (right eye) are not at -x of 42-47; landmarks look mirrored")
    if min(right_eye[1], left_eye[1]) <= mouth[1]:
        raise FaceModelError(f"{source}: the eyes are not above the mouth (+y up expected)")
    if nose_tip[2] <= 0.5 * (right_eye[2] + left_eye[2]):
        raise FaceModelError(f"{source}: the nose tip is not in front of the eyes (+z out of the face expected)")


def import_bfm(
    paths: list[str | Path] | str | Path,
    n_identity: int | None = None,
    n_expression: int | None = None,
    n_albedo: int | None = None,
) -> FaceModel:
    """Build a :class:`FaceModel` from Basel Face Model 2009 files.

    Args:
        paths: ``BFM_model_front.mat``; or ``01_MorphableModel.mat``, ``Exp_Pca.bin``,
            ``std_exp.txt``, ``BFM_exp_idx.mat``, a landmark source (``Landmarks68_BFM.anl``
            or ``facemodel_info.mat`` + ``BFM_front_idx.mat``) and optionally
            ``BFM_front_idx.mat`` to keep the front crop. A folder stands for the files in it
            with those names (``BFM_model_front.mat`` alone when present).
        n_identity / n_expression / n_albedo: modes to keep (default: all in the files).

    Raises:
        FaceModelError: with a one-line reason naming the file for missing, unreadable or
            inconsistent sources.
    """
    sources = _collect(paths)
    if "front" in sources:
        path, data = sources["front"]
        parts = _front_model(path, data, n_identity, n_expression, n_albedo)
    else:
        parts = _full_model(sources, n_identity, n_expression, n_albedo)

    source = " + ".join(parts["files"])
    mean = parts["mean"]
    triangles, landmarks = parts["triangles"], parts["landmarks"]
    if not np.all(np.isfinite(mean)):
        raise FaceModelError(f"{source}: the mean shape contains NaN or infinite values")
    _check_orientation(mean, landmarks, source)

    # BFM triangles are clockwise seen from outside: make them face outwards (+z at the nose).
    nose = np.isin(triangles, landmarks[27:36]).any(axis=1)
    if not nose.any():
        raise FaceModelError(f"{source}: no triangle touches the nose landmarks")
    v0, v1, v2 = (mean[triangles[nose, k]] for k in range(3))
    flipped = bool(np.cross(v1 - v0, v2 - v0)[:, 2].sum() < 0)
    if flipped:
        triangles = triangles[:, ::-1]
    triangles = np.ascontiguousarray(triangles, dtype=np.int32)

    # Origin: on the mirror plane, at eye height, HEAD_CENTRE_DEPTH_MM behind the eyes.
    eyes = mean[landmarks[36:48]].mean(0)
    centre = np.array([_midline_x(mean, landmarks), eyes[1], eyes[2] - HEAD_CENTRE_DEPTH_MM])
    mean = mean - centre

    regions = derive_regions(mean, triangles, landmarks, face_vertices=parts["face_vertices"])
    edges = mean[triangles] - mean[np.roll(triangles, 1, axis=1)]
    tolerance = max(1.0, 0.5 * float(np.median(np.linalg.norm(edges, axis=-1))))
    albedo_mean = np.clip(parts["albedo_mean"], 0.0, 1.0).astype(np.float32)
    k_exp = parts["expression"].shape[0]
    model = FaceModel(
        model_id=parts["model_id"],
        provenance=(
            f"Basel Face Model 2009 (University of Basel, licence-restricted; user-supplied) from "
            f"{parts['provenance']}; triangles {'flipped to' if flipped else 'kept'} counter-clockwise; origin moved "
            f"to the estimated head centre (translation {', '.join(f'{-c:.2f}' for c in centre)} mm); "
            "UV: cylindrical unwrap; regions and symmetric pairs derived from the mean shape"
        ),
        mean_shape=mean.astype(np.float32),
        identity_basis=parts["identity"],
        expression_basis=parts["expression"],
        expression_names=[f"exp_{i:03d}" for i in range(k_exp)],
        expression_kind="pca",
        triangles=triangles,
        uv=cylindrical_uv(mean),
        triangle_uv=triangles.copy(),
        landmarks68=landmarks.astype(np.int32),
        regions=regions,
        symmetric_pairs=symmetric_pairs(mean, tolerance_mm=tolerance),
        albedo_mean=albedo_mean,
        albedo_basis=parts["albedo_basis"],
        albedo_kind="pca",
        attributes={
            "source_files": ", ".join(parts["files"]),
            "source_units": parts["units"],
            "translation_mm": " ".join(f"{-c:.6f}" for c in centre),
            "winding_flipped": str(int(flipped)),
        },
    )
    model.validate()
    return model


__all__ = ["import_bfm"]
