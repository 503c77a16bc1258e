"""Alignment and surface metrics of the evaluation protocols."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.spatial.transform import Rotation

from facerecon.evaluation.geometry import (
    Similarity,
    crop_sphere,
    find_nose_tip,
    icp_similarity,
    scan_error,
    surface_distances,
    umeyama,
)
from facerecon.facemodel.annotate import vertex_normals_np


@pytest.fixture(scope="module")
def face(ict_model):
    return ict_model.mean_shape.astype(np.float64), ict_model.triangles


def test_umeyama_recovers_a_similarity():
    rng = np.random.default_rng(0)
    points = rng.normal(size=(200, 3)) * 50
    truth = Similarity(1.07, Rotation.from_euler("xyz", [10, -20, 5], degrees=True).as_matrix(), np.array([3.0, -4, 9]))
    found = umeyama(points, truth.apply(points))
    assert abs(found.scale - 1.07) < 1e-9
    np.testing.assert_allclose(found.rotation, truth.rotation, atol=1e-9)


def test_icp_recovers_a_known_similarity(face, ict_model):
    vertices, _ = face
    region = ict_model.regions["photometric"]
    truth = Similarity(1.05, Rotation.from_euler("xyz", [4, -6, 3], degrees=True).as_matrix(), np.array([5.0, -3, 8]))
    target = truth.apply(vertices[region])
    found = icp_similarity(vertices[region], target, iterations=200, trim=1.0)
    angle = np.degrees(Rotation.from_matrix(found.rotation @ truth.rotation.T).magnitude())
    assert angle < 0.1
    assert abs(found.scale / truth.scale - 1) < 1e-3


def test_identical_meshes_score_zero_and_offset_scores_the_offset(face, ict_model):
    vertices, triangles = face
    region = ict_model.regions["skin"]
    same = scan_error(vertices, triangles, vertices[region])
    assert same.rmse_point_to_plane < 1e-3 and same.mean_point_to_surface < 1e-3
    # ground-truth points pushed 0.5 mm along the normals: point-to-surface and -plane ≈ 0.5
    normals = vertex_normals_np(vertices, triangles)
    shifted = vertices[region] + 0.5 * normals[region]
    distance, plane = surface_distances(shifted, vertices, triangles)
    assert abs(np.median(distance) - 0.5) < 0.02 and abs(np.median(plane) - 0.5) < 0.02


def test_crop_keeps_exactly_the_vertices_inside_the_radius(face):
    vertices, triangles = face
    centre = vertices[100]
    kept, kept_tris, index = crop_sphere(vertices, centre, 60.0, triangles)
    inside = np.linalg.norm(vertices - centre, axis=1) <= 60.0
    assert set(index.tolist()) == set(np.flatnonzero(inside).tolist())
    assert np.linalg.norm(kept - centre, axis=1).max() <= 60.0
    assert kept_tris.max() < len(kept) and len(kept_tris) > 0


def test_nose_tip_is_found_without_landmarks(face, ict_model):
    vertices, _ = face
    front = vertices[ict_model.regions["face"]]
    rotated = front @ Rotation.from_euler("xyz", [10, 25, -5], degrees=True).as_matrix().T + [100, 20, -30]
    tip = find_nose_tip(rotated)
    truth = vertices[ict_model.landmarks68[30]] @ Rotation.from_euler("xyz", [10, 25, -5], degrees=True).as_matrix().T \
        + [100, 20, -30]
    assert np.linalg.norm(tip - truth) < 8.0
