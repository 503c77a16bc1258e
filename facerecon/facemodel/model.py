"""The face-model container and its HDF5 file format (see docs/face-model-format.md).

All geometry is in millimetres. Shapes use N vertices, F triangles, T texture
coordinates. Basis arrays are stored mode-major, ``(K, N, 3)``, and are scaled so
that coefficients of a ``pca`` space have a standard-normal prior; a ``blendshape``
space takes weights in [0, 1].
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import h5py
import numpy as np

from facerecon.errors import InputError
from facerecon.facemodel.annotate import default_specular_space
from facerecon.facemodel.corrective_space import CorrectiveSpace
from facerecon.facemodel.detector_bias import DetectorBias
from facerecon.io.atomic import atomic_path

FORMAT_NAME = "facerecon-face-model"
FORMAT_VERSION = 1

#: Region names every converted model carries (vertex index lists).
REQUIRED_REGIONS = ("face", "photometric", "skin", "eyes", "inner_mouth")


class FaceModelError(InputError):
    """A face-model file or source cannot be read or is inconsistent."""


@dataclass
class FaceModel:
    """A linear 3D morphable face model with topology and annotations.

    Attributes (shapes):
        model_id: short identifier, e.g. ``"ict-face-light"``.
        provenance: free text saying where the data came from and how it was converted.
        mean_shape: (N, 3) float32, millimetres.
        identity_basis: (K_id, N, 3) float32, offsets per unit coefficient.
        expression_basis: (K_exp, N, 3) float32.
        expression_names: K_exp names (blendshape names, or ``exp_000``... for PCA).
        expression_kind: ``"blendshape"`` (weights in [0, 1]) or ``"pca"`` (N(0, 1) prior).
        triangles: (F, 3) int32, counter-clockwise seen from outside (+z faces the camera
            in the canonical frame).
        uv: (T, 2) float32 texture coordinates in [0, 1], origin bottom-left.
        triangle_uv: (F, 3) int32 index into ``uv`` for each triangle corner.
        landmarks68: (68,) int32 vertex index of each iBUG 68-point landmark.
        regions: name -> int32 vertex indices (at least :data:`REQUIRED_REGIONS`).
        symmetric_pairs: (P, 2) int32 (left, right) vertex pairs mirrored across x = 0.
        albedo_mean: (N, 3) float32 linear RGB reflectance in [0, 1], or None.
        albedo_basis: (K_alb, N, 3) float32, or None.
        albedo_kind: ``"pca"`` (measured PCA) or ``"laplacian"`` (smooth synthetic space).
        specular_mean: (N, 3) float32 linear specular albedo (paper 002's t_s), or None.
        specular_basis: (K_spec, N, 3) float32, or None.
        specular_kind: ``"none"``, ``"default"`` (the plausible grey space of
            :func:`facerecon.facemodel.annotate.default_specular_space`) or ``"measured"``
            (e.g. AlbedoMM's specular PCA). :meth:`specular_space` gives a model without one the
            default space.
        dense_triangle / dense_barycentric: (468,) int32 and (468, 3) float32, the surface
            point matching each mediapipe face-mesh landmark, or None before embedding.
        dense_offset: (468, 3) float32 mm or None (= zeros): where the landmark lies off that
            surface point, in its triangle's frame (see
            :func:`facerecon.facemodel.tensors.triangle_frames`): along the first edge, the
            in-plane perpendicular, and the outward normal. The detector's
            landmarks are 3D points that need not lie on the skin (eyelid points sit over the
            eye opening); the offset moves and turns with the triangle.
        detector_bias: the landmark detector's mean offsets by head pose, measured on
            renders of this model (:mod:`facerecon.facemodel.detector_bias`), or None.
        correctives: paper 004's learned corrective space (geometry and reflectance bases,
            :mod:`facerecon.facemodel.corrective_space`), or None (fits use free-form correctives).
    """

    model_id: str
    provenance: str
    mean_shape: np.ndarray
    identity_basis: np.ndarray
    expression_basis: np.ndarray
    expression_names: list[str]
    expression_kind: str
    triangles: np.ndarray
    uv: np.ndarray
    triangle_uv: np.ndarray
    landmarks68: np.ndarray
    regions: dict[str, np.ndarray]
    symmetric_pairs: np.ndarray
    albedo_mean: np.ndarray | None = None
    albedo_basis: np.ndarray | None = None
    albedo_kind: str = "none"
    specular_mean: np.ndarray | None = None
    specular_basis: np.ndarray | None = None
    specular_kind: str = "none"
    dense_triangle: np.ndarray | None = None
    dense_barycentric: np.ndarray | None = None
    dense_offset: np.ndarray | None = None
    detector_bias: DetectorBias | None = None
    correctives: CorrectiveSpace | None = None
    attributes: dict[str, str] = field(default_factory=dict)

    # ----------------------------------------------------------------- sizes
    @property
    def n_vertices(self) -> int:
        return int(self.mean_shape.shape[0])

    @property
    def n_triangles(self) -> int:
        return int(self.triangles.shape[0])

    @property
    def n_identity(self) -> int:
        return int(self.identity_basis.shape[0])

    @property
    def n_expression(self) -> int:
        return int(self.expression_basis.shape[0])

    @property
    def n_albedo(self) -> int:
        return 0 if self.albedo_basis is None else int(self.albedo_basis.shape[0])

    @property
    def has_albedo(self) -> bool:
        return self.albedo_mean is not None

    def specular_space(self) -> tuple[np.ndarray, np.ndarray, str]:
        """(mean (N, 3), basis (K, N, 3), kind): the stored specular space, or the default one
        (:func:`~facerecon.facemodel.annotate.default_specular_space`, kind ``"default"``)."""
        if self.specular_mean is not None:
            basis = self.specular_basis if self.specular_basis is not None else \
                np.zeros((0, self.n_vertices, 3), np.float32)
            return self.specular_mean, basis, self.specular_kind
        mean, basis = default_specular_space(self.mean_shape, self.triangles, self.regions, self.landmarks68)
        return mean, basis, "default"

    def summary(self) -> dict:
        """Plain-data description used by ``facerecon model info``."""
        return {
            "model_id": self.model_id,
            "vertices": self.n_vertices,
            "triangles": self.n_triangles,
            "identity_coefficients": self.n_identity,
            "expression_coefficients": self.n_expression,
            "expression_kind": self.expression_kind,
            "albedo": self.has_albedo,
            "albedo_coefficients": self.n_albedo,
            "albedo_kind": self.albedo_kind,
            "specular": self.specular_kind if self.specular_mean is not None else "default (computed when used)",
            "specular_coefficients": 0 if self.specular_basis is None else int(self.specular_basis.shape[0]),
            "units": "mm",
            "landmarks68": int(self.landmarks68.shape[0]),
            "dense_landmarks": 0 if self.dense_triangle is None else int(self.dense_triangle.shape[0]),
            "detector_bias": None if self.detector_bias is None else {
                "samples": self.detector_bias.n_samples, "detector": self.detector_bias.detector,
                "bandwidth_degrees": self.detector_bias.bandwidth_degrees},
            "correctives": None if self.correctives is None else {
                "geometry_modes": self.correctives.n_geometry, "reflectance_modes": self.correctives.n_reflectance,
                "photos": self.correctives.photos, "digest": self.correctives.digest(),
                "description": self.correctives.description},
            "regions": {k: int(v.shape[0]) for k, v in sorted(self.regions.items())},
            "symmetric_pairs": int(self.symmetric_pairs.shape[0]),
            "provenance": self.provenance,
        }

    # ------------------------------------------------------------ validation
    def validate(self) -> None:
        """Raise :class:`FaceModelError` if arrays disagree in shape or index range."""
        n = self.n_vertices
        problems = []
        if self.mean_shape.ndim != 2 or self.mean_shape.shape[1] != 3:
            problems.append(f"mean_shape must be (N, 3), got {self.mean_shape.shape}")
        for name in ("identity_basis", "expression_basis", "albedo_basis", "specular_basis"):
            arr = getattr(self, name)
            if arr is not None and (arr.ndim != 3 or arr.shape[1:] != (n, 3)):
                problems.append(f"{name} must be (K, {n}, 3), got {arr.shape}")
        if len(self.expression_names) != self.n_expression:
            problems.append("expression_names must have one name per expression mode")
        if self.expression_kind not in ("blendshape", "pca"):
            problems.append(f"expression_kind must be 'blendshape' or 'pca', got {self.expression_kind!r}")
        if self.albedo_mean is not None and self.albedo_mean.shape != (n, 3):
            problems.append(f"albedo_mean must be ({n}, 3), got {self.albedo_mean.shape}")
        if self.specular_mean is not None and self.specular_mean.shape != (n, 3):
            problems.append(f"specular_mean must be ({n}, 3), got {self.specular_mean.shape}")
        if self.specular_basis is not None and self.specular_mean is None:
            problems.append("specular_basis needs specular_mean")
        if self.specular_kind not in ("none", "default", "measured"):
            problems.append(f"specular_kind must be 'none', 'default' or 'measured', got {self.specular_kind!r}")
        tri = self.triangles
        if tri.ndim != 2 or tri.shape[1] != 3 or tri.min() < 0 or tri.max() >= n:
            problems.append("triangles must be (F, 3) with indices in [0, N)")
        if self.triangle_uv.shape != tri.shape or (
            self.triangle_uv.size and (self.triangle_uv.min() < 0 or self.triangle_uv.max() >= len(self.uv))
        ):
            problems.append("triangle_uv must match triangles and index into uv")
        if self.landmarks68.shape != (68,) or self.landmarks68.min() < 0 or self.landmarks68.max() >= n:
            problems.append("landmarks68 must be 68 vertex indices")
        for region in REQUIRED_REGIONS:
            if region not in self.regions:
                problems.append(f"region {region!r} is missing")
        for region, idx in self.regions.items():
            if idx.size and (idx.min() < 0 or idx.max() >= n):
                problems.append(f"region {region!r} has out-of-range vertex indices")
        if self.symmetric_pairs.size and (self.symmetric_pairs.min() < 0 or self.symmetric_pairs.max() >= n):
            problems.append("symmetric_pairs has out-of-range vertex indices")
        if self.dense_triangle is not None:
            if self.dense_barycentric is None or self.dense_barycentric.shape != (len(self.dense_triangle), 3):
                problems.append("dense_barycentric must be (L, 3) matching dense_triangle")
            elif self.dense_triangle.min() < 0 or self.dense_triangle.max() >= self.n_triangles:
                problems.append("dense_triangle has out-of-range triangle indices")
            if self.dense_offset is not None and self.dense_offset.shape != (len(self.dense_triangle), 3):
                problems.append("dense_offset must be (L, 3) matching dense_triangle")
        if self.detector_bias is not None:
            problems.extend(self.detector_bias.problems())
            dense = self.detector_bias.offsets_dense
            if dense is not None and (self.dense_triangle is None or dense.shape[1] != len(self.dense_triangle)):
                problems.append("detector_bias offsets_dense needs the dense embedding with as many points")
        if self.correctives is not None:
            problems.extend(self.correctives.problems(n))
            if self.albedo_mean is None:
                problems.append("correctives need the albedo space (their reflectance corrects it)")
        for name in ("mean_shape", "identity_basis", "expression_basis", "albedo_mean", "albedo_basis",
                     "specular_mean", "specular_basis"):
            arr = getattr(self, name)
            if arr is not None and not np.all(np.isfinite(arr)):
                problems.append(f"{name} contains NaN or infinite values")
        if problems:
            raise FaceModelError(f"face model {self.model_id!r} is inconsistent: " + "; ".join(problems))


def save_face_model(model: FaceModel, path: str | Path) -> Path:
    """Validate ``model`` and write it atomically to ``path`` (HDF5). Returns the path."""
    model.validate()
    path = Path(path)
    str_dtype = h5py.string_dtype("utf-8")
    with atomic_path(path) as tmp:
        with h5py.File(tmp, "w") as f:
            f.attrs["format"] = FORMAT_NAME
            f.attrs["format_version"] = FORMAT_VERSION
            f.attrs["model_id"] = model.model_id
            f.attrs["provenance"] = model.provenance
            f.attrs["units"] = "mm"
            f.attrs["expression_kind"] = model.expression_kind
            f.attrs["albedo_kind"] = model.albedo_kind
            for key, value in model.attributes.items():
                f.attrs[f"extra_{key}"] = value
            comp = {"compression": "gzip", "compression_opts": 4, "shuffle": True}
            shape = f.create_group("shape")
            shape.create_dataset("mean", data=model.mean_shape.astype(np.float32))
            shape.create_dataset("identity_basis", data=model.identity_basis.astype(np.float32), **comp)
            shape.create_dataset("expression_basis", data=model.expression_basis.astype(np.float32), **comp)
            shape.create_dataset("expression_names", data=np.array(model.expression_names, dtype=object), dtype=str_dtype)
            if model.albedo_mean is not None:
                alb = f.create_group("albedo")
                alb.create_dataset("mean", data=model.albedo_mean.astype(np.float32))
                if model.albedo_basis is not None:
                    alb.create_dataset("basis", data=model.albedo_basis.astype(np.float32), **comp)
            if model.specular_mean is not None:
                spec = f.create_group("specular")
                spec.attrs["kind"] = model.specular_kind
                spec.create_dataset("mean", data=model.specular_mean.astype(np.float32))
                if model.specular_basis is not None:
                    spec.create_dataset("basis", data=model.specular_basis.astype(np.float32), **comp)
            topo = f.create_group("topology")
            topo.create_dataset("triangles", data=model.triangles.astype(np.int32))
            topo.create_dataset("uv", data=model.uv.astype(np.float32))
            topo.create_dataset("triangle_uv", data=model.triangle_uv.astype(np.int32))
            lmk = f.create_group("landmarks")
            lmk.create_dataset("ibug68", data=model.landmarks68.astype(np.int32))
            if model.dense_triangle is not None:
                lmk.create_dataset("dense_triangle", data=model.dense_triangle.astype(np.int32))
                lmk.create_dataset("dense_barycentric", data=model.dense_barycentric.astype(np.float32))
                if model.dense_offset is not None:
                    lmk.create_dataset("dense_offset", data=model.dense_offset.astype(np.float32))
            if model.detector_bias is not None:
                bias = lmk.create_group("detector_bias")
                bias.attrs["bandwidth_degrees"] = float(model.detector_bias.bandwidth_degrees)
                bias.attrs["detector"] = model.detector_bias.detector
                bias.attrs["description"] = model.detector_bias.description
                bias.create_dataset("angles", data=model.detector_bias.angles.astype(np.float32))
                bias.create_dataset("offsets68", data=model.detector_bias.offsets68.astype(np.float32), **comp)
                if model.detector_bias.offsets_dense is not None:
                    bias.create_dataset("offsets_dense", data=model.detector_bias.offsets_dense.astype(np.float32),
                                        **comp)
            if model.correctives is not None:
                corr = f.create_group("correctives")
                corr.attrs["kind"] = "linear"
                corr.attrs["photos"] = int(model.correctives.photos)
                corr.attrs["description"] = model.correctives.description
                corr.create_dataset("geometry_basis", data=model.correctives.geometry.astype(np.float32), **comp)
                corr.create_dataset("reflectance_basis", data=model.correctives.reflectance.astype(np.float32),
                                    **comp)
            reg = f.create_group("regions")
            for name, idx in sorted(model.regions.items()):
                reg.create_dataset(name, data=np.asarray(idx, dtype=np.int32))
            f.create_group("symmetry").create_dataset("pairs", data=model.symmetric_pairs.astype(np.int32).reshape(-1, 2))
    return path


def _attr_str(value) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def _read_detector_bias(group) -> DetectorBias:
    return DetectorBias(
        angles=group["angles"][()], offsets68=group["offsets68"][()],
        offsets_dense=group["offsets_dense"][()] if "offsets_dense" in group else None,
        bandwidth_degrees=float(group.attrs.get("bandwidth_degrees", 10.0)),
        detector=_attr_str(group.attrs.get("detector", "")), description=_attr_str(group.attrs.get("description", "")))


def _read_correctives(group) -> CorrectiveSpace:
    kind = _attr_str(group.attrs.get("kind", "linear"))
    if kind != "linear":
        raise FaceModelError(f"corrective space of kind {kind!r} is not supported (only 'linear')")
    return CorrectiveSpace(geometry=group["geometry_basis"][()], reflectance=group["reflectance_basis"][()],
                           photos=int(group.attrs.get("photos", 0)),
                           description=_attr_str(group.attrs.get("description", "")))


def load_face_model(path: str | Path) -> FaceModel:
    """Read a face model written by :func:`save_face_model`.

    Raises :class:`FaceModelError` with a one-line reason for missing, foreign or
    damaged files.
    """
    path = Path(path)
    if not path.is_file():
        raise FaceModelError(f"face model file not found: {path}")
    try:
        with h5py.File(path, "r") as f:
            if _attr_str(f.attrs.get("format", "")) != FORMAT_NAME:
                raise FaceModelError(f"{path} is not a facerecon face-model file")
            version = int(f.attrs.get("format_version", 0))
            if version > FORMAT_VERSION:
                raise FaceModelError(
                    f"{path} uses face-model format {version}; this facerecon reads up to {FORMAT_VERSION}"
                )
            alb = f.get("albedo")
            spec = f.get("specular")
            lmk = f["landmarks"]
            model = FaceModel(
                model_id=_attr_str(f.attrs["model_id"]),
                provenance=_attr_str(f.attrs.get("provenance", "")),
                mean_shape=f["shape/mean"][()],
                identity_basis=f["shape/identity_basis"][()],
                expression_basis=f["shape/expression_basis"][()],
                expression_names=[_attr_str(s) for s in f["shape/expression_names"][()]],
                expression_kind=_attr_str(f.attrs["expression_kind"]),
                triangles=f["topology/triangles"][()],
                uv=f["topology/uv"][()],
                triangle_uv=f["topology/triangle_uv"][()],
                landmarks68=lmk["ibug68"][()],
                regions={name: ds[()] for name, ds in f["regions"].items()},
                symmetric_pairs=f["symmetry/pairs"][()],
                albedo_mean=None if alb is None else alb["mean"][()],
                albedo_basis=None if alb is None or "basis" not in alb else alb["basis"][()],
                albedo_kind=_attr_str(f.attrs.get("albedo_kind", "none")),
                specular_mean=None if spec is None else spec["mean"][()],
                specular_basis=None if spec is None or "basis" not in spec else spec["basis"][()],
                specular_kind="none" if spec is None else _attr_str(spec.attrs.get("kind", "measured")),
                dense_triangle=lmk["dense_triangle"][()] if "dense_triangle" in lmk else None,
                dense_barycentric=lmk["dense_barycentric"][()] if "dense_barycentric" in lmk else None,
                dense_offset=lmk["dense_offset"][()] if "dense_offset" in lmk else None,
                detector_bias=_read_detector_bias(lmk["detector_bias"]) if "detector_bias" in lmk else None,
                correctives=_read_correctives(f["correctives"]) if "correctives" in f else None,
                attributes={
                    k[len("extra_"):]: _attr_str(v) for k, v in f.attrs.items() if k.startswith("extra_")
                },
            )
    except FaceModelError:
        raise
    except (OSError, KeyError) as exc:
        raise FaceModelError(f"cannot read face model {path}: {exc}") from exc
    model.validate()
    return model
