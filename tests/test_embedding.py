"""Dense landmark embedding of the ICT model via the detector on rendered mean faces."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from facerecon.facemodel.embedding import embed_dense_landmarks, render_mean_face
from facerecon.facemodel.model import load_face_model, save_face_model
from facerecon.facemodel.tensors import FaceModelTensors

# mediapipe face-mesh index -> iBUG-68 index of the same anatomical point
CORRESPONDING = {4: 30, 33: 36, 263: 45, 133: 39, 362: 42, 61: 48, 291: 54}


@pytest.fixture(scope="module")
def embedded(ict_model):
    return embed_dense_landmarks(ict_model)


def test_rendered_mean_face_is_a_face_image(ict_model):
    image, triangle_id, screen = render_mean_face(ict_model, 0.0, image_size=256)
    assert image.shape == (256, 256, 3) and image.dtype == np.uint8
    covered = triangle_id >= 0
    assert 0.25 < covered.mean() < 0.9
    # the nose tip projects near the horizontal centre
    nose_u = screen[ict_model.landmarks68[30], 0]
    assert abs(nose_u - 128) < 10


def test_embedding_lands_on_matching_anatomy(embedded, ict_model):
    assert embedded.dense_triangle.shape == (468,)
    np.testing.assert_allclose(embedded.dense_barycentric.sum(axis=1), 1.0, atol=1e-5)
    assert (embedded.dense_barycentric >= -1e-6).all()
    points = FaceModelTensors(embedded).dense_points(torch.as_tensor(embedded.mean_shape)[None])[0].numpy()
    ibug = ict_model.mean_shape[ict_model.landmarks68]
    errors = {mp: float(np.linalg.norm(points[mp] - ibug[ib])) for mp, ib in CORRESPONDING.items()}
    assert max(errors.values()) < 5.0, errors
    # left-right order is preserved: mediapipe 263 is the subject's left eye (+x)
    assert points[263, 0] > 0 > points[33, 0]


def test_embedding_survives_save_and_load(embedded, tmp_path):
    loaded = load_face_model(save_face_model(embedded, tmp_path / "e.h5"))
    np.testing.assert_array_equal(loaded.dense_triangle, embedded.dense_triangle)
    assert loaded.summary()["dense_landmarks"] == 468
