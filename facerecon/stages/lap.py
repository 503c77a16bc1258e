"""``aggregate --method lap``: paper 003's canonical face of an album, then personalised per photo.

Runs after the album's ``joint`` 3DMM aggregation (the optimisation route's start, see
:mod:`facerecon.aggregation.lap`; with ``--checkpoint`` the networks of
:mod:`facerecon.networks.lap` predict the faces from the crops alone, and the joint fit is only
the reference of the ``*_fit`` scores) and writes, in ``OUT/<album>/``:

* ``<album>_lap.{obj,ply,glb}`` (+ ``_lap_texture.png``): the canonical face, model frame, mm;
* ``<album>_lap_depth.png`` (16-bit), ``<album>_lap_normal.png``, ``<album>_lap_albedo.png``;
* ``lap_personalised/<photo>_<face>.{obj,...}``: each photo's personalised face;
* ``lap_sheet.png``: per photo, the photo, the canonical and the personalised render, then the
  canonical face from three sides;

and returns the arrays that :func:`write_lap_group` stores in ``aggregate.h5``.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import h5py
import numpy as np
import torch

from facerecon.aggregation.lap import LapOptimiser, LapPhotos, LapSettings
from facerecon.aggregation.lap_export import canonical_views, depth_png, lap_mesh, normal_png, safe_stem, write_png16
from facerecon.evaluation.identity import composite_similarity
from facerecon.evaluation.lap_metrics import ssim
from facerecon.export.meshio import write_mesh, write_png
from facerecon.export.overlay import contact_sheet
from facerecon.fitting.camera import crop_intrinsics, model_to_camera
from facerecon.losses.perceptual import PerceptualLoss
from facerecon.render.renderer import MeshRenderer
from facerecon.stages.fit import _targets
from facerecon.synthetic import to_uint8


def lap_album(name: str, folder: Path, tensors, model, params: dict[str, np.ndarray], identity: np.ndarray,
              faces: list, options, should_stop=None, network=None, lap_networks=None,
              checkpoint: dict | None = None) -> dict | None:
    """Run LAP on an album's kept faces (``params``: their joint-fit parameters {name: (P, ...)}):
    the optimisation route, or with ``lap_networks`` (:class:`~facerecon.networks.lap.LapNetworks`
    of the ``checkpoint`` {"path", "sha256"}) the networks' prediction; writes the files and
    returns the record to store (with the per-photo scores of :func:`photo_scores`, identity
    similarity with the recognition ``network`` when given), or None when interrupted."""
    started = time.perf_counter()
    dev = tensors.mean_shape.device
    targets = _targets(faces, dev)
    p = {n: torch.as_tensor(np.asarray(v), dtype=torch.float32, device=dev) for n, v in params.items()}
    p["identity"] = torch.as_tensor(np.asarray(identity), dtype=torch.float32, device=dev)[None].expand(
        len(faces), -1)
    photos = LapPhotos(targets.crops, targets.attention, targets.landmarks68, p["angles"], p["translation"], p["sh"])
    if lap_networks is None:
        settings = options.lap or LapSettings()
        optimiser = LapOptimiser(tensors, model.regions, settings)
        result = optimiser.run(photos, torch.as_tensor(identity, dtype=torch.float32, device=dev),
                               p["albedo"].mean(0), should_stop=should_stop)
    else:  # the networks predict; the optimiser at their size only renders and scores (no steps)
        size = lap_networks.image_size
        settings = LapSettings(grid_size=size, render_size=size, aggregate_steps=0, personal_steps=0)
        optimiser = LapOptimiser(tensors, model.regions, settings)
        result = lap_networks.predict_album(targets.crops)
        result.losses.update(optimiser.scores(result, photos))
    if should_stop is not None and should_stop():
        return None
    grid = result.grid
    depth, albedo, valid = (result.depth.cpu().numpy(), result.albedo.cpu().numpy(), result.valid.cpu().numpy())
    files: list[Path] = []
    files += write_mesh(lap_mesh(grid, depth, albedo, valid), folder / f"{name}_lap", options.formats)
    write_png16(folder / f"{name}_lap_depth.png", depth_png(depth, valid))
    write_png(folder / f"{name}_lap_normal.png", normal_png(grid, depth, valid))
    write_png(folder / f"{name}_lap_albedo.png", np.clip(albedo * 255 + 0.5, 0, 255).astype(np.uint8))
    files += [folder / f"{name}_lap_{kind}.png" for kind in ("depth", "normal", "albedo")]
    personal_dir = folder / "lap_personalised"
    personal_dir.mkdir(exist_ok=True)
    names = [f"{f.key}#{f.face.index}" for f in faces]
    for i, face_name in enumerate(names):
        mesh = lap_mesh(grid, result.personal_depth[i].cpu().numpy(), result.personal_albedo[i].cpu().numpy(), valid)
        files += write_mesh(mesh, personal_dir / safe_stem(face_name), options.formats)
    size = 256
    canonical, _ = optimiser.render_photos(result, personal=False, size=size)
    personal, _ = optimiser.render_photos(result, personal=True, size=size)
    tiles = []
    for i, pending in enumerate(faces):
        stem = Path(pending.key).stem
        tiles += [(pending.face.crop, stem), (to_uint8(canonical[i:i + 1])[0], f"{stem} canonical"),
                  (to_uint8(personal[i:i + 1])[0], f"{stem} personalised")]
    tiles += [(r, f"canonical {label}") for r, label in
              zip(canonical_views(grid, result.depth, result.albedo, result.valid), ("left", "front", "right"))]
    sheet = folder / "lap_sheet.png"
    write_png(sheet, contact_sheet(tiles, columns=3))
    files.append(sheet)
    scores = photo_scores(optimiser, result, targets, tensors, p, network)
    return {"result": result, "faces": names, "settings": settings, "files": [str(f) for f in files],
            "scores": scores, "seconds": time.perf_counter() - started, "checkpoint": checkpoint}


def photo_scores(optimiser: LapOptimiser, result, targets, tensors, params: dict[str, torch.Tensor], network=None
                 ) -> dict[str, np.ndarray]:
    """Paper 003 table 5 per photo (P,) for the 3DMM fit (``fit``: the joint fit's identity with
    the photo's expression, albedo, light and pose), the canonical and the personalised LAP face:
    ``ssim_*`` of the render composited over the crop against the crop, over the face pixels all
    three cover, and ``identity_*``, the cosine of face-recognition embeddings of that composite
    and of the crop (with ``network``, else absent)."""
    crops = targets.crops
    P, S = crops.shape[0], crops.shape[1]
    with torch.no_grad():
        cam = model_to_camera(tensors.shape(params["identity"], params["expression"]), params["angles"],
                              params["translation"])
        fit = MeshRenderer(image_size=(S, S), backend="torch").render(
            cam, tensors.triangles, crop_intrinsics(S, P, device=crops.device),
            tensors.albedo(params["albedo"]).clamp(0, 1), params["sh"])
        canonical, canonical_mask = optimiser.render_photos(result, personal=False, size=S)
        personal, personal_mask = optimiser.render_photos(result, personal=True, size=S)
        common = fit.mask & canonical_mask & personal_mask
        perceptual = None
        if network is not None:
            perceptual = PerceptualLoss(network)
        scores: dict[str, np.ndarray] = {}
        for label, image in (("fit", fit.image.clamp(0, 1)), ("canonical", canonical), ("personal", personal)):
            composite = torch.where(common[..., None], image, crops)
            scores[f"ssim_{label}"] = ssim(composite, crops, common).cpu().numpy()
            if perceptual is not None:
                scores[f"identity_{label}"] = composite_similarity(perceptual, image, crops, common,
                                                                   targets.landmarks68).cpu().numpy()
    return scores


def write_lap_group(group: h5py.Group, record: dict) -> None:
    """Store a LAP record in an aggregate.h5 identity's ``lap`` group (docs/formats.md)."""
    r = record["result"]
    for key, value in r.grid.to_dict().items():
        group.attrs[f"grid_{key}"] = value
    group.attrs["settings"] = json.dumps(record["settings"].to_dict())
    checkpoint = record.get("checkpoint")
    group.attrs["route"] = "networks" if checkpoint else "optimisation"
    if checkpoint:
        group.attrs["checkpoint"] = str(checkpoint["path"])
        group.attrs["checkpoint_sha256"] = str(checkpoint["sha256"])
    group.attrs["seconds"] = float(record["seconds"])
    data = {"depth": r.depth, "albedo": r.albedo, "valid": r.valid, "landmarks": r.landmarks, "angles": r.angles,
            "translation": r.translation, "sh": r.sh, "sigma": r.sigma, "sigma_flip": r.sigma_flip,
            "personal_depth": r.personal_depth, "personal_albedo": r.personal_albedo}
    for key, value in data.items():
        array = value.cpu().numpy()
        group.create_dataset(key, data=array if array.dtype == bool else array.astype(np.float32),
                             compression="gzip" if array.ndim >= 2 else None)
    for key, value in {**r.losses, **record.get("scores", {})}.items():
        group.create_dataset(key, data=np.asarray(value, np.float32))
    group.create_dataset("faces", data=np.array(record["faces"], dtype=object), dtype=h5py.string_dtype("utf-8"))
