"""Fitting (method optimize), its outputs and the fit / export commands."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
import trimesh
from click.testing import CliRunner

from facerecon.cli import main
from facerecon.evaluation.geometry import umeyama
from facerecon.facemodel.embedding import face_oval_indices
from facerecon.facemodel.tensors import FaceModelTensors
from facerecon.fitting.optimize import FaceFitter, FaceTargets, FitSettings
from facerecon.stages.fit import FitOptions, read_fits, run_fit
from facerecon.synthetic import random_parameters, render_faces, textured_backgrounds
from tests.conftest import REPO_ROOT


@pytest.fixture(scope="module")
def synthetic_fit(ict_embedded_model):
    tensors = FaceModelTensors(ict_embedded_model)
    generator = torch.Generator().manual_seed(3)
    params = random_parameters(tensors, 2, generator, pitch_degrees=0.0)
    params["angles"][:, 1] = torch.deg2rad(torch.tensor([0.0, 30.0]))
    batch = render_faces(tensors, params, 224, textured_backgrounds(2, 224, generator))
    targets = FaceTargets(batch.images, batch.landmarks68, batch.dense, torch.ones(2, 224, 224))
    fitter = FaceFitter(tensors, ict_embedded_model.regions, FitSettings(), oval_indices=face_oval_indices())
    return params, batch, fitter, fitter.fit(targets), targets


def test_fit_recovers_pose_and_landmarks(synthetic_fit):
    params, batch, fitter, result, _ = synthetic_fit
    assert not result.failed.any()
    angle_error = np.rad2deg(np.abs(result.parameters["angles"] - params["angles"].numpy()))
    assert angle_error.max() < 2.0, angle_error
    assert result.landmark_error_px.max() < 1.0, result.landmark_error_px
    assert result.losses["photometric"].max() < 0.05


def test_fit_beats_the_mean_face(synthetic_fit, ict_embedded_model):
    params, batch, fitter, result, _ = synthetic_fit
    tensors = fitter.model
    fitted = tensors.shape(torch.as_tensor(result.parameters["identity"]),
                           torch.as_tensor(result.parameters["expression"])).numpy()
    truth = batch.vertices.numpy()
    region = ict_embedded_model.regions["photometric"]

    def aligned_error(a, b):
        a, b = a[region], b[region]
        return np.median(np.linalg.norm(umeyama(a, b).apply(a) - b, axis=1))

    for i in range(2):
        baseline = aligned_error(ict_embedded_model.mean_shape, truth[i])
        assert aligned_error(fitted[i], truth[i]) < 0.75 * baseline


def test_diverging_face_is_marked_failed(synthetic_fit):
    params, batch, fitter, _, targets = synthetic_fit
    broken = FaceTargets(targets.crops.clone(), targets.landmarks68.clone(), targets.dense.clone(),
                         targets.attention)
    broken.landmarks68[1] = float("nan")
    fast = FaceFitter(fitter.model, {"photometric": np.arange(fitter.model.n_vertices),
                                     "skin": np.arange(100)}, FitSettings(landmark_steps=5, coarse_steps=3,
                                                                          fine_steps=0))
    result = fast.fit(broken)
    assert not result.failed[0] and result.failed[1]
    assert "invalid" in result.reasons[1]
    assert np.isfinite(result.parameters["identity"][0]).all()
    # a face whose optimisation explodes is reset, retried, then marked failed
    exploding = FitSettings(landmark_steps=3, coarse_steps=4, fine_steps=0, learning_rate=1e6, max_retries=1,
                            warmup_steps=0)
    regions = {"photometric": np.arange(fitter.model.n_vertices), "skin": np.arange(100)}
    result = FaceFitter(fitter.model, regions, exploding).fit(targets)
    assert result.failed.all() and all("diverged" in r for r in result.reasons)


@pytest.fixture(scope="module")
def fitted_photo(ict_embedded_model_file, astronaut_path, tmp_path_factory):
    photos = tmp_path_factory.mktemp("photos")
    shutil.copy(astronaut_path, photos / "astronaut.png")
    (photos / "notes.jpg").write_text("not an image")
    out = tmp_path_factory.mktemp("fit")
    result = CliRunner().invoke(main, ["fit", str(photos), "--out", str(out), "--face-model",
                                       str(ict_embedded_model_file), "--format", "obj,ply,glb",
                                       "--texture-size", "256", "--json", "--quiet"])
    return photos, out, result


def test_fit_command_on_a_real_photo(fitted_photo):
    photos, out, result = fitted_photo
    assert result.exit_code == 0, result.output
    data = json.loads(result.output[result.output.index("{"):])
    assert data["faces_fitted"] == 1 and data["images_failed"] == 1
    assert any("notes.jpg" in f["key"] for f in data["failures"])
    assert data["median_landmark_error_iod"] < 0.08
    meshes = sorted((out / "meshes").rglob("astronaut_face0.*"))
    suffixes = {p.suffix for p in meshes}
    assert {".obj", ".mtl", ".ply", ".glb"} <= suffixes
    for path in meshes:
        if path.suffix in (".obj", ".ply", ".glb"):
            loaded = trimesh.load(path, force="mesh")
            assert len(loaded.faces) == 18460 and np.isfinite(loaded.vertices).all()
    obj = trimesh.load(next(p for p in meshes if p.suffix == ".obj"), force="mesh")
    extent = obj.vertices.max(0) - obj.vertices.min(0)
    assert 120 < extent[0] < 260  # millimetres: a head is ~15-20 cm wide
    assert (out / "contact_sheet.png").is_file()
    assert next((out / "overlays").rglob("astronaut_face0.png")).is_file()


def test_fits_file_holds_parameters_and_is_resumable(fitted_photo, ict_embedded_model_file):
    photos, out, _ = fitted_photo
    entries = {key: (attrs, faces) for key, attrs, faces in read_fits(out / "fits.h5")}
    key = next(k for k in entries if k.endswith("astronaut.png"))
    attrs, faces = entries[key]
    assert attrs["status"] == "ok" and attrs["model_id"] == "ict-face-light"
    face = faces[0]
    assert face["identity"].shape == (100,) and face["sh"].shape == (27,)
    assert face["vertices"].shape == (9409, 3) and np.isfinite(face["vertices"]).all()
    assert face["texture"].shape == (256, 256, 3)
    # the fit's own 68 landmarks: the stored photo points are the projection of the stored 3D points
    # (the definition the fit aligns), and they sit on the detected face
    from facerecon.evaluation.landmarks import landmark_points68, project_to_photo
    from facerecon.facemodel.model import load_face_model

    model = load_face_model(ict_embedded_model_file)
    assert face["landmarks68"].shape == (68, 2) and face["landmarks68_3d"].shape == (68, 3)
    assert np.allclose(face["landmarks68_3d"], landmark_points68(model, face["vertices"]), atol=1e-3)
    expected = project_to_photo(landmark_points68(model, face["vertices_camera"]), face["intrinsics"],
                                face["align_matrix"])
    assert np.abs(face["landmarks68"] - expected).max() < 0.05
    eye_distance = np.linalg.norm(expected[36:42].mean(0) - expected[42:48].mean(0))
    assert not np.allclose(face["landmarks68_3d"], face["vertices"][model.landmarks68], atol=0.5)
    assert eye_distance > 10
    rerun = run_fit([str(photos)], out, FitOptions(face_model=str(ict_embedded_model_file), texture_size=256))
    assert rerun.images[key] == "skipped" and not rerun.faces


def test_interrupted_fit_keeps_finished_images(ict_embedded_model_file, astronaut_path, tmp_path):
    photos = tmp_path / "photos"
    photos.mkdir()
    for name in ("a.png", "b.png"):
        shutil.copy(astronaut_path, photos / name)
    options = FitOptions(face_model=str(ict_embedded_model_file), batch_size=1, texture_size=128, overlays=False,
                         settings=FitSettings(landmark_steps=20, coarse_steps=5, fine_steps=0))
    parts = tmp_path / "out" / "fits.h5.parts"

    def stop_after_first_image() -> bool:  # the topology item and one image are stored
        return parts.is_dir() and len(list(parts.glob("*.h5"))) >= 2

    first = run_fit([str(photos)], tmp_path / "out", options, should_stop=stop_after_first_image)
    assert first.interrupted and first.exit_code == 130
    assert list(first.images.values()).count("ok") == 1
    with h5py.File(tmp_path / "out" / "fits.h5") as f:
        assert len([k for k in f["images"] if not k.startswith("@")]) == 1
    second = run_fit([str(photos)], tmp_path / "out", options)
    assert sorted(second.images.values()) == ["ok", "skipped"]


def test_ctrl_c_stops_a_running_fit_with_130(ict_embedded_model_file, astronaut_path, tmp_path):
    import os
    import signal
    import subprocess
    import sys
    import time

    photos = tmp_path / "photos"
    photos.mkdir()
    for i in range(3):
        shutil.copy(astronaut_path, photos / f"{i}.png")
    out = tmp_path / "out"
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT))
    process = subprocess.Popen([sys.executable, "-m", "facerecon", "fit", str(photos), "--out", str(out),
                                "--face-model", str(ict_embedded_model_file), "--batch-size", "1", "--quiet",
                                "--texture-size", "128", "--steps", "40", "400", "400"],
                               env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 240
    while time.time() < deadline and not (out / "fits.h5.parts").is_dir():
        time.sleep(0.2)
    time.sleep(1.0)  # inside the first image's optimisation
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 130, stderr
    assert "interrupted" in stderr and "Traceback" not in stderr
    assert (out / "fits.h5").is_file() and not (out / "fits.h5.lock").exists()


def test_export_recreates_meshes_and_blendshapes(fitted_photo, tmp_path):
    _, out, _ = fitted_photo
    result = CliRunner().invoke(main, ["export", str(out / "fits.h5"), "--out", str(tmp_path), "--format", "ply",
                                       "--neutral", "--json"])
    assert result.exit_code == 0, result.output
    ply = next(tmp_path.rglob("astronaut_face0.ply"))
    neutral = trimesh.load(ply, force="mesh").vertices
    fits = {k: faces for k, _, faces in read_fits(out / "fits.h5")}
    face = next(f for k, f in fits.items() if k.endswith("astronaut.png"))[0]
    np.testing.assert_allclose(neutral, face["vertices_neutral"], atol=1e-3)
    weights = json.loads(next(tmp_path.rglob("*.blendshapes.json")).read_text())
    assert len(weights) == 53 and all(0.0 <= w <= 1.0 for w in weights.values())
    header, row = next(tmp_path.rglob("*.arkit.csv")).read_text().splitlines()
    assert header.startswith("Timecode,BlendShapeCount,EyeBlinkLeft") and len(row.split(",")) == 54


def test_fit_without_face_model_exits_cleanly(astronaut_path, tmp_path):
    result = CliRunner().invoke(main, ["fit", str(astronaut_path), "--out", str(tmp_path / "o"), "--quiet"])
    assert result.exit_code == 1
    assert "model fetch ict" in result.output and "Traceback" not in result.output


def test_fit_rejects_unknown_format(astronaut_path, tmp_path):
    result = CliRunner().invoke(main, ["fit", str(astronaut_path), "--out", str(tmp_path), "--format", "stl"])
    assert result.exit_code == 2 and "stl" in result.output


def test_fit_with_recognition_weights_uses_the_perceptual_loss(ict_embedded_model_file, astronaut_path, tmp_path):
    from facerecon.networks.iresnet import IResNet

    torch.manual_seed(0)
    weights = tmp_path / "backbone.pth"
    torch.save(IResNet("r18").state_dict(), weights)
    options = FitOptions(face_model=str(ict_embedded_model_file), texture_size=128, overlays=False,
                         recognition_weights=str(weights),
                         settings=FitSettings(landmark_steps=20, coarse_steps=3, fine_steps=2))
    summary = run_fit([str(astronaut_path)], tmp_path / "out", options)
    assert any("perceptual loss on" in note for note in summary.notes)
    faces = [f for _k, _a, fs in read_fits(tmp_path / "out" / "fits.h5") for f in fs]
    assert "perceptual" in json.loads(faces[0]["attrs"]["losses"])
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"x")
    result = CliRunner().invoke(main, ["fit", str(astronaut_path), "--out", str(tmp_path / "o2"), "--face-model",
                                       str(ict_embedded_model_file), "--recognition-weights", str(junk), "--quiet"])
    assert result.exit_code == 1 and "cannot read face-recognition weights" in result.output


def test_recognition_weights_without_the_perceptual_loss_is_a_usage_error(astronaut_path, tmp_path):
    weights = tmp_path / "backbone.pth"
    weights.write_bytes(b"never read")
    result = CliRunner().invoke(main, ["fit", str(astronaut_path), "--out", str(tmp_path / "o"),
                                       "--recognition-weights", str(weights), "--no-perceptual"])
    assert result.exit_code == 2, result.output
    error = [line for line in result.output.splitlines() if "Error" in line]
    assert len(error) == 1 and "--recognition-weights" in error[0] and "--no-perceptual" in error[0]
    assert not (tmp_path / "o").exists()


def test_output_names_keep_same_stem_photos_apart():
    from facerecon.stages.fit import output_base, output_names

    names = output_names(["a.jpg", "a.png", "sub/a.jpg", "my photo.jpg"])
    assert names == {"a.jpg": "a_jpg", "a.png": "a_png", "sub/a.jpg": "a", "my photo.jpg": "my_photo"}
    assert output_base(Path("out"), "sub/a.jpg", 2, "meshes", names) == Path("out/meshes/sub/a_face2")


def test_glb_is_in_metres_with_normals(fitted_photo):
    _, out, _ = fitted_photo
    obj = trimesh.load(next((out / "meshes").rglob("astronaut_face0.obj")), force="mesh")
    glb = trimesh.load(next((out / "meshes").rglob("astronaut_face0.glb")), force="mesh")
    np.testing.assert_allclose(glb.bounds, obj.bounds / 1000.0, atol=1e-5)
    radial = glb.vertices - glb.vertices.mean(0)
    assert ((glb.vertex_normals * radial).sum(1) > 0).mean() > 0.8  # smooth normals point outwards


def test_fit_refuses_a_file_that_is_not_a_detections_file(fitted_photo, ict_embedded_model_file, tmp_path):
    _, out, _ = fitted_photo
    result = CliRunner().invoke(main, ["fit", str(out / "fits.h5"), "--out", str(tmp_path), "--face-model",
                                       str(ict_embedded_model_file), "--quiet"])
    assert result.exit_code == 1 and "not a detections file" in result.output and "Traceback" not in result.output


def test_resume_refits_a_photo_whose_content_changed(ict_embedded_model_file, astronaut_path, tmp_path):
    from PIL import Image

    photos = tmp_path / "photos"
    photos.mkdir()
    shutil.copy(astronaut_path, photos / "a.png")
    options = FitOptions(face_model=str(ict_embedded_model_file), texture_size=64, overlays=False,
                         settings=FitSettings(landmark_steps=20, coarse_steps=3, fine_steps=0))
    assert run_fit([str(photos)], tmp_path / "out", options).images == {"a.png": "ok"}
    assert run_fit([str(photos)], tmp_path / "out", options).images == {"a.png": "skipped"}
    Image.open(astronaut_path).transpose(Image.FLIP_LEFT_RIGHT).save(photos / "a.png")
    assert run_fit([str(photos)], tmp_path / "out", options).images == {"a.png": "ok"}


def test_inner_mouth_can_be_left_out_of_the_photometric_term(ict_embedded_model):
    tensors = FaceModelTensors(ict_embedded_model)
    regions = ict_embedded_model.regions
    mouth = set(regions["inner_mouth"].tolist())
    default = FaceFitter(tensors, regions, FitSettings())
    without = FaceFitter(tensors, regions, FitSettings(exclude_inner_mouth=True))
    touches = lambda tris: any(v in mouth for v in tris.flatten().tolist())  # noqa: E731
    assert touches(default.photo_triangles) and not touches(without.photo_triangles)
    assert 0 < len(default.photo_triangles) - len(without.photo_triangles) < 0.2 * len(default.photo_triangles)


def test_landmark_trust_follows_the_photometric_error():
    from facerecon.losses.hybrid import landmark_trust

    error = torch.tensor([0.0, 0.015, 0.075, 0.15, 0.4])
    trust = landmark_trust(error, reference=0.15, power=2.0, minimum=0.01)
    assert trust[0] == pytest.approx(0.01) and trust[1] == pytest.approx(0.01)  # clamped at the minimum
    assert trust[2] == pytest.approx(0.25)  # (0.5) ** 2
    assert trust[3] == pytest.approx(1.0) and trust[4] == pytest.approx(1.0)  # a typical photo keeps the weight
    assert not landmark_trust(error.requires_grad_(), 0.15).requires_grad


def test_adaptive_trust_weakens_landmarks_only_on_well_explained_faces(synthetic_fit, ict_embedded_model):
    params, _, fitter, result, targets = synthetic_fit
    good = {n: torch.as_tensor(v) for n, v in result.parameters.items()}
    terms = fitter.losses(good, targets, 112)
    assert (terms["landmark_trust"] < 0.5).all()  # a render of the model itself: the image wins
    noisy = FaceTargets((targets.crops + 0.3 * torch.rand_like(targets.crops)).clamp(0, 1), targets.landmarks68,
                        targets.dense, targets.attention)
    assert (fitter.losses(good, noisy, 112)["landmark_trust"] == 1.0).all()
    full = FaceFitter(fitter.model, ict_embedded_model.regions, FitSettings(landmark_trust_reference=0.0))
    assert "landmark_trust" not in full.losses(good, targets, 112)


def test_a_photometric_stage_never_returns_a_face_worse_than_it_was_given(synthetic_fit, ict_embedded_model):
    _, _, fitter, result, targets = synthetic_fit
    good = {n: torch.as_tensor(v) for n, v in result.parameters.items()}
    # a step size large enough to throw every face off its optimum on the first step
    rough = FaceFitter(fitter.model, ict_embedded_model.regions,
                       FitSettings(coarse_steps=6, coarse_size=224, fine_steps=0, learning_rate=3.0, warmup_steps=0),
                       oval_indices=face_oval_indices())
    before = rough.losses({**good, "sh": rough.solve_light(good, targets, 224)}, targets, 224)["total"]
    after = rough.fit(targets, init=good)
    assert not after.failed.any()
    assert (after.losses["total"] <= before.numpy() * 1.001).all(), (after.losses["total"], before)


def test_command_line_step_defaults_match_the_fit_settings():
    from facerecon.cli.common import FIT_STEPS

    defaults = FitSettings()
    assert FIT_STEPS == (defaults.landmark_steps, defaults.coarse_steps, defaults.fine_steps)


@pytest.mark.parametrize("field, value", [
    ("detector_bias_mode", "typo"), ("shared_identity_prior", "once"), ("render_backend", "opengl"),
    ("landmark_steps", -1), ("coarse_steps", 2.5), ("patience", 0), ("coarse_size", 0), ("learning_rate", 0.0),
    ("learning_rate", float("nan")), ("landmark_trust_minimum", 0.0), ("tolerance", -1e-3),
    ("weights", {"photo": 1.0}),
])
def test_fit_settings_reject_bad_values_on_construction(field, value):
    from facerecon.errors import InputError

    with pytest.raises(InputError, match=field):
        FitSettings(**{field: value})


def test_render_backend_is_a_setting_in_the_digest(ict_model):
    from facerecon.stages.fit import FitOptions, _digest, _settings

    assert FitSettings().render_backend == "torch"  # never picked from the environment
    assert FitSettings(render_backend="auto").render_backend in ("torch", "pytorch3d")  # resolved, recorded
    torch_digest = _digest(_settings(FitOptions(settings=FitSettings(render_backend="torch")), ict_model))
    p3d = FitOptions(settings=FitSettings(render_backend="pytorch3d"))  # checked when a renderer is built
    assert _settings(p3d, ict_model)["fit"]["render_backend"] == "pytorch3d"
    assert _digest(_settings(p3d, ict_model)) != torch_digest


def test_network_method_fits_with_its_refine_steps_only():
    from facerecon.stages.fit import fitter_settings

    settings = FitSettings(coarse_steps=200, fine_steps=25)
    assert fitter_settings(FitOptions(settings=settings)) is settings
    network = fitter_settings(FitOptions(settings=settings, checkpoint="net.pt", refine=7))
    assert (network.coarse_steps, network.fine_steps, network.landmark_steps) == (7, 0, settings.landmark_steps)
    assert settings.coarse_steps == 200  # the options' settings are not changed


def test_network_method_builds_the_model_tensors_once(ict_embedded_model, ict_embedded_model_file, astronaut_path,
                                                      tmp_path, monkeypatch):
    from facerecon.networks.rnet import RNet
    from facerecon.stages import fit as fit_stage

    checkpoint = tmp_path / "rnet.pt"
    network = RNet(FaceModelTensors(ict_embedded_model), "resnet18")
    torch.save({"network": network.state_dict(), "architecture": "resnet18",
                "model_id": ict_embedded_model.model_id}, checkpoint)
    built = []

    class CountedTensors(FaceModelTensors):
        def __init__(self, *args, **kwargs):
            built.append(args)
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(fit_stage, "FaceModelTensors", CountedTensors)
    options = FitOptions(face_model=str(ict_embedded_model_file), checkpoint=str(checkpoint), texture_size=64,
                         overlays=False, recognition_weights=None, settings=FitSettings(landmark_steps=5))
    summary = run_fit([str(astronaut_path)], tmp_path / "out", options)
    assert list(summary.images.values()) == ["ok"] and any("method network" in n for n in summary.notes)
    assert len(built) == 1  # shared by the network and the fitter


def test_fit_state_is_a_documented_dataclass():
    from dataclasses import fields

    from facerecon.fitting.optimize import FitState

    names = {f.name for f in fields(FitState)}
    assert names == {"failed", "retries", "face_weights", "batch_lr_factor", "should_stop", "stopped"}
    for name in names:
        assert f"{name}:" in FitState.__doc__
    state = FitState(failed=torch.tensor([False, True]), retries=torch.zeros(2, dtype=torch.int64),
                     face_weights=torch.tensor([0.5, 1.0]), should_stop=lambda: True)
    assert state.live_weights(torch.float32).tolist() == [0.5, 0.0]
    assert state.poll_stop() and state.stopped


def test_fit_runs_in_the_model_dtype(synthetic_fit, ict_embedded_model):
    """A float64 model fits in float64 (parameters, losses) and lands where the float32 fit does."""
    _, _, fitter, _, targets = synthetic_fit
    settings = FitSettings(landmark_steps=20, coarse_steps=4, fine_steps=0)
    results = {}
    for dtype in (torch.float32, torch.float64):
        tensors = FaceModelTensors(ict_embedded_model, dtype=dtype)
        results[dtype] = FaceFitter(tensors, ict_embedded_model.regions, settings,
                                    oval_indices=face_oval_indices()).fit(targets)
    r32, r64 = results[torch.float32], results[torch.float64]
    assert not r64.failed.any()
    assert all(v.dtype == np.float64 for v in r64.parameters.values())
    assert all(v.dtype == np.float64 for v in r64.losses.values())
    assert np.abs(np.rad2deg(r64.parameters["angles"] - r32.parameters["angles"])).max() < 1.0
    assert np.abs(r64.landmark_error_px - r32.landmark_error_px).max() < 0.2


def test_an_internal_value_error_keeps_its_traceback(fitted_photo, ict_embedded_model_file, tmp_path, monkeypatch):
    """User mistakes (InputError) print one line; a ValueError from a bug (a shape mismatch) is not
    swallowed into an 'error:' line but propagates with its traceback."""
    from facerecon.errors import InputError

    _, out, _ = fitted_photo

    def shape_bug(self, *args, **kwargs):
        raise ValueError("operands could not be broadcast together with shapes (2, 68) (3, 68)")

    monkeypatch.setattr(FaceFitter, "fit", shape_bug)
    result = CliRunner().invoke(main, ["fit", str(out / "detections.h5"), "--out", str(tmp_path / "o"),
                                       "--face-model", str(ict_embedded_model_file), "--quiet", "--no-overlays"])
    assert type(result.exception) is ValueError and "broadcast" in str(result.exception)
    assert "error: operands" not in result.output
    # the user-facing errors are InputErrors, caught by the command line
    from facerecon.facemodel.model import FaceModelError
    from facerecon.io.store import StoreError
    from facerecon.training.config import ConfigError

    assert all(issubclass(e, InputError) for e in (FaceModelError, StoreError, ConfigError))



def test_two_face_fit_on_each_device(synthetic_fit, ict_embedded_model, device):
    """A short two-face fit runs on the device (CPU here; CUDA where present) and agrees with the CPU fit."""
    _, _, _, _, targets = synthetic_fit
    settings = FitSettings(landmark_steps=15, coarse_steps=3, fine_steps=1)

    def fit_on(dev):
        tensors = FaceModelTensors(ict_embedded_model).to(dev)
        return FaceFitter(tensors, ict_embedded_model.regions, settings,
                          oval_indices=face_oval_indices()).fit(targets.to(dev))

    result = fit_on(device)
    assert not result.failed.any() and result.parameters["identity"].shape[0] == 2
    assert np.isfinite(result.losses["total"]).all()
    if device.type != "cpu":
        reference = fit_on(torch.device("cpu"))
        assert np.abs(np.rad2deg(result.parameters["angles"] - reference.parameters["angles"])).max() < 0.5
        assert np.abs(result.landmark_error_px - reference.landmark_error_px).max() < 0.2
