"""Import the ICT-FaceKit Light model (MIT licence) into the facerecon format.

Accepted sources:
* an ICT-FaceKit checkout (``FaceXModel/generic_neutral_mesh.obj``, ``identityNNN.obj``,
  one OBJ per expression, ``vertex_indices.json``), or the ``FaceXModel`` folder itself;
* ``ict_face_light.npz``: the same arrays packed into one NumPy archive (keys
  ``neutral``, ``identity_modes``, ``expression_modes``, ``expression_names``,
  ``polygons``, ``polygon_uv``, ``uv``, ``landmarks68``, ``face_area``, ``head_neck``).

ICT-FaceKit stores centimetres, +y up and +z out of the face; identity modes are
offsets already scaled by their standard deviation, expressions are ARKit-style
blendshapes. The importer keeps the face area (vertices [0, 9409)) and optionally the
head and neck ([9409, 11248)), triangulates the quads and converts to millimetres.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from facerecon.facemodel.annotate import (
    default_specular_space,
    derive_regions,
    laplacian_albedo_space,
    symmetric_pairs,
)
from facerecon.facemodel.model import FaceModel, FaceModelError
from facerecon.facemodel.objparse import read_obj, read_obj_vertices, triangulate

CM_TO_MM = 10.0
FACE_AREA = (0, 9409)
HEAD_NECK = (9409, 11248)
MODEL_ID = "ict-face-light"


def _load_npz(path: Path) -> dict:
    try:
        data = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise FaceModelError(f"cannot read {path}: {exc}") from exc
    needed = {"neutral", "identity_modes", "expression_modes", "expression_names", "polygons", "polygon_uv",
              "uv", "landmarks68"}
    missing = sorted(needed - set(data.files))
    if missing:
        raise FaceModelError(f"{path} is not an ICT-FaceKit archive (missing {', '.join(missing)})")
    out = {key: data[key] for key in data.files}
    out["expression_names"] = [str(s) for s in out["expression_names"]]
    out["source"] = f"packed archive {path.name}"
    return out


def _find_facex_dir(path: Path) -> Path:
    for candidate in (path, path / "FaceXModel"):
        if (candidate / "generic_neutral_mesh.obj").is_file() and (candidate / "vertex_indices.json").is_file():
            return candidate
    raise FaceModelError(
        f"{path} is not an ICT-FaceKit checkout: expected FaceXModel/generic_neutral_mesh.obj "
        "and FaceXModel/vertex_indices.json (or pass ict_face_light.npz)"
    )


def _load_checkout(path: Path, n_identity: int, keep: int) -> dict:
    facex = _find_facex_dir(path)
    config = json.loads((facex / "vertex_indices.json").read_text())
    landmarks = config.get("idx_to_landmark_verts") or config.get("landmarks")
    if landmarks is None or len(landmarks) != 68:
        raise FaceModelError(f"{facex / 'vertex_indices.json'} has no 68-point landmark list")
    mesh = read_obj(facex / "generic_neutral_mesh.obj")
    if mesh.polygon_uv is None:
        raise FaceModelError("generic_neutral_mesh.obj has no texture coordinates")
    neutral = mesh.vertices
    identity_files = sorted(facex.glob("identity[0-9][0-9][0-9].obj"))[:n_identity]
    if not identity_files:
        raise FaceModelError(f"no identityNNN.obj files in {facex}")
    names = list(config.get("expressions", []))
    missing = [n for n in names if not (facex / f"{n}.obj").is_file()]
    if missing:
        raise FaceModelError(f"expression files missing in {facex}: {', '.join(missing[:5])}")

    def offsets(files: list[Path]) -> np.ndarray:
        modes = np.empty((len(files), keep, 3), dtype=np.float32)
        for i, file in enumerate(files):
            verts = read_obj_vertices(file)
            if verts.shape != neutral.shape:
                raise FaceModelError(f"{file.name} has {len(verts)} vertices, expected {len(neutral)}")
            modes[i] = verts[:keep] - neutral[:keep]
        return modes

    return {
        "neutral": neutral[:keep],
        "identity_modes": offsets(identity_files),
        "expression_modes": offsets([facex / f"{n}.obj" for n in names]),
        "expression_names": names,
        "polygons": mesh.polygons,
        "polygon_uv": mesh.polygon_uv,
        "uv": mesh.uv,
        "landmarks68": np.asarray(landmarks, dtype=np.int64),
        "source": f"ICT-FaceKit checkout {facex}",
    }


def import_ict(
    path: str | Path,
    include_head: bool = False,
    n_identity: int = 100,
    n_albedo_modes: int = 27,
) -> FaceModel:
    """Build a :class:`FaceModel` from an ICT-FaceKit checkout or packed archive.

    Args:
        path: checkout folder, its ``FaceXModel`` folder, or ``ict_face_light.npz``.
        include_head: keep head and neck vertices (the face area alone otherwise).
        n_identity: number of identity modes to keep (at most 100).
        n_albedo_modes: Laplacian albedo modes per colour channel (ICT has no albedo).
    """
    path = Path(path).expanduser()
    keep = HEAD_NECK[1] if include_head else FACE_AREA[1]
    if path.is_file() and path.suffix == ".npz":
        data = _load_npz(path)
    elif path.is_dir():
        data = _load_checkout(path, n_identity, keep)
    elif not path.exists():
        raise FaceModelError(f"{path} does not exist")
    else:
        raise FaceModelError(f"{path} is neither an ICT-FaceKit checkout folder nor an .npz archive")

    neutral = data["neutral"]
    if neutral.shape[0] < keep:
        raise FaceModelError(f"the ICT source has {neutral.shape[0]} vertices, fewer than the {keep} needed")
    polygons = np.asarray(data["polygons"], dtype=np.int64)
    polygon_uv = np.asarray(data["polygon_uv"], dtype=np.int64)
    inside = np.all((polygons < keep), axis=1)  # padding (-1) counts as inside
    triangles, source = triangulate(polygons[inside])
    triangle_uv, _ = triangulate(polygon_uv[inside])

    mean = neutral[:keep].astype(np.float64) * CM_TO_MM
    identity = data["identity_modes"][:n_identity, :keep].astype(np.float32) * CM_TO_MM
    expression = data["expression_modes"][:, :keep].astype(np.float32) * CM_TO_MM
    landmarks = np.asarray(data["landmarks68"], dtype=np.int64)
    if landmarks.max() >= keep:
        raise FaceModelError("ICT landmark indices fall outside the kept vertices")

    # Triangles must face outwards (+z at the nose tip): flip the winding if they do not.
    nose = int(landmarks[30])
    touching = np.flatnonzero((triangles == nose).any(axis=1))
    v0, v1, v2 = (mean[triangles[touching, k]] for k in range(3))
    if np.cross(v1 - v0, v2 - v0)[:, 2].sum() < 0:
        triangles = triangles[:, ::-1].copy()
        triangle_uv = triangle_uv[:, ::-1].copy()

    # Recentre so the origin sits between the ears at eye height; keeps rotations
    # about the head centre well conditioned.
    face_vertices = np.arange(FACE_AREA[0], FACE_AREA[1])
    regions = derive_regions(mean, triangles, landmarks, face_vertices=face_vertices)
    albedo_mean, albedo_basis = laplacian_albedo_space(mean, triangles, regions, n_modes=n_albedo_modes)
    specular_mean, specular_basis = default_specular_space(mean, triangles, regions, landmarks)
    uv = np.asarray(data["uv"], dtype=np.float32)
    model = FaceModel(
        model_id=MODEL_ID + ("-head" if include_head else ""),
        provenance=(
            f"ICT-FaceKit Light (USC ICT, MIT licence) from {data['source']}; vertices [0, {keep}), "
            f"quads triangulated, cm -> mm; albedo: synthetic Laplacian space ({n_albedo_modes} modes per channel); "
            f"specular: default grey space ({len(specular_basis)} modes)"
        ),
        mean_shape=mean.astype(np.float32),
        identity_basis=identity,
        expression_basis=expression,
        expression_names=list(data["expression_names"]),
        expression_kind="blendshape",
        triangles=triangles.astype(np.int32),
        uv=uv,
        triangle_uv=triangle_uv.astype(np.int32),
        landmarks68=landmarks.astype(np.int32),
        regions=regions,
        symmetric_pairs=symmetric_pairs(mean),
        albedo_mean=albedo_mean,
        albedo_basis=albedo_basis,
        albedo_kind="laplacian",
        specular_mean=specular_mean,
        specular_basis=specular_basis,
        specular_kind="default",
        attributes={"source_units": "cm", "triangles_from_polygons": str(int(inside.sum()))},
    )
    model.validate()
    return model
