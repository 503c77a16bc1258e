"""The ``synth`` stage: faces rendered from the face model with known parameters.

Each identity gets ``views`` images (different pose, expression and light; same identity and
albedo), so the set serves multi-view training (paper 001) as well as tests, supervised warm
starts and the evaluation of trained networks with known truth. Images go to
``OUT/images/<id>_<view>.png``; ground truth to the crash-safe store ``OUT/synth.h5``
(layout in docs/formats.md). Every image is a pure function of (seed, identity, view), so an
interrupted run resumes exactly.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from facerecon import __version__
from facerecon.export.meshio import write_png
from facerecon.facemodel.resolve import resolve_face_model
from facerecon.facemodel.tensors import FaceModelTensors
from facerecon.fitting.camera import crop_intrinsics
from facerecon.io.store import ResultStore
from facerecon.synthetic import random_parameters, render_faces, textured_backgrounds, to_uint8

KIND = "synthetic"
ITEMS_GROUP = "images"


@dataclass
class SynthOptions:
    face_model: str | None = None
    count: int = 100
    views: int = 1
    size: int = 224
    zoom: float = 1.0
    seed: int = 0
    max_yaw: float = 60.0
    max_pitch: float = 20.0
    #: paper 002's specular highlights: a specular albedo and one Blinn-Phong light per image
    specular: bool = False


@dataclass
class SynthSummary:
    output: str
    written: int = 0
    skipped: int = 0
    interrupted: bool = False
    elapsed: float = 0.0
    files: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"output": self.output, "written": self.written, "skipped": self.skipped,
                "interrupted": self.interrupted, "elapsed_seconds": round(self.elapsed, 3),
                "exit_code": 130 if self.interrupted else 0}


def identity_parameters(tensors: FaceModelTensors, seed: int, identity: int, views: int, options: SynthOptions
                        ) -> dict[str, torch.Tensor]:
    """Parameters (views, ...) of one identity: shared identity and albedo, per-view the rest."""
    generator = torch.Generator().manual_seed(seed * 1_000_003 + identity)
    yaw = (torch.rand(views, generator=generator) * 2 - 1) * options.max_yaw
    pitch = (torch.rand(views, generator=generator) * 2 - 1) * options.max_pitch
    params = random_parameters(tensors, views, generator, specular=options.specular)
    params["angles"][:, 0] = torch.deg2rad(pitch)
    params["angles"][:, 1] = torch.deg2rad(yaw)
    params["identity"][:] = params["identity"][0]
    params["albedo"][:] = params["albedo"][0]
    if options.specular:
        params["specular"][:] = params["specular"][0]
    params["background"] = textured_backgrounds(views, options.size, generator)
    return params


def run_synth(out_dir: str | os.PathLike, options: SynthOptions | None = None, progress=None,
              should_stop=None) -> SynthSummary:
    """Render ``options.count`` images (rounded up to whole identities)."""
    options = options or SynthOptions()
    out_dir = Path(out_dir)
    images = out_dir / "images"
    images.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    summary = SynthSummary(output=str(out_dir))
    model = resolve_face_model(options.face_model)
    tensors = FaceModelTensors(model)
    identities = -(-options.count // options.views)
    if progress is not None:
        progress.start(identities * options.views)
    attrs = {"tool": "facerecon", "tool_version": __version__, "model_id": model.model_id, "seed": options.seed,
             "views": options.views, "size": options.size, "zoom": options.zoom,
             "specular": options.specular}
    with ResultStore(out_dir / "synth.h5", kind=KIND, items_group=ITEMS_GROUP, file_attrs=attrs) as store:
        try:
            for identity in range(identities):
                if should_stop is not None and should_stop():
                    summary.interrupted = True
                    break
                names = [f"{identity:06d}_{view}.png" for view in range(options.views)]
                if all(store.is_done(n) and (images / n).is_file() for n in names):
                    summary.skipped += len(names)
                    for _ in names:
                        if progress is not None:
                            progress.advance()
                    continue
                params = identity_parameters(tensors, options.seed, identity, options.views, options)
                background = params.pop("background")
                batch = render_faces(tensors, params, options.size, background, zoom=options.zoom)
                intrinsics = crop_intrinsics(options.size)[0]
                intrinsics[:2, :2] *= options.zoom
                for view, (name, image) in enumerate(zip(names, to_uint8(batch.images))):
                    write_png(images / name, image)
                    arrays = {k: v[view].numpy().astype(np.float32) for k, v in params.items()}
                    arrays["landmarks68"] = batch.landmarks68[view].numpy().astype(np.float32)
                    if batch.dense is not None:
                        arrays["landmarks_dense"] = batch.dense[view].numpy().astype(np.float32)
                    arrays["intrinsics"] = intrinsics.numpy().astype(np.float64)

                    def write(group, arrays=arrays):
                        for key, value in arrays.items():
                            group.create_dataset(key, data=value)

                    store.write_item(name, write, {"status": "ok", "identity": identity, "view": view,
                                                   "image": f"images/{name}"})
                    summary.written += 1
                    if progress is not None:
                        progress.advance()
                store.maybe_pack()
        except KeyboardInterrupt:
            summary.interrupted = True
    summary.elapsed = time.perf_counter() - started
    return summary
