"""The ``export`` stage: mesh files re-created from a fits HDF5 alone."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from facerecon.errors import OutputError, describe_os_error
from facerecon.export.blendshapes import write_blendshapes
from facerecon.facemodel.model import FaceModel
from facerecon.stages.fit import (STATUS_OK, face_level, output_base, output_names, read_fits, read_model_item,
                                  write_face_files)


@dataclass
class ExportSummary:
    output: str
    files: list[str] = field(default_factory=list)
    faces: int = 0
    skipped: list[tuple[str, str]] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"output": self.output, "faces_exported": self.faces, "files": len(self.files),
                "skipped": [{"key": k, "reason": r} for k, r in self.skipped],
                "exit_code": 0 if self.faces else 1}


def _topology_model(topology: dict) -> FaceModel:
    """A FaceModel shell carrying only what the mesh writers read (topology)."""
    empty = np.zeros((0, 1, 3), np.float32)
    return FaceModel(model_id=str(topology["attrs"].get("model_id", "")), provenance="", mean_shape=np.zeros((1, 3)),
                     identity_basis=empty, expression_basis=empty, expression_names=topology["expression_names"],
                     expression_kind=str(topology["attrs"].get("expression_kind", "pca")),
                     triangles=topology["triangles"], uv=topology["uv"], triangle_uv=topology["triangle_uv"],
                     landmarks68=topology["landmarks68"], regions={}, symmetric_pairs=np.zeros((0, 2), np.int32))


def run_export(fits: str | os.PathLike, out_dir: str | os.PathLike, formats: list[str], pose: str = "canonical",
               neutral: bool = False, blendshapes: bool = True, level: str | None = None) -> ExportSummary:
    """Write mesh files (and blendshape weights) for every fitted face in ``fits``.

    ``level``: "base" or "final" (paper 004's levels; a base-level fit has no final level and its
    faces are skipped), None: the level each face was fitted at."""
    out_dir = Path(out_dir)
    summary = ExportSummary(output=str(out_dir))
    topology = read_model_item(fits)
    model = _topology_model(topology)
    entries = list(read_fits(fits))
    names = output_names([key for key, _attrs, _faces in entries],
                         {key: str(attrs["output_name"]) for key, attrs, _faces in entries if attrs.get("output_name")})
    for key, attrs, faces in entries:
        for face in faces:
            index = int(face["attrs"]["index"])
            if face["attrs"].get("status") != STATUS_OK or "vertices" not in face:
                summary.skipped.append((f"{key}#{index}", face["attrs"].get("reason", "not fitted")))
                continue
            at_level = face_level(face, level)
            if at_level is None:
                summary.skipped.append((f"{key}#{index}", f"fitted at the base level only (no {level} level)"))
                continue
            face = at_level
            params = {k: face[k] for k in ("identity", "expression", "albedo", "sh", "angles", "translation")}
            base = output_base(out_dir, key, index, "meshes", names)
            try:
                files = write_face_files(model, face, params, base, formats, pose, neutral=neutral)
                if blendshapes and model.expression_kind == "blendshape":
                    files += write_blendshapes(base, model.expression_names, face["expression"])
            except OSError as exc:
                raise OutputError(f"cannot write to {out_dir}: {describe_os_error(exc)}") from exc
            summary.files += [str(f) for f in files]
            summary.faces += 1
        if not faces and attrs.get("status") != STATUS_OK:
            summary.skipped.append((key, attrs.get("error") or attrs.get("status", "")))
    return summary
