"""Tiny synthetic Basel Face Model 2009 files with the real variable names, dtypes and layouts.

The "head" is an ellipsoid (mm, +x subject's left, +y up, +z out of the face) carrying a
symmetric iBUG-68 landmark template and a nose bump, triangulated as a convex hull. From it
:func:`write_bfm_sources` writes, into a folder:

* ``01_MorphableModel.mat`` (micrometres, shapeMU (3N, 1), shapePC (3N, K) orthonormal,
  shapeEV (K, 1) standard deviations, texMU/texPC/texEV in 0..255, tl (F, 3) 1-based and
  clockwise seen from outside as in the real BFM, segbin);
* ``Exp_Pca.bin`` (int32 K, float32 mean 3N_exp, float32 K x 3N_exp row-major), defined on
  a subset of the vertices listed by ``BFM_exp_idx.mat`` (trimIndex, 1-based);
* ``std_exp.txt``, ``BFM_front_idx.mat`` (idx, 1-based into the trimmed set),
  ``facemodel_info.mat`` (keypoints, tri, frontmask2_idx... on the front crop) and
  ``Landmarks68_BFM.anl`` (1-based into the full set);
* ``BFM_model_front.mat`` built from those exactly as Deep3DFaceRecon's transferBFM09 does
  (decimetres = micrometres / 1e5, bases multiplied by the standard deviations).

:func:`write_albedomm` writes an AlbedoMM file in the Statismo HDF5 layout of the released
``albedoModel2020_*_albedoPart.h5`` (see docs/bfm.md): ``diffuseAlbedo`` and ``specularAlbedo``
models with ``model/mean`` (3N,), ``model/pcaBasis`` (3N, K), ``model/pcaVariance`` (K,) and a
representer, plus the placeholder ``shape`` model, catalog, version and landmark metadata.
"""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import scipy.io
from scipy.spatial import ConvexHull

AXES = np.array([78.0, 110.0, 95.0])  # ellipsoid semi-axes, mm
OFFSET_MM = np.array([1.5, 12.0, -20.0])  # where the BFM-like file puts the head centre
K_ID, K_EXP, K_TEX = 7, 6, 5


def landmark_template() -> np.ndarray:
    """(68, 2) x/y in mm of a mirror-symmetric iBUG-68 layout (eyes at y = 0)."""
    lm = np.zeros((68, 2))
    t = np.pi * np.arange(17) / 16
    lm[0:17] = np.stack([-66 * np.cos(t), 5 - 90 * np.sin(t)], axis=1)
    lm[17:22] = [(-52, 16), (-43, 21), (-33, 23), (-23, 22), (-14, 19)]
    lm[22:27] = lm[21:16:-1] * [-1, 1]
    lm[27:31] = [(0, 8), (0, -4), (0, -16), (0, -28)]
    lm[31:36] = [(-13, -36), (-7, -38), (0, -39), (7, -38), (13, -36)]
    lm[36:42] = [(-45, 0), (-38, 4), (-28, 4), (-20, 0), (-28, -3), (-38, -3)]
    lm[42:48] = lm[[39, 38, 37, 36, 41, 40]] * [-1, 1]
    lm[48:60] = [(-25, -60), (-16, -54), (-6, -51), (0, -52), (6, -51), (16, -54), (25, -60), (16, -67),
                 (6, -70), (0, -71), (-6, -70), (-16, -67)]
    lm[60:68] = [(-20, -60), (-7, -57), (0, -57), (7, -57), (20, -60), (7, -63), (0, -63), (-7, -63)]
    return lm


def _on_ellipsoid(xy: np.ndarray) -> np.ndarray:
    a, b, c = AXES
    z = c * np.sqrt(1.0 - (xy[:, 0] / a) ** 2 - (xy[:, 1] / b) ** 2)
    return np.column_stack([xy, z])


def synthetic_head() -> dict:
    """vertices (N, 3) mm centred on the head, triangles (F, 3) 0-based counter-clockwise
    seen from outside, landmarks (68,) vertex indices; vertex order scrambled."""
    a, b, c = AXES
    lm_xy = landmark_template()
    gx, gy = np.meshgrid(np.arange(-65.0, 66.0, 10.0), np.arange(-95.0, 46.0, 10.0))
    patch = np.column_stack([gx.ravel(), gy.ravel()])
    patch = patch[((patch / AXES[:2]) ** 2).sum(1) < 0.95]
    near = np.linalg.norm(patch[:, None] - lm_xy[None], axis=-1).min(axis=1) < 4.0
    patch = patch[~near]
    phi = np.radians(np.linspace(-80, 80, 12))
    theta = 2 * np.pi * np.arange(20) / 20
    pp, tt = np.meshgrid(phi, theta, indexing="ij")
    rings = np.column_stack([(a * np.cos(pp) * np.sin(tt)).ravel(), (b * np.sin(pp)).ravel(),
                             (c * np.cos(pp) * np.cos(tt)).ravel()])
    in_patch = (rings[:, 2] > 0) & (np.abs(rings[:, 0]) < 72) & (rings[:, 1] > -102) & (rings[:, 1] < 52)
    points = np.concatenate([_on_ellipsoid(lm_xy), _on_ellipsoid(patch), rings[~in_patch], [[0, b, 0], [0, -b, 0]]])
    hull = ConvexHull(points)
    tri = hull.simplices.copy()
    normal = np.cross(points[tri[:, 1]] - points[tri[:, 0]], points[tri[:, 2]] - points[tri[:, 0]])
    outward = (normal * hull.equations[:, :3]).sum(1) > 0
    tri[~outward] = tri[~outward][:, ::-1]
    assert len(np.unique(tri)) == len(points), "every point must be a hull vertex"
    # nose bump on the face
    x, y = points[:, 0], points[:, 1]
    front = points[:, 2] > 0
    points[front, 2] += 18.0 * np.exp(-(x[front] ** 2 / (2 * 9.0**2) + (y[front] + 20) ** 2 / (2 * 14.0**2)))
    # scramble the vertex order so landmark indices are not trivially 0..67
    order = np.random.default_rng(7).permutation(len(points))
    new_of_old = np.empty_like(order)
    new_of_old[order] = np.arange(len(order))
    return {"vertices": points[order], "triangles": new_of_old[tri], "landmarks": new_of_old[np.arange(68)]}


def _orthonormal(rng: np.random.Generator, rows: int, cols: int) -> np.ndarray:
    q, _ = np.linalg.qr(rng.standard_normal((rows, cols)))
    return q.astype(np.float32)


def write_mat73(path: Path, arrays: dict) -> Path:
    """A MATLAB v7.3 file: HDF5 with a 512-byte MATLAB header, arrays stored transposed."""
    classes = {"f": "double", "i": "int32", "u": "uint8"}
    with h5py.File(path, "w", userblock_size=512) as f:
        for key, value in arrays.items():
            value = np.asarray(value)
            if value.ndim == 1:
                value = value[:, None]
            ds = f.create_dataset(key, data=value.T)
            kind = "single" if value.dtype == np.float32 else classes.get(value.dtype.kind, "double")
            ds.attrs["MATLAB_class"] = np.bytes_(kind)
    header = b"MATLAB 7.3 MAT-file, Platform: GLNXA64, Created on: Mon Jan  1 00:00:00 2024 HDF5 schema 1.00 ."
    with open(path, "r+b") as fh:
        fh.write(header.ljust(116, b" ") + b"\x00" * 8 + b"\x00\x02" + b"IM")
    return path


def _save(path: Path, arrays: dict, v73: bool) -> Path:
    if v73:
        return write_mat73(path, arrays)
    scipy.io.savemat(path, arrays)
    return path


def write_exp_pca(path: Path, mean: np.ndarray, components: np.ndarray) -> Path:
    """Exp_Pca.bin: int32 K, float32 mean (3N), float32 components K x 3N row-major (little-endian)."""
    k = components.shape[0]
    with open(path, "wb") as fh:
        fh.write(np.array([k], dtype="<i4").tobytes())
        fh.write(np.asarray(mean, dtype="<f4").reshape(-1).tobytes())
        fh.write(np.asarray(components, dtype="<f4").reshape(k, -1).tobytes())
    return path


def write_bfm_sources(folder: Path, v73: bool = False) -> dict:
    """Write every synthetic BFM source file into ``folder``; returns paths and raw arrays."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    head = synthetic_head()
    verts, tri, lms = head["vertices"], head["triangles"], head["landmarks"]
    n = len(verts)
    rng = np.random.default_rng(2009)

    # ---- 01_MorphableModel.mat (micrometres, clockwise 1-based triangles)
    shape_mu = ((verts + OFFSET_MM) * 1000.0).reshape(-1, 1).astype(np.float32)
    shape_pc = _orthonormal(rng, 3 * n, K_ID)
    shape_ev = np.linspace(2.0e5, 0.5e5, K_ID).reshape(-1, 1).astype(np.float32)
    base_colour = np.array([185.0, 135.0, 115.0]) + rng.uniform(-20, 20, (n, 3))
    tex_mu = base_colour.reshape(-1, 1).astype(np.float32)
    tex_pc = _orthonormal(rng, 3 * n, K_TEX)
    tex_ev = np.linspace(900.0, 300.0, K_TEX).reshape(-1, 1).astype(np.float32)
    tl = (tri[:, ::-1] + 1).astype(np.float64)
    full = {"shapeMU": shape_mu, "shapePC": shape_pc, "shapeEV": shape_ev, "texMU": tex_mu, "texPC": tex_pc,
            "texEV": tex_ev, "tl": tl, "segbin": (rng.uniform(size=(n, 4)) > 0.5).astype(np.float64)}

    # ---- expression model on a trimmed subset (drop the lowest non-landmark vertices)
    droppable = np.setdiff1d(np.argsort(verts[:, 1])[:12], lms)
    trim = np.setdiff1d(np.arange(n), droppable)  # 0-based full indices, ascending
    n_exp = len(trim)
    exp_mean = rng.normal(0, 500.0, (n_exp, 3)).astype(np.float32)
    exp_pc = _orthonormal(rng, 3 * n_exp, K_EXP).T.copy()  # (K, 3N_exp) rows
    exp_std = np.linspace(6.0e4, 1.0e4, K_EXP)

    # ---- front crop (positions in the trimmed set) and Deep3D-style info on it
    front_in_trim = np.flatnonzero(verts[trim, 2] > 20.0)
    front_full = trim[front_in_trim]
    n_front = len(front_full)
    full_to_front = np.full(n, -1)
    full_to_front[front_full] = np.arange(n_front)
    keep_tri = np.all(full_to_front[tri] >= 0, axis=1)
    front_tri_cw = full_to_front[tri[keep_tri]][:, ::-1]  # BFM order: clockwise
    keypoints = full_to_front[lms]
    assert (keypoints >= 0).all()
    mask2 = np.flatnonzero(np.abs(verts[front_full, 0]) < 60)
    info = {"keypoints": (keypoints + 1).reshape(1, 68).astype(np.float64),
            "tri": (front_tri_cw + 1).astype(np.float64),
            "frontmask2_idx": (mask2 + 1).reshape(-1, 1).astype(np.float64),
            "skinmask": np.ones((1, n_front), dtype=np.float64),
            "point_buf": np.ones((n_front, 8), dtype=np.float64),
            "tri_mask2": (front_tri_cw[:10] + 1).astype(np.float64)}

    # ---- BFM_model_front.mat exactly as Deep3DFaceRecon builds it
    rows_front = (3 * front_full[:, None] + np.arange(3)).ravel()
    rows_exp = (3 * front_in_trim[:, None] + np.arange(3)).ravel()
    front = {
        "meanshape": (shape_mu[rows_front].reshape(1, -1) / 1e5).astype(np.float32),
        "idBase": (shape_pc[rows_front] * shape_ev.reshape(1, -1) / 1e5).astype(np.float32),
        "exBase": (exp_pc.T[rows_exp] * exp_std.reshape(1, -1) / 1e5).astype(np.float32),
        "meantex": tex_mu[rows_front].reshape(1, -1),
        "texBase": (tex_pc[rows_front] * tex_ev.reshape(1, -1)).astype(np.float32),
        **info,
    }

    paths = {
        "full": _save(folder / "01_MorphableModel.mat", full, v73),
        "exp_pca": write_exp_pca(folder / "Exp_Pca.bin", exp_mean, exp_pc),
        "exp_idx": _save(folder / "BFM_exp_idx.mat", {"trimIndex": (trim + 1).reshape(-1, 1).astype(np.float64)}, v73),
        "front_idx": _save(folder / "BFM_front_idx.mat", {"idx": (front_in_trim + 1).reshape(-1, 1).astype(np.float64)},
                           v73),
        "info": _save(folder / "facemodel_info.mat", info, v73),
        "front": _save(folder / "BFM_model_front.mat", front, v73),
    }
    np.savetxt(folder / "std_exp.txt", exp_std, fmt="%.8e")
    paths["exp_std"] = folder / "std_exp.txt"
    anl = folder / "Landmarks68_BFM.anl"
    anl.write_text("%68 Landmark points for the synthetic BFM\n" + "\n".join(str(i + 1) for i in lms) + "\n")
    paths["landmarks"] = anl
    return {"paths": paths, "full": full, "front": front, "exp_mean": exp_mean, "exp_pc": exp_pc,
            "exp_std": exp_std, "trim": trim, "front_in_trim": front_in_trim, "front_full": front_full,
            "head": head}


K_DIFFUSE, K_SPECULAR = 8, 7  # more than K_TEX; NextFace reads 145 of each from the released face12 file


def albedomm_mean(n: int) -> np.ndarray:
    """(n, 3) linear diffuse colours whose red channel encodes the vertex index:
    red = 0.1 + 0.8 * v / (n - 1) (see :func:`albedomm_index`)."""
    v = np.arange(n, dtype=np.float64)
    return np.column_stack([0.1 + 0.8 * v / max(n - 1, 1), 0.35 + 0.1 * np.sin(v), 0.25 + 0.05 * np.cos(v)])


def albedomm_index(red: np.ndarray, n: int) -> np.ndarray:
    """The vertex index encoded by :func:`albedomm_mean` in a red channel."""
    return np.round((np.asarray(red, dtype=np.float64) - 0.1) / 0.8 * max(n - 1, 1)).astype(np.int64)


def _statismo_model(group: h5py.Group, mean: np.ndarray, basis: np.ndarray, variance: np.ndarray,
                    version: tuple[int, int] | None, representer: str, points: np.ndarray,
                    cells: np.ndarray) -> None:
    """One Statismo model as scalismo-faces writes it (float32 arrays, (3N, K) basis)."""
    if version is not None:
        group.create_dataset("version/majorVersion", data=np.int32(version[0]))
        group.create_dataset("version/minorVersion", data=np.int32(version[1]))
    model = group.create_group("model")
    model.create_dataset("mean", data=np.asarray(mean, np.float32).reshape(-1))
    model.create_dataset("noiseVariance", data=np.zeros(1, np.float32))
    model.create_dataset("pcaBasis", data=np.asarray(basis, np.float32))
    model.create_dataset("pcaVariance", data=np.asarray(variance, np.float32))
    group.create_dataset("modelinfo/build-time", data="Mon Jan 01 00:00:00 UTC 2024")
    group.create_dataset("modelinfo/scores", data=np.zeros((1, 1), np.float32))
    rep = group.create_group("representer")
    rep.attrs["name"] = representer
    rep.attrs["datasetType"] = "POLYGON_MESH"
    if "Albedo" in representer:
        rep.create_dataset("colorspace", data=np.bytes_(b"RGB\x00"))
    rep.create_dataset("points", data=np.asarray(points, np.float32).T)
    rep.create_dataset("cells", data=np.asarray(cells, np.int32).T)


def write_albedomm(path: Path, n: int, k_diffuse: int = K_DIFFUSE, k_specular: int = K_SPECULAR,
                   version: tuple[int, int] | None = (0, 9), seed: int = 2020) -> dict:
    """An AlbedoMM ``*_albedoPart.h5`` on ``n`` vertices; returns the raw arrays.

    The diffuse mean encodes the vertex index (:func:`albedomm_mean`); the bases have
    orthonormal columns and the variances are separate (Statismo 0.9). ``version=(0, 8)``
    stores the old Statismo layout instead (basis = U * sqrt(variance)); ``None`` stores no
    version, which readers take for 0.8.
    """
    rng = np.random.default_rng(seed)
    diffuse_mean = albedomm_mean(n)
    diffuse_u = _orthonormal(rng, 3 * n, k_diffuse)
    diffuse_var = np.linspace(4.0e-2, 5.0e-3, k_diffuse)
    specular_mean = 0.2 + 0.05 * rng.uniform(-1, 1, (n, 3))
    specular_u = _orthonormal(rng, 3 * n, k_specular)
    specular_var = np.linspace(3.0e-3, 2.0e-4, k_specular)
    old = version is None or tuple(version) == (0, 8)
    points = rng.normal(0, 50.0, (n, 3))  # the BFM 2017 reference mesh in the real files (mm)
    cells = np.arange(3 * (n // 3)).reshape(-1, 3)
    with h5py.File(path, "w") as f:
        f.create_dataset("version/majorVersion", data=np.int32(0))
        f.create_dataset("version/minorVersion", data=np.int32(9))
        for entry, kind, where in (("MorphableModel", "CUSTOM_MODEL", "/"),
                                   ("MorphableModel.shape", "POLYGON_MESH_MODEL", "/shape"),
                                   ("MorphableModel.diffuseAlbedo", "POLYGON_MESH_DATA_MODEL", "/diffuseAlbedo"),
                                   ("MorphableModel.specularAlbedo", "POLYGON_MESH_DATA_MODEL", "/specularAlbedo")):
            f.create_dataset(f"catalog/{entry}/modelType", data=kind)
            f.create_dataset(f"catalog/{entry}/modelPath", data=where)
        # the released albedo parts carry a random placeholder shape model
        _statismo_model(f.create_group("shape"), rng.normal(size=75), _orthonormal(rng, 75, 1), [0.05], (0, 9),
                        "gravis::MeshShapeRepresenter", points, cells)
        for part, mean, u, var in (("diffuseAlbedo", diffuse_mean, diffuse_u, diffuse_var),
                                   ("specularAlbedo", specular_mean, specular_u, specular_var)):
            stored = u * np.sqrt(var)[None, :] if old else u
            _statismo_model(f.create_group(part), mean, stored, var, version,
                            f"gravis::Mesh{part[0].upper()}{part[1:]}Representer", points, cells)
        f.create_dataset("metadata/landmarks/json", data="[]")
    return {"path": Path(path), "n": n, "diffuse_mean": diffuse_mean.astype(np.float32),
            "diffuse_u": diffuse_u, "diffuse_var": diffuse_var.astype(np.float32),
            "specular_mean": specular_mean.astype(np.float32), "specular_u": specular_u,
            "specular_var": specular_var.astype(np.float32)}
