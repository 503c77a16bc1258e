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

Optionally, with either route, an AlbedoMM file (Smith et al., "A Morphable Face Albedo Model",
CVPR 2020; ``albedoModel2020_*_albedoPart.h5`` or a combined ``albedoModel2020_*.h5``): a
Statismo HDF5 file whose ``diffuseAlbedo`` and ``specularAlbedo`` groups each hold
``model/mean`` (3N,), ``model/pcaBasis`` (3N, K) with orthonormal columns (Statismo 0.9) and
``model/pcaVariance`` (K,) variances, colours in linear sRGB [0, 1]. Its diffuse space replaces
BFM's texture model and its specular space becomes the model's measured specular space.

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
#: Appended to the model id when AlbedoMM replaces BFM's colour model (other coefficients).
ALBEDOMM_ID_SUFFIX = "-albedomm"
#: The two Statismo models of an AlbedoMM file used here, and the datasets read from each.
ALBEDOMM_PARTS = ("diffuseAlbedo", "specularAlbedo")
STATISMO_KEYS = ("model/mean", "model/pcaBasis", "model/pcaVariance")

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


def _statismo_version(f: h5py.File, part: str) -> tuple[int, int]:
    """(major, minor) of one Statismo model; a model without version datasets is 0.8, as in
    the Statismo/scalismo readers."""
    def number(key: str, default: int) -> int:
        item = f.get(f"{part}/version/{key}")
        if not isinstance(item, h5py.Dataset):
            return default
        return int(np.asarray(item[()]).reshape(-1)[0])

    return number("majorVersion", 0), number("minorVersion", 8)


def _read_albedomm(path: Path) -> dict[str, dict]:
    """An AlbedoMM (Statismo) file -> {part: {"mean", "pcaBasis", "pcaVariance" (as stored),
    "version" (major, minor)}} for ``diffuseAlbedo`` and ``specularAlbedo``."""
    name = path.name
    out: dict[str, dict] = {}
    try:
        with h5py.File(path, "r") as f:
            missing = [part for part in ALBEDOMM_PARTS if not isinstance(f.get(part), h5py.Group)]
            if missing:
                groups = ", ".join(sorted(f.keys())[:8]) or "none"
                hint = (" (this looks like a Basel Face Model 2017 file, which is not imported; pass "
                        "BFM 2009 files plus AlbedoMM's albedoModel2020_*_albedoPart.h5)"
                        if "shape" in f and "color" in f else "")
                raise FaceModelError(
                    f"{name} is not an AlbedoMM file: no {' or '.join(missing)} group (top-level groups: {groups})"
                    f"{hint}"
                )
            for part in ALBEDOMM_PARTS:
                arrays = {}
                for key in STATISMO_KEYS:
                    item = f.get(f"{part}/{key}")
                    if not isinstance(item, h5py.Dataset) or item.dtype.kind not in "iuf":
                        raise FaceModelError(f"{name}: {part}/{key} is missing or not numeric")
                    arrays[key.split("/")[1]] = np.asarray(item[()])  # float32 in the released files
                arrays["version"] = _statismo_version(f, part)
                out[part] = arrays
    except FaceModelError:
        raise
    except Exception as exc:  # noqa: BLE001 - h5py raises many types for foreign files
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise FaceModelError(f"cannot read {name} as an AlbedoMM (Statismo HDF5) file: {reason}") from exc
    return out


def _statismo_space(name: str, part: str, data: dict) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Checked (mean (3N,), basis (3N, K) as stored, per-column scale (K,)) of one part: the
    basis times the scale is the orthonormal basis times the standard deviations."""
    label = f"{name}: {part}"
    mean = np.asarray(data["mean"], dtype=np.float64)
    if mean.size == 0 or mean.size % 3 or sum(s > 1 for s in mean.shape) > 1:
        raise FaceModelError(f"{label}/model/mean has shape {mean.shape}, expected (3N,)")
    mean = mean.reshape(-1)
    basis, variance = data["pcaBasis"], np.asarray(data["pcaVariance"], dtype=np.float64).reshape(-1)
    if basis.ndim != 2 or basis.shape[0] != mean.size:
        raise FaceModelError(f"{label}/model/pcaBasis has shape {basis.shape}, expected ({mean.size}, K)")
    if variance.size != basis.shape[1]:
        raise FaceModelError(
            f"{label}/model/pcaVariance has {variance.size} values but pcaBasis has {basis.shape[1]} columns"
        )
    for key, arr in (("mean", mean), ("pcaBasis", basis), ("pcaVariance", variance)):
        if not np.all(np.isfinite(arr)):
            raise FaceModelError(f"{label}/model/{key} contains NaN or infinite values")
    if variance.size and variance.min() < 0:
        raise FaceModelError(f"{label}/model/pcaVariance has negative variances")
    if mean.max() > 2.0:
        raise FaceModelError(
            f"{label}/model/mean reaches {mean.max():.3g}: AlbedoMM colours are linear RGB in [0, 1]"
        )
    scale = np.sqrt(variance)
    major, minor = data["version"]
    if (major, minor) == (0, 8):
        # Statismo 0.8 stored U * sqrt(variance): normalise the columns back to U first.
        norms = np.sqrt(np.einsum("ij,ij->j", basis, basis, dtype=np.float64))
        scale = scale / np.where(norms > 0, norms, 1.0)
    elif not (major == 1 or (major, minor) == (0, 9)):
        raise FaceModelError(f"{label} is Statismo version {major}.{minor}; 0.8, 0.9 and 1.x are read")
    return mean, basis, scale


def _albedomm(path: Path, content: dict, n_albedo, out_full: np.ndarray | None, n_full: int | None,
              n_out: int) -> dict:
    """AlbedoMM's diffuse and specular spaces on the imported vertices.

    ``out_full`` gives the full-model index of each imported vertex (None when the source
    does not say, as for ``BFM_model_front.mat``); ``n_full`` is the full model's vertex count.
    """
    name = path.name
    spaces = {part: _statismo_space(name, part, content[part]) for part in ALBEDOMM_PARTS}
    n_file = spaces["diffuseAlbedo"][0].size // 3
    n_spec = spaces["specularAlbedo"][0].size // 3
    if n_spec != n_file:
        raise FaceModelError(f"{name}: diffuseAlbedo has {n_file} vertices but specularAlbedo has {n_spec}")
    if out_full is not None and n_full is not None and n_file == n_full:
        take, where = out_full, f"on the full {n_full}-vertex BFM, the {n_out} imported vertices taken"
    elif n_file == n_out:
        take, where = np.arange(n_out), f"on the {n_out} imported vertices"
    else:
        full = f" (of the {n_full}-vertex full model)" if n_full is not None else ""
        hint = "" if out_full is not None else (
            "; BFM_model_front.mat does not say which full-model vertices it keeps, so for an AlbedoMM on the "
            "full topology import 01_MorphableModel.mat with its index files instead")
        raise FaceModelError(
            f"{name} has {n_file} vertices but the imported BFM has {n_out}{full}: AlbedoMM must be on the same "
            f"topology (its released files are on the BFM 2017 topologies, not BFM 2009's){hint}"
        )
    rows = (3 * take[:, None] + np.arange(3)).ravel()
    out = {}
    for part, key in (("diffuseAlbedo", "albedo"), ("specularAlbedo", "specular")):
        mean, basis, scale = spaces[part]
        k = _count(n_albedo, basis.shape[1], f"{part}", name)
        out[f"{key}_mean"] = mean[rows].reshape(-1, 3)
        out[f"{key}_basis"] = _basis(basis[rows], k, scale[None, :k])
        out[f"{key}_modes"] = (k, basis.shape[1])
    versions = sorted({".".join(map(str, content[p]["version"])) for p in ALBEDOMM_PARTS})
    out["provenance"] = (
        f"albedo from {name} (AlbedoMM, Smith et al. CVPR 2020; Statismo {'/'.join(versions)}; {where}): "
        f"diffuseAlbedo as the albedo space ({out['albedo_modes'][0]} of {out['albedo_modes'][1]} modes), "
        f"specularAlbedo as the measured specular space ({out['specular_modes'][0]} of "
        f"{out['specular_modes'][1]} modes), bases x sqrt(pcaVariance), linear sRGB [0, 1] kept; "
        "BFM's own colour model not used"
    )
    return out


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
    return np.ascontiguousarray(cols.T.reshape(keep, columns.shape[0] // 3, 3), dtype=np.float32)


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
    if suffix in (".h5", ".hdf5"):
        return "albedomm", _read_albedomm(path)
    if suffix == ".bin":
        return "exp_pca", _read_exp_pca(path)
    if suffix == ".anl" or (suffix == ".txt" and ("landmark" in lower or "keypoint" in lower)):
        return "landmarks", _read_numbers(path)
    if suffix == ".txt" and "std" in lower:
        return "exp_std", _read_numbers(path)
    raise FaceModelError(
        f"{path.name}: unsupported BFM file (expected .mat files, Exp_Pca.bin, std_exp.txt, a landmark "
        "file *.anl / *landmarks*.txt or an AlbedoMM .h5)"
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
        extra = sorted(p.name for k, (p, _) in sources.items() if k not in ("front", "albedomm"))
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
        "full_vertices": None,  # the file does not say which full-model vertices it keeps
        "n_full": None,
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
        "full_vertices": kept,
        "n_full": n_full,
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
            with those names (``BFM_model_front.mat`` alone when present). With either route,
            an AlbedoMM ``.h5`` file (given explicitly, never picked from a folder) supplies the
            albedo space (its diffuse part) and a measured specular space (its specular part);
            it must cover the full model's or the imported model's vertices.
        n_identity / n_expression / n_albedo: modes to keep (default: all in the files). With
            AlbedoMM, n_albedo applies to its diffuse and its specular space alike.

    Raises:
        FaceModelError: with a one-line reason naming the file for missing, unreadable or
            inconsistent sources.
    """
    sources = _collect(paths)
    # With AlbedoMM, BFM's own colour model is not used: keep none of its modes.
    n_bfm_albedo = 0 if "albedomm" in sources else n_albedo
    if "front" in sources:
        path, data = sources["front"]
        parts = _front_model(path, data, n_identity, n_expression, n_bfm_albedo)
    else:
        parts = _full_model(sources, n_identity, n_expression, n_bfm_albedo)
    specular = None
    if "albedomm" in sources:
        alb_path, alb_content = sources["albedomm"]
        specular = _albedomm(alb_path, alb_content, n_albedo, parts["full_vertices"], parts["n_full"],
                             parts["mean"].shape[0])
        parts["albedo_mean"], parts["albedo_basis"] = specular["albedo_mean"], specular["albedo_basis"]
        parts["model_id"] += ALBEDOMM_ID_SUFFIX
        parts["provenance"] += f"; {specular['provenance']}"
        parts["files"] = parts["files"] + [alb_path.name]

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
        specular_mean=None if specular is None else np.clip(specular["specular_mean"], 0.0, 1.0).astype(np.float32),
        specular_basis=None if specular is None else specular["specular_basis"],
        specular_kind="none" if specular is None else "measured",
        attributes={
            "source_files": ", ".join(parts["files"]),
            "source_units": parts["units"],
            "translation_mm": " ".join(f"{-c:.6f}" for c in centre),
            "winding_flipped": str(int(flipped)),
            **({} if specular is None else {"albedo_source": "AlbedoMM"}),
        },
    )
    model.validate()
    return model


__all__ = ["import_bfm"]
