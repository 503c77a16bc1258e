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


def test_triangulate_recovers_points_and_ignores_an_outlying_view():
    from facerecon.facemodel.embedding import triangulate
    from facerecon.render.camera import euler_to_matrix

    rng = np.random.default_rng(0)
    points = rng.normal(size=(20, 3)) * 40
    projections = []
    for yaw in (-40.0, -30.0, -15.0, 0.0, 10.0, 20.0, 35.0, 45.0):
        rotation = euler_to_matrix(torch.tensor([[0.0, np.deg2rad(yaw), 0.0]], dtype=torch.float64))[0].numpy()
        k = np.array([[800.0, 0, 256], [0, 800.0, 256], [0, 0, 1]])
        projections.append(k @ np.hstack([rotation, [[0.0], [0.0], [900.0]]]))
    projections = np.stack(projections)
    homogeneous = np.einsum("vij,pj->vpi", projections, np.hstack([points, np.ones((20, 1))]))
    xy = homogeneous[..., :2] / homogeneous[..., 2:]
    xy[1, 3] += 40.0  # one wild detection
    xy[2, 5] = np.nan  # one missed detection
    xy[:, 7] = np.nan  # a point nobody saw
    xy[1:, 8] = np.nan  # a point seen once
    solved = triangulate(xy, projections)
    good = np.setdiff1d(np.arange(20), [7, 8])
    np.testing.assert_allclose(solved[good], points[good], atol=1e-6)
    assert np.isnan(solved[[7, 8]]).all()


def test_offset_points_follow_the_triangle_under_rotation():
    from facerecon.facemodel.tensors import embedded_points
    from facerecon.render.camera import euler_to_matrix

    vertices = torch.tensor([[[0.0, 0.0, 0.0], [10.0, 0.0, 0.0], [0.0, 10.0, 0.0]]], dtype=torch.float64)
    triangles = torch.tensor([[0, 1, 2]])
    bary = torch.tensor([[0.2, 0.3, 0.5]], dtype=torch.float64)
    offset = torch.tensor([[1.0, 2.0, 3.0]], dtype=torch.float64)
    point = embedded_points(vertices, triangles, bary, offset)[0, 0]
    # frame of this triangle: x along the first edge, y in-plane, z the outward (+z) normal
    np.testing.assert_allclose(point.numpy(), [3.0 + 1.0, 5.0 + 2.0, 3.0])
    rotation = euler_to_matrix(torch.tensor([[0.3, -0.7, 0.2]], dtype=torch.float64))[0]
    rotated = embedded_points(vertices @ rotation.T + 5.0, triangles, bary, offset)[0, 0]
    np.testing.assert_allclose(rotated.numpy(), (point @ rotation.T + 5.0).numpy(), atol=1e-9)


def test_offsets_make_turned_views_project_onto_the_detections(embedded):
    """Off-surface landmarks: the triangulated offsets must beat the same points glued to the skin."""
    import dataclasses

    from facerecon.detection.mediapipe_backend import FaceAnalyzer
    from facerecon.facemodel.embedding import N_DENSE, face_oval_indices

    assert embedded.dense_offset is not None and np.abs(embedded.dense_offset).max() > 0.5
    inner = np.setdiff1d(np.arange(N_DENSE), face_oval_indices())
    image, _, _, projection = render_mean_face(embedded, 40.0, return_projection=True)
    with FaceAnalyzer(max_faces=1) as analyzer:
        detected = analyzer.analyze(image)[0].landmarks478[:N_DENSE, :2]
    errors = []
    for model in (embedded, dataclasses.replace(embedded, dense_offset=None)):
        tensors = FaceModelTensors(model).double()
        points = tensors.dense_points(torch.as_tensor(model.mean_shape, dtype=torch.float64)[None])[0].numpy()
        h = points @ projection[:, :3].T + projection[:, 3]
        errors.append(np.linalg.norm(h[:, :2] / h[:, 2:] - detected, axis=1)[inner].mean())
    assert errors[0] < 0.9 * errors[1], errors


def test_numpy_landmark_helper_matches_the_fit_definition(embedded):
    from facerecon.evaluation.aflw2000 import landmark_points68

    vertices = embedded.mean_shape + 3.0 * embedded.identity_basis[0]
    expected = FaceModelTensors(embedded).double().landmark_points(torch.as_tensor(vertices, dtype=torch.float64)[None])
    np.testing.assert_allclose(landmark_points68(embedded, vertices), expected[0].numpy(), atol=1e-6)


def test_outline_points_step_off_the_surface_behind_an_edge():
    """A point whose pixel shows the surface behind the face (a 40 mm depth step) moves onto the
    face; one on a smoothly receding surface, or with the face under it already, stays."""
    from types import SimpleNamespace

    from facerecon.facemodel.embedding import outline_points

    # one triangle per pixel column band: columns < 10 the face (depth 100 - 2 x col, receding
    # slowly towards the edge at col 9), columns 10..11 a neck 40 mm further back, then background
    h, w = 8, 16
    triangle_id = np.full((h, w), -1)
    triangle_id[:, :12] = np.arange(12)[None]
    depth = np.where(np.arange(12) < 10, 100.0 + 2.0 * np.arange(12), 160.0)
    screen = np.zeros((36, 3))
    screen[:, 2] = np.repeat(depth, 3)
    model = SimpleNamespace(triangles=np.arange(36).reshape(12, 3))
    points = np.array([[11.0, 4.0],  # on the neck: two pixels from the face
                       [8.0, 4.0],  # on the face near its edge
                       [13.0, 4.0]])  # on background, the neck within reach, the face beyond it
    moved = outline_points(points, np.array([0.0, 4.0]), triangle_id, screen, model, search=4, jump_mm=20.0)
    np.testing.assert_allclose(moved[0], [9.0, 4.0])
    np.testing.assert_allclose(moved[1], [8.0, 4.0])
    np.testing.assert_allclose(moved[2], [9.0, 4.0])


def test_jaw_outline_lies_on_the_front_of_the_face(embedded):
    """Mirror-image jaw points sit at similar depths (the outline is not back-projected onto the
    neck or the ears behind the edge), and the embedding records its method's version."""
    from facerecon.evaluation.landmarks import landmark_points68
    from facerecon.facemodel.embedding import EMBEDDING_VERSION, embedding_outdated

    jaw = landmark_points68(embedded, embedded.mean_shape)[:17]
    depth_gap = np.abs(jaw[:, 2] - jaw[::-1, 2])
    assert depth_gap.max() < 12.0, np.round(jaw[:, 2], 1)
    # the outline's depth changes smoothly from the chin to the ears: no point 20 mm behind both neighbours
    behind = np.minimum(jaw[:-2, 2], jaw[2:, 2]) - jaw[1:-1, 2]
    assert behind.max() < 20.0, np.round(jaw[:, 2], 1)
    assert embedded.attributes["dense_embedding"] == str(EMBEDDING_VERSION) and not embedding_outdated(embedded)
    import dataclasses

    assert embedding_outdated(dataclasses.replace(embedded, attributes={}))


def test_inner_lip_points_stay_on_their_own_lip(embedded):
    """Opening the jaw moves the lower inner-lip points down with the jaw and leaves the upper
    ones nearly in place: no upper point is glued to the lower lip (they meet on a closed mouth)."""
    from facerecon.detection.landmarks import LIPS_INNER
    from facerecon.facemodel.embedding import LIPS_INNER_LOWER, LIPS_INNER_UPPER

    assert set(LIPS_INNER_UPPER) | set(LIPS_INNER_LOWER) | {78, 308} == set(LIPS_INNER)
    tensors = FaceModelTensors(embedded).double()
    jaw_open = embedded.expression_names.index("jawOpen")
    closed = torch.as_tensor(embedded.mean_shape, dtype=torch.float64)[None]
    opened = closed + 0.5 * torch.as_tensor(embedded.expression_basis[jaw_open], dtype=torch.float64)[None]
    drop = (tensors.dense_points(closed) - tensors.dense_points(opened))[0, :, 1].numpy()  # mm, +y up
    upper, lower = drop[list(LIPS_INNER_UPPER)], drop[list(LIPS_INNER_LOWER)]
    assert upper.max() < 0.6 * lower.min(), (np.round(upper, 1), np.round(lower, 1))


def test_fit_settings_record_the_embedding_version():
    """A model refreshed by `model calibrate` redoes its fits (the version is in the settings digest);
    a model file without the record keeps the digest its fits always had."""
    from types import SimpleNamespace

    from facerecon.stages.fit import FitOptions, _settings

    def model(**attributes):
        return SimpleNamespace(model_id="m", detector_bias=None, correctives=None,
                               dense_triangle=np.zeros(468, dtype=np.int32), attributes=attributes)

    assert _settings(FitOptions(), model(dense_embedding="3"))["dense_embedding"] == "3"
    assert "dense_embedding" not in _settings(FitOptions(), model())
