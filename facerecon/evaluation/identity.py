"""Identity similarity of a fit: does the rendered face still look like the person?

Per fitted face: the fit is rendered (shaded albedo, fitted light) on the aligned crop it was
fitted on, composited over that crop (render inside the face, photo elsewhere, as paper 000's
perceptual loss does), and the cosine between the face-recognition embeddings of the crop and
of the composite is the face's identity similarity (paper 003 table 5 reports this metric).
Both chips are cut with the same alignment, from the detector's 68 landmarks on the crop, so
only the rendered face differs. 1 is indistinguishable; dlib's network puts different people
at a Euclidean distance above 0.6 (cosine about 0.85 or lower at its descriptor norms).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from facerecon.facemodel.tensors import FaceModelTensors
from facerecon.fitting.camera import crop_intrinsics, model_to_camera
from facerecon.losses.perceptual import PerceptualLoss
from facerecon.render.renderer import MeshRenderer
from facerecon.stages.detect import iter_detections

PARAMETERS = ("identity", "expression", "albedo", "sh", "angles", "translation")


def composite_similarity(perceptual: PerceptualLoss, rendered: torch.Tensor, crops: torch.Tensor,
                         mask: torch.Tensor, landmarks68: torch.Tensor) -> torch.Tensor:
    """(B,) cosine of the embeddings of ``crops`` (B, S, S, 3) in [0, 1] and of ``rendered``
    composited over them inside ``mask`` (B, S, S), chips cut from ``landmarks68`` (B, 68, 2)."""
    with torch.no_grad():
        matrix = perceptual.chip_matrix(landmarks68)
        composite = torch.where(mask[..., None], rendered, crops)
        return F.cosine_similarity(perceptual.embed(composite, matrix), perceptual.embed(crops, matrix), dim=1)


def fit_identity_similarity(faces: dict[tuple[str, int], dict], detections_path: str | Path, model, network,
                            batch_size: int = 16) -> dict[tuple[str, int], float]:
    """(image key, face index) -> identity similarity of fitted faces, with recognition ``network``
    (:func:`facerecon.networks.recognition.load_recognition_network`).

    ``faces``: (image key, face index) -> a fitted face as :func:`facerecon.stages.fit.read_fits`
    gives it (its parameters are used); ``detections_path``: the detections file the fit read
    (the aligned crops and their landmarks). Faces without a stored crop are left out."""
    wanted = {key for key, _index in faces}
    crops: dict[tuple[str, int], tuple[np.ndarray, np.ndarray]] = {}
    for key, _attrs, detected in iter_detections(detections_path):
        if key in wanted:
            for face in detected:
                crops[(key, face.index)] = (face.crop, face.crop_landmarks68)
    items = [(k, f) for k, f in faces.items() if k in crops and all(n in f for n in PARAMETERS)]
    tensors = FaceModelTensors(model)
    perceptual = PerceptualLoss(network)
    result: dict[tuple[str, int], float] = {}
    by_size: dict[int, list] = {}
    for item in items:  # one crop size per render
        by_size.setdefault(crops[item[0]][0].shape[0], []).append(item)
    for size, group in by_size.items():
        renderer = MeshRenderer(image_size=(size, size), backend="torch")
        for start in range(0, len(group), batch_size):
            chunk = group[start:start + batch_size]
            p = {n: torch.as_tensor(np.stack([f[n] for _k, f in chunk]), dtype=torch.float32) for n in PARAMETERS}
            with torch.no_grad():
                cam = model_to_camera(tensors.shape(p["identity"], p["expression"]), p["angles"], p["translation"])
                out = renderer.render(cam, tensors.triangles, crop_intrinsics(size, len(chunk)),
                                      tensors.albedo(p["albedo"]).clamp(0, 1), p["sh"])
            photo = torch.as_tensor(np.stack([crops[k][0] for k, _f in chunk]), dtype=torch.float32) / 255.0
            landmarks = torch.as_tensor(np.stack([crops[k][1] for k, _f in chunk]), dtype=torch.float32)
            values = composite_similarity(perceptual, out.image.clamp(0, 1), photo, out.mask, landmarks)
            result.update({k: float(v) for (k, _f), v in zip(chunk, values)})
    return result
