"""The detector-bias table: interpolation, storage, correction in the fitter, calibration."""

from __future__ import annotations

import dataclasses
import json
import math

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from facerecon.cli import main
from facerecon.facemodel.detector_bias import DetectorBias, canonical_pitch_yaw, interpolate_offsets
from facerecon.facemodel.model import FaceModelError, load_face_model, save_face_model
from facerecon.facemodel.tensors import FaceModelTensors
from facerecon.fitting.camera import crop_intrinsics, model_to_camera
from facerecon.fitting.optimize import FaceFitter, FaceTargets, FitSettings
from facerecon.render.camera import euler_to_matrix, project_points
from facerecon.synthetic import random_parameters

CROP = 224


def test_interpolation_follows_the_nearest_poses():
    angles = torch.tensor([[0.0, 0.0], [0.0, 0.7]])
    offsets = torch.stack([torch.full((5, 2), 1.0), torch.full((5, 2), 3.0)])
    bandwidth = math.radians(10)
    query = torch.tensor([[0.0, 0.0], [0.0, 0.35], [0.0, 0.7], [0.0, 6.0], [float("nan"), 0.0]])
    result = interpolate_offsets(query, angles, offsets, bandwidth)
    assert result.shape == (5, 5, 2)
    assert torch.allclose(result[0], torch.ones(5, 2), atol=1e-3)  # at a sample: its offsets
    assert torch.allclose(result[1], torch.full((5, 2), 2.0), atol=1e-4)  # halfway: the mean
    assert torch.allclose(result[2], torch.full((5, 2), 3.0), atol=1e-3)
    assert torch.allclose(result[3], torch.full((5, 2), 3.0), atol=1e-4)  # far away: nearest, not 0/0
    assert torch.equal(result[4], torch.zeros(5, 2))  # an unknown pose: no correction


def test_profile_poses_are_filed_under_one_euler_branch():
    angles = torch.deg2rad(torch.tensor([[176.0, -84.0, 5.0], [-141.0, 85.0, 0.0], [10.0, 30.0, 3.0]]))
    canonical = canonical_pitch_yaw(angles)
    assert (canonical[:, 0].abs() <= math.pi / 2).all()
    np.testing.assert_allclose(np.degrees(canonical.numpy()), [[-4.0, -96.0], [39.0, 95.0], [10.0, 30.0]], atol=1e-4)
    # the same rotations: the other branch's roll is turned by 180 degrees
    roll = torch.where(angles[:, :1].abs() > math.pi / 2, angles[:, 2:] + math.pi, angles[:, 2:])
    same = euler_to_matrix(torch.cat([canonical, roll], dim=1))
    assert torch.allclose(same, euler_to_matrix(angles), atol=1e-5)


def test_pose_mode_leaves_a_frontal_face_alone(ict_model):
    """Default "pose" mode corrects only the change of the offsets away from frontal."""
    angles = np.radians(np.array([[0.0, 0.0], [0.0, 40.0]], np.float32))
    offsets68 = np.zeros((2, 68, 2), np.float32)
    offsets68[:, :, 0] = 0.01  # the same at every pose
    offsets68[1, :17, 1] = 0.02  # plus a jaw shift at 40 degrees
    table = DetectorBias(angles=angles, offsets68=offsets68, offsets_dense=None, bandwidth_degrees=5.0)
    tensors = FaceModelTensors(dataclasses.replace(ict_model, detector_bias=table))
    query = torch.tensor([[0.0, 0.0, 0.0], [0.0, math.radians(40), 0.0]])
    full, _ = tensors.detector_offsets(query, CROP)
    pose, _ = tensors.detector_offsets(query, CROP, relative_to_frontal=True)
    assert torch.allclose(full[..., 0], torch.full((2, 68), 0.01 * CROP), atol=1e-4)
    assert torch.allclose(pose[0], torch.zeros(68, 2), atol=1e-4)
    assert torch.allclose(pose[1, :17, 1], torch.full((17,), 0.02 * CROP), atol=1e-3)
    assert torch.allclose(pose[1, 17:], torch.zeros(51, 2), atol=1e-3)


def _jaw_pull_table(model, dense: bool) -> DetectorBias:
    """A made-up detector that lags behind the turn: nose and eyes stay nearer their frontal places
    (and the jaw too, which the fitter leaves alone by default)."""
    yaws = np.radians(np.arange(-60, 61, 5, dtype=np.float32))
    angles = np.stack([np.zeros_like(yaws), yaws], axis=1)
    offsets68 = np.zeros((len(yaws), 68, 2), np.float32)
    offsets68[:, :17, 0] = -0.06 * np.sin(yaws)[:, None]  # jaw: towards frontal, 6 % of the crop at 90
    offsets68[:, 27:48, 0] = -0.06 * np.sin(yaws)[:, None]  # nose and eyes
    offsets_dense = np.zeros((len(yaws), len(model.dense_triangle), 2), np.float32) if dense else None
    return DetectorBias(angles=angles, offsets68=offsets68, offsets_dense=offsets_dense, bandwidth_degrees=5.0,
                        detector="made-up jaw pull", description="test table")


def test_table_survives_save_and_load(ict_embedded_model, tmp_path):
    table = _jaw_pull_table(ict_embedded_model, dense=True)
    table.offsets_dense[:, 3, 1] = 0.01
    path = save_face_model(dataclasses.replace(ict_embedded_model, detector_bias=table), tmp_path / "m.h5")
    loaded = load_face_model(path).detector_bias
    assert loaded is not None and loaded.detector == "made-up jaw pull" and loaded.bandwidth_degrees == 5.0
    for name in ("angles", "offsets68", "offsets_dense"):
        np.testing.assert_array_equal(getattr(loaded, name), getattr(table, name))
    info = CliRunner().invoke(main, ["model", "info", str(path), "--json"])
    assert info.exit_code == 0, info.output
    assert json.loads(info.output)["detector_bias"]["samples"] == table.n_samples
    # and --remove takes it out again, atomically rewriting the file
    removed = CliRunner().invoke(main, ["model", "calibrate", str(path), "--remove", "--json"])
    assert removed.exit_code == 0, removed.output
    assert load_face_model(path).detector_bias is None


def test_inconsistent_table_is_rejected(ict_embedded_model, tmp_path):
    table = _jaw_pull_table(ict_embedded_model, dense=True)
    broken = dataclasses.replace(table, offsets68=table.offsets68[:, :60])
    with pytest.raises(FaceModelError, match="offsets68"):
        save_face_model(dataclasses.replace(ict_embedded_model, detector_bias=broken), tmp_path / "bad.h5")
    no_dense = dataclasses.replace(ict_embedded_model, dense_triangle=None, dense_barycentric=None,
                                   dense_offset=None, detector_bias=table)
    with pytest.raises(FaceModelError, match="dense"):
        no_dense.validate()


def _biased_landmark_targets(model, table: DetectorBias, yaw_degrees: list[float]):
    """Exact landmark projections of random faces plus the table's inner-face offsets at the true pose."""
    tensors = FaceModelTensors(model)
    params = random_parameters(tensors, len(yaw_degrees), torch.Generator().manual_seed(4), pitch_degrees=0.0)
    params["angles"][:, 1] = torch.deg2rad(torch.tensor(yaw_degrees))
    params["angles"][:, 2] = 0.0
    cam = model_to_camera(tensors.shape(params["identity"], params["expression"]), params["angles"],
                          params["translation"])
    exact = project_points(tensors.landmark_points(cam), crop_intrinsics(CROP, len(yaw_degrees)))[..., :2]
    offsets = interpolate_offsets(params["angles"][:, :2], torch.as_tensor(table.angles),
                                  torch.as_tensor(table.offsets68), math.radians(table.bandwidth_degrees)) * CROP
    offsets[:, :17] = 0.0  # the jaw as detected on photos: no render-measured contour offsets
    b = len(yaw_degrees)
    targets = FaceTargets(torch.zeros(b, CROP, CROP, 3), exact + offsets, None, torch.zeros(b, CROP, CROP))
    return params, exact, offsets, targets


def _projected_landmarks(model, parameters: dict[str, np.ndarray]) -> torch.Tensor:
    tensors = FaceModelTensors(model)
    p = {k: torch.as_tensor(v) for k, v in parameters.items()}
    cam = model_to_camera(tensors.shape(p["identity"], p["expression"]), p["angles"], p["translation"])
    return project_points(tensors.landmark_points(cam), crop_intrinsics(CROP, len(cam)))[..., :2]


def test_fitter_removes_a_pose_dependent_bias(ict_model):
    """With the table the fit lands on the model's true landmarks; with raw detections on the biased ones."""
    table = _jaw_pull_table(ict_model, dense=False)
    params, exact, offsets, targets = _biased_landmark_targets(ict_model, table, [0.0, 35.0, -50.0])
    settings = FitSettings(coarse_steps=0, fine_steps=0)
    corrected_model = FaceModelTensors(dataclasses.replace(ict_model, detector_bias=table))
    corrected = FaceFitter(corrected_model, ict_model.regions, settings).fit(targets)
    raw = FaceFitter(FaceModelTensors(ict_model), ict_model.regions, settings).fit(targets)
    to_exact = {name: (_projected_landmarks(ict_model, result.parameters) - exact).norm(dim=-1).mean(dim=1)
                for name, result in (("corrected", corrected), ("raw", raw))}
    turned = slice(1, 3)
    assert (offsets.norm(dim=-1).mean(dim=1)[turned] > 2.0).all()  # the made-up bias is a few pixels
    assert (to_exact["corrected"][turned] < 1.2).all(), to_exact
    assert (to_exact["raw"][turned] > 2.0).all(), to_exact
    # reported reprojection errors stay against the detector's raw points, which the corrected
    # fit deliberately does not follow
    assert (corrected.landmark_error_px[turned] > raw.landmark_error_px[turned] + 0.5).all()
    # contour points slide and their render-measured offsets do not carry over to photos: kept
    fitter = FaceFitter(corrected_model, ict_model.regions, settings)
    debiased = fitter._debiased(targets, torch.as_tensor(params["angles"]))
    assert torch.equal(debiased.landmarks68[:, :17], targets.landmarks68[:, :17])
    assert not torch.allclose(debiased.landmarks68[1:, 27:48], targets.landmarks68[1:, 27:48])
    # switched off in the settings, the table is ignored
    off = FaceFitter(corrected_model, ict_model.regions,
                     FitSettings(coarse_steps=0, fine_steps=0, detector_bias_iterations=0)).fit(targets)
    np.testing.assert_allclose(off.parameters["angles"], raw.parameters["angles"], atol=1e-5)


def test_calibration_measures_the_detector_on_renders(ict_embedded_model, tmp_path):
    from facerecon.stages.calibrate import calibrate_detector_bias

    calls = []
    table = calibrate_detector_bias(ict_embedded_model, yaws=(0.0, 40.0), pitches=(0.0,), faces_per_cell=2,
                                    progress=lambda done, total: calls.append((done, total)))
    assert calls[-1] == (2, 2)
    assert 3 <= table.n_samples <= 4 and not table.problems()
    assert table.offsets_dense is not None and table.offsets_dense.shape[1:] == (468, 2)
    yaw = np.degrees(table.angles[:, 1])
    assert (np.abs(yaw) < 6).sum() >= 1 and (np.abs(yaw - 40) < 6).sum() >= 1, yaw
    # mediapipe lands within a few percent of the crop of the model's own points
    assert 0.002 < np.abs(table.offsets68).mean() < 0.05
    assert "mediapipe" in table.detector

    path = save_face_model(ict_embedded_model, tmp_path / "m.h5")
    result = CliRunner().invoke(main, ["model", "calibrate", str(path), "--yaws", "0,30", "--pitches", "0",
                                       "--faces-per-cell", "1", "--no-embed", "--json"])
    assert result.exit_code == 0, result.output
    stored = load_face_model(path).detector_bias
    assert stored is not None and json.loads(result.output.strip().splitlines()[-1])["samples"] == stored.n_samples
    bad = CliRunner().invoke(main, ["model", "calibrate", str(path), "--yaws", "10:0:5"])
    assert bad.exit_code == 2 and "--yaws" in bad.output
