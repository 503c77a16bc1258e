"""How well the dense landmark embedding predicts the detector (run by hand).

For views the embedding was not built from, the face is rendered, run through the detector,
and the embedded landmarks are projected with the true camera. Reported: the mean distance
between the detected and projected inner (non-oval) landmarks in % of the eye distance, with
the model's offsets (``landmarks/dense_offset``) and with the offsets dropped (the same points
glued to the surface).

* ``mean face``: the mean shape under the embedding's standard light (held-out yaw/pitch);
* ``synthetic``: random identity, expression, albedo and light as in `benchmarks/fit.py`.

    python benchmarks/embedding.py --face-model ict
"""

from __future__ import annotations

import argparse
import dataclasses

import numpy as np
import torch

from facerecon.detection.mediapipe_backend import FaceAnalyzer
from facerecon.facemodel.embedding import N_DENSE, face_oval_indices, render_mean_face
from facerecon.facemodel.resolve import resolve_face_model
from facerecon.facemodel.tensors import FaceModelTensors
from facerecon.fitting.camera import crop_intrinsics, model_to_camera
from facerecon.render.camera import project_points
from facerecon.synthetic import random_parameters, render_faces, textured_backgrounds, to_uint8

HELD_OUT_VIEWS = ((0, 0), (40, 0), (-40, 0), (40, 20), (10, -20), (20, 10))


def error_percent(detected: np.ndarray, projected: np.ndarray, inner: np.ndarray) -> float:
    eye_distance = np.linalg.norm(detected[33] - detected[263])
    return float(np.linalg.norm(detected - projected, axis=1)[inner].mean() / eye_distance * 100)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--face-model", default=None)
    parser.add_argument("--faces", type=int, default=8, help="synthetic faces per yaw")
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()

    model = resolve_face_model(args.face_model)
    if model.dense_triangle is None:
        raise SystemExit("this face model has no dense landmark embedding")
    variants = {"offsets": model, "on surface": dataclasses.replace(model, dense_offset=None)}
    tensors = {name: FaceModelTensors(m).double() for name, m in variants.items()}
    inner = np.setdiff1d(np.arange(N_DENSE), face_oval_indices())
    analyzer = FaceAnalyzer(max_faces=1)
    print(f"{'case':<28} " + " ".join(f"{name:>12}" for name in variants))
    mean_shape = torch.as_tensor(model.mean_shape, dtype=torch.float64)[None]
    for yaw, pitch in HELD_OUT_VIEWS:
        image, _, _, projection = render_mean_face(model, float(yaw), pitch_degrees=float(pitch),
                                                   return_projection=True)
        faces = analyzer.analyze(image)
        if not faces:
            print(f"mean face yaw {yaw:+d} pitch {pitch:+d}: no face detected")
            continue
        detected = faces[0].landmarks478[:N_DENSE, :2]
        row = []
        for t in tensors.values():
            h = t.dense_points(mean_shape)[0].numpy() @ projection[:, :3].T + projection[:, 3]
            row.append(error_percent(detected, h[:, :2] / h[:, 2:], inner))
        label = f"mean face yaw {yaw:+d} pitch {pitch:+d}"
        print(f"{label:<28} " + " ".join(f"{v:>11.2f}%" for v in row))
    generator = torch.Generator().manual_seed(args.seed)
    for yaw in (0, 40):
        params = random_parameters(tensors["offsets"].float(), args.faces, generator, yaw_degrees=float(yaw),
                                   pitch_degrees=0.0)
        batch = render_faces(tensors["offsets"].float(), params, 512,
                             textured_backgrounds(args.faces, 512, generator), zoom=0.6)
        cameras = model_to_camera(batch.vertices.double(), params["angles"].double(),
                                  params["translation"].double())
        intrinsics = crop_intrinsics(512, args.faces).double()
        intrinsics[:, :2, :2] *= 0.6  # the zoom render_faces applies
        errors: dict[str, list[float]] = {name: [] for name in variants}
        for i, image in enumerate(to_uint8(batch.images)):
            found = analyzer.analyze(image)
            if not found:
                continue
            for name, t in tensors.items():
                projected = project_points(t.dense_points(cameras[i:i + 1]), intrinsics[i:i + 1])[0, :, :2]
                errors[name].append(error_percent(found[0].landmarks478[:N_DENSE, :2], projected.numpy(), inner))
        label = f"synthetic yaw {yaw:+d} (n={len(errors['offsets'])})"
        print(f"{label:<28} " + " ".join(f"{np.mean(v):>11.2f}%" for v in errors.values()))
    analyzer.close()


if __name__ == "__main__":
    main()
