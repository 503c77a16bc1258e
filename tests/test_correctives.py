"""Paper 004's corrective level: regularisers, the corrective fitter, the learned space, fit/export --level."""

from __future__ import annotations

import json
import shutil

import cv2
import numpy as np
import pytest
import torch
from click.testing import CliRunner

from facerecon.cli import main
from facerecon.errors import InputError
from facerecon.facemodel.corrective_space import CorrectiveSpace
from facerecon.facemodel.model import FaceModelError, load_face_model, save_face_model
from facerecon.facemodel.tensors import FaceModelTensors
from facerecon.fitting.camera import crop_intrinsics, model_to_camera
from facerecon.fitting.corrective_learning import LearnSettings, leading_modes, learn_corrective_space
from facerecon.fitting.correctives import CorrectiveFitter, CorrectiveSettings
from facerecon.fitting.optimize import FaceFitter, FaceTargets, FitSettings
from facerecon.losses.correctives import (
    chromaticity_weights,
    laplacian_smoothness,
    mesh_edges,
    random_vertex_pairs,
    reflectance_sparsity,
    skin_constancy,
    stabilization,
    vertex_degrees,
)
from facerecon.render.camera import project_points
from facerecon.render.renderer import MeshRenderer
from facerecon.stages.fit import FitOptions, _settings, face_level, read_fits
from facerecon.synthetic import random_parameters

# --------------------------------------------------------------------------- regularisers

#: two triangles sharing the edge (1, 2): a unit square
SQUARE = torch.tensor([[0, 1, 2], [2, 1, 3]])


def test_mesh_edges_are_unique_and_sorted():
    edges = mesh_edges(SQUARE)
    assert edges.tolist() == [[0, 1], [0, 2], [1, 2], [1, 3], [2, 3]]
    assert vertex_degrees(edges, 4).tolist() == [2, 3, 3, 2]
    keep = torch.tensor([True, True, True, False])
    assert mesh_edges(SQUARE, keep).tolist() == [[0, 1], [0, 2], [1, 2]]


def test_laplacian_smoothness_matches_the_per_vertex_sum():
    edges = mesh_edges(SQUARE)
    degree = vertex_degrees(edges, 4)
    field = torch.tensor([[[0.0], [1.0], [3.0], [-2.0]]])
    neighbours = {0: [1, 2], 1: [0, 2, 3], 2: [0, 1, 3], 3: [1, 2]}
    expected = sum(sum((field[0, i, 0] - field[0, j, 0]) ** 2 for j in js) / len(js)
                   for i, js in neighbours.items()) / 4
    assert torch.allclose(laplacian_smoothness(field, edges, degree), torch.tensor([expected]))
    assert laplacian_smoothness(torch.ones(1, 4, 3), edges, degree).item() == 0.0


def test_chromaticity_weights_follow_the_photo_colour():
    edges = mesh_edges(SQUARE)
    same = torch.tensor([[[0.6, 0.4, 0.3]] * 4])
    assert torch.allclose(chromaticity_weights(same, edges), torch.ones(1, 5))
    darker = same.clone()
    darker[0, 3] *= 0.5  # shading: the same chromaticity
    assert torch.allclose(chromaticity_weights(darker, edges), torch.ones(1, 5), atol=0.05)
    green = same.clone()
    green[0, 3] = torch.tensor([0.1, 0.8, 0.1])
    weights = chromaticity_weights(green, edges)
    assert weights[0, 3] < 0.01 and weights[0, 0] == 1.0  # edges (1, 3) and (2, 3) cross a colour edge
    hidden = torch.tensor([[True, True, True, False]])
    assert torch.allclose(chromaticity_weights(green, edges, hidden), torch.ones(1, 5))


def test_reflectance_sparsity_prefers_one_sharp_edge_to_a_ramp():
    # a path 0-1-2-3 with a step of 1 between two values: one edge of 1 (sharp) or three of 1/3 (ramp)
    edges = torch.tensor([[0, 1], [1, 2], [2, 3]])
    weights = torch.ones(1, 3)
    sharp = torch.tensor([[[0.0] * 3, [0.0] * 3, [0.0] * 3, [1.0] * 3]])
    ramp = torch.tensor([[[0.0] * 3, [1 / 3] * 3, [2 / 3] * 3, [1.0] * 3]])
    assert reflectance_sparsity(sharp, edges, weights) < reflectance_sparsity(ramp, edges, weights)
    assert reflectance_sparsity(torch.zeros(1, 4, 3), edges, weights).item() < 1e-4
    # a chromaticity weight near 0 makes an edge free
    assert reflectance_sparsity(sharp, edges, torch.tensor([[1.0, 1.0, 0.0]])).item() < 1e-4


def test_skin_constancy_and_stabilization():
    skin = torch.tensor([0, 2, 3])
    pairs = random_vertex_pairs(skin, samples=6, seed=1)
    assert pairs.shape == (18, 2) and set(pairs.flatten().tolist()) <= {0, 2, 3}
    assert torch.equal(pairs, random_vertex_pairs(skin, samples=6, seed=1))
    uniform = torch.full((1, 4, 3), 0.5)
    assert skin_constancy(uniform, pairs, 3).item() == 0.0
    uniform[0, 1] = 0.0  # vertex 1 is not skin: free
    assert skin_constancy(uniform, pairs, 3).item() == 0.0
    uniform[0, 3] = 0.0
    assert skin_constancy(uniform, pairs, 3).item() > 0.0
    field = torch.tensor([[[3.0, 4.0, 0.0], [0.0, 0.0, 0.0]]])
    assert stabilization(field).item() == pytest.approx(12.5)
    assert stabilization(field, torch.tensor([True, False])).item() == pytest.approx(25.0)


def test_leading_modes_reproduce_a_low_rank_collection():
    generator = torch.Generator().manual_seed(0)
    fields = torch.randn(6, 2, generator=generator, dtype=torch.float64) @ \
        torch.randn(2, 30, generator=generator, dtype=torch.float64)
    coefficients, basis = leading_modes(fields, 2)
    assert torch.allclose(coefficients @ basis, fields, atol=1e-9)
    assert torch.allclose(coefficients.pow(2).mean(dim=0), torch.ones(2, dtype=torch.float64))


# --------------------------------------------------------------------------- the fitter on renders

SIZE = 128


@pytest.fixture(scope="module")
def scene(ict_model):
    """Two rendered faces whose reflectance has a darker patch on the right cheek that the model's
    albedo space cannot make, and a green occluder over the forehead (skin attention 0 there).
    The base level is the true model parameters."""
    generator = torch.Generator().manual_seed(5)
    params = random_parameters(FaceModelTensors(ict_model), 2, generator, yaw_degrees=0.0, pitch_degrees=0.0)
    params = {n: t.to(torch.float64) for n, t in params.items()}
    tensors = FaceModelTensors(ict_model, dtype=torch.float64)
    verts = tensors.shape(params["identity"], params["expression"])
    mean = ict_model.mean_shape
    skin = np.asarray(ict_model.regions["skin"])
    eye_y = mean[ict_model.landmarks68[36:48], 1].mean()
    cheek = skin[(mean[skin, 0] < -25) & (mean[skin, 0] > -50) & (mean[skin, 1] < eye_y - 15) &
                 (mean[skin, 1] > eye_y - 45)]
    albedo = tensors.albedo(params["albedo"])
    mark = torch.zeros_like(albedo)
    mark[:, cheek] = torch.tensor([-0.12, -0.1, -0.08], dtype=torch.float64)
    cam = model_to_camera(verts, params["angles"], params["translation"])
    k = crop_intrinsics(SIZE, 2, dtype=torch.float64)
    out = MeshRenderer((SIZE, SIZE), backend="torch").render(cam, tensors.triangles, k, albedo + mark, params["sh"])
    images = torch.where(out.mask[..., None], out.image.clamp(0, 1), torch.full_like(out.image, 0.3))
    # the occluder: the forehead between the brows' height + 12 mm and + 30 mm
    brow_y = mean[ict_model.landmarks68[17:27], 1].mean()
    forehead = skin[(np.abs(mean[skin, 0]) < 25) & (mean[skin, 1] > brow_y + 12) & (mean[skin, 1] < brow_y + 30)]
    uv = project_points(cam[:, forehead], k)[..., :2]
    attention = torch.ones(2, SIZE, SIZE, dtype=torch.float64)
    for i in range(2):
        x0, y0 = uv[i].min(dim=0).values.floor().long().tolist()
        x1, y1 = uv[i].max(dim=0).values.ceil().long().tolist()
        images[i, y0:y1 + 1, x0:x1 + 1] = torch.tensor([0.1, 0.8, 0.1], dtype=torch.float64)
        attention[i, y0:y1 + 1, x0:x1 + 1] = 0.0
    landmarks = project_points(tensors.landmark_points(cam), k)[..., :2]
    targets = FaceTargets(images, landmarks, None, attention)
    base = FaceFitter(tensors, ict_model.regions, FitSettings(detector_bias_iterations=0))
    return tensors, params, targets, base, cheek, forehead, mark


def test_free_form_correctives_paint_the_mark_but_not_the_occluder(scene, ict_model):
    tensors, params, targets, base, cheek, forehead, mark = scene
    fitter = CorrectiveFitter(base, ict_model.regions, CorrectiveSettings(steps=60))
    result = fitter.fit(targets, {n: v.numpy() for n, v in params.items()})
    assert not result.failed.any() and result.steps > 0
    losses = result.losses
    assert (losses["photometric_trusted_final"] < 0.75 * losses["photometric_trusted_base"]).all(), losses
    assert (losses["photometric_face_final"] < losses["photometric_face_base"]).all(), losses
    # the patch is in the reflectance: a good part of its darkening (skin constancy holds the rest back)
    recovered = result.reflectance[:, cheek].mean(axis=1)
    assert (recovered < 0.3 * mark[0, cheek[0]].numpy()).all(), recovered
    # the occluder is not: the forehead's green stays within a small fraction of the occluder's pull
    forehead_change = result.reflectance[:, forehead]
    assert np.abs(forehead_change).mean() < 0.04, np.abs(forehead_change).mean()
    assert (forehead_change[..., 1] - forehead_change[..., 0]).mean() < 0.03
    # the geometry moves little (the base geometry is the truth) and stays zero off the rendered region
    assert np.linalg.norm(result.geometry, axis=-1).max() < 4.0
    outside = np.setdiff1d(np.arange(ict_model.n_vertices), ict_model.regions["photometric"])
    assert np.all(result.geometry[:, outside] == 0) and np.all(result.reflectance[:, outside] == 0)


def test_without_the_skin_weighting_the_occluder_is_painted_in(scene, ict_model):
    """The check that the test above measures something: with the attention ignored, the
    correctives do paint the green occluder into the forehead's reflectance."""
    tensors, params, targets, base, cheek, forehead, mark = scene
    trusting = FaceTargets(targets.crops, targets.landmarks68, None, torch.ones_like(targets.attention))
    fitter = CorrectiveFitter(base, ict_model.regions, CorrectiveSettings(steps=60, outlier_scale=0.0))
    result = fitter.fit(trusting, {n: v.numpy() for n, v in params.items()})
    forehead_change = result.reflectance[:, forehead]
    assert (forehead_change[..., 1] - forehead_change[..., 0]).mean() > 0.1


def test_a_learned_space_fits_its_coefficients(scene, ict_model):
    tensors, params, targets, base, cheek, forehead, mark = scene
    n = ict_model.n_vertices
    geometry = np.zeros((1, n, 3), np.float32)
    geometry[0, :, 2] = 0.01
    space = CorrectiveSpace(geometry, mark[:1].numpy().astype(np.float32), photos=1)
    fitter = CorrectiveFitter(base, ict_model.regions, CorrectiveSettings(steps=60, coefficient_step=0.1), space)
    assert fitter.kind == "learned"
    result = fitter.fit(targets, {k: v.numpy() for k, v in params.items()})
    assert result.coefficients["reflectance"].shape == (2, 1)
    # the patch's mode comes in with a clearly positive weight (skin constancy holds part of it back)
    weight = result.coefficients["reflectance"][:, 0]
    assert np.all((weight > 0.2) & (weight < 1.2)), result.coefficients
    assert (result.losses["photometric_face_final"] < result.losses["photometric_face_base"]).all()
    assert np.allclose(result.reflectance, np.einsum("bc,cnk->bnk", result.coefficients["reflectance"],
                                                     space.reflectance), atol=1e-6)


def test_a_failed_base_fit_gets_no_correctives(scene, ict_model):
    tensors, params, targets, base, *_ = scene
    broken = {n: v.numpy().copy() for n, v in params.items()}
    broken["identity"][1] = np.nan
    fitter = CorrectiveFitter(base, ict_model.regions, CorrectiveSettings(steps=3))
    result = fitter.fit(targets, broken)
    assert result.failed.tolist() == [False, True]
    assert np.all(result.reflectance[1] == 0) and np.isnan(result.losses["photometric_final"][1])
    everything = fitter.fit(targets, broken, failed=np.array([True, True]))
    assert everything.failed.all() and everything.steps == 0


def test_learning_recovers_a_shared_mark(scene, ict_model):
    tensors, params, targets, base, cheek, forehead, mark = scene
    fitter = CorrectiveFitter(base, ict_model.regions, CorrectiveSettings(steps=30))
    space, coefficients, stats = learn_corrective_space(
        fitter, targets, {n: v.numpy() for n, v in params.items()}, None,
        LearnSettings(geometry_modes=1, reflectance_modes=1, steps=10, batch_size=2))
    assert space.geometry.shape == (1, ict_model.n_vertices, 3) and space.photos == 2
    assert coefficients["reflectance"].shape == (2, 1)
    assert np.allclose(np.sqrt((coefficients["reflectance"] ** 2).mean(axis=0)), 1.0, atol=1e-5)
    # the objective falls (in this scene the skin-constancy prior outweighs the small photometric error, so
    # the photometric error alone need not)
    assert stats["total_learned"] < 0.9 * stats["total_base"], stats
    # the one reflectance mode darkens the cheek (in either sign convention of its coefficient)
    field = coefficients["reflectance"][0, 0] * space.reflectance[0]
    assert field[cheek].mean() < -0.05


def test_corrective_settings_reject_bad_values():
    with pytest.raises(InputError):
        CorrectiveSettings(steps=-1)
    with pytest.raises(InputError):
        CorrectiveSettings(constancy=float("nan"))
    with pytest.raises(InputError):
        CorrectiveSettings(p=0.0)
    with pytest.raises(InputError):
        LearnSettings(geometry_modes=0)


# --------------------------------------------------------------------------- the face-model file


def test_corrective_space_is_stored_with_the_face_model(ict_model, tmp_path):
    import dataclasses

    n = ict_model.n_vertices
    rng = np.random.default_rng(0)
    space = CorrectiveSpace(rng.normal(size=(2, n, 3)).astype(np.float32),
                            rng.normal(size=(3, n, 3)).astype(np.float32), photos=7, description="test")
    path = save_face_model(dataclasses.replace(ict_model, correctives=space), tmp_path / "fml.h5")
    loaded = load_face_model(path)
    assert np.array_equal(loaded.correctives.geometry, space.geometry)
    assert np.array_equal(loaded.correctives.reflectance, space.reflectance)
    assert loaded.correctives.photos == 7 and loaded.correctives.digest() == space.digest()
    info = loaded.summary()["correctives"]
    assert info == {"geometry_modes": 2, "reflectance_modes": 3, "photos": 7, "digest": space.digest(),
                    "description": "test"}
    assert load_face_model(save_face_model(ict_model, tmp_path / "plain.h5")).correctives is None
    result = CliRunner().invoke(main, ["model", "info", str(path), "--json"])
    assert result.exit_code == 0 and json.loads(result.output)["correctives"]["reflectance_modes"] == 3
    result = CliRunner().invoke(main, ["model", "info", str(path)], terminal_width=200)
    assert result.exit_code == 0 and "correctives" in result.output
    with pytest.raises(FaceModelError, match="correctives geometry"):
        dataclasses.replace(ict_model, correctives=CorrectiveSpace(space.geometry[:, :10], space.reflectance)
                            ).validate()


# --------------------------------------------------------------------------- fit / export / learn


def test_a_base_level_fit_keeps_its_settings():
    base = FitOptions(level="base")
    assert base.fit_level == "base" and FitOptions(level="final").fit_level == "final"

    class Model:
        model_id, detector_bias, correctives = "m", None, None

    assert "level" not in _settings(base, Model()) and "correctives" not in _settings(base, Model())
    final = _settings(FitOptions(level="final"), Model())
    assert final["level"] == "final" and final["corrective_space"] == "free"


FAST = ["--steps", "20", "30", "4", "--no-perceptual", "--format", "obj", "--texture-size", "64", "--json",
        "--quiet"]


@pytest.fixture(scope="module")
def two_level_fits(ict_embedded_model_file, astronaut_path, tmp_path_factory):
    """The astronaut and its mirror image fitted at both levels (same fast settings)."""
    photos = tmp_path_factory.mktemp("photos")
    shutil.copy(astronaut_path, photos / "astronaut.png")
    image = cv2.imread(str(astronaut_path))
    cv2.imwrite(str(photos / "mirrored.png"), image[:, ::-1])
    runs = {}
    for level in ("base", "final"):
        out = tmp_path_factory.mktemp(level)
        result = CliRunner().invoke(main, ["fit", str(photos), "--out", str(out), "--face-model",
                                           str(ict_embedded_model_file), "--level", level, *FAST])
        assert result.exit_code == 0, result.output
        runs[level] = (out, json.loads(result.output[result.output.index("{"):]))
    return photos, runs


def _faces(fits):
    return {key: faces[0] for key, _attrs, faces in read_fits(fits)}


def test_fit_final_level_stores_both_levels(two_level_fits):
    _photos, runs = two_level_fits
    out, data = runs["final"]
    assert data["faces_fitted"] == 2
    assert any("free-form correctives" in note for note in data["notes"])
    base_faces = _faces(runs["base"][0] / "fits.h5")
    for key, face in _faces(out / "fits.h5").items():
        attrs = face["attrs"]
        assert attrs["level"] == "final"
        losses = json.loads(attrs["losses"])
        assert losses["photometric_face_final"] < 0.85 * losses["photometric_face_base"], losses
        assert losses["photometric_final"] < losses["photometric_base"]
        assert {"corrective_smoothness", "reflectance_sparsity", "skin_constancy"} <= set(losses)
        assert json.loads(attrs["steps"])["correctives"] > 0
        assert face["corrective_geometry"].shape == face["vertices"].shape
        assert np.allclose(face["vertices"], face["vertices_base"] + face["corrective_geometry"], atol=1e-3)
        assert not np.allclose(face["albedo_colors"], face["albedo_colors_base"])
        # the base level of a final fit is the base-level fit, bit for bit
        plain = base_faces[key]
        assert "level" not in plain["attrs"] and "vertices_base" not in plain
        for name in ("vertices", "vertices_camera", "texture", "albedo_colors", "landmarks68"):
            assert np.array_equal(face[f"{name}_base"], plain[name]), name
        for name in ("identity", "expression", "albedo", "sh", "angles", "translation"):
            assert np.array_equal(face[name], plain[name]), name
        assert face_level(face, "base")["vertices"] is face["vertices_base"]
        assert face_level(plain, "final") is None and face_level(plain, None) is plain
        assert attrs["landmark_error_px_base"] == plain["attrs"]["landmark_error_px"]
    assert sorted(p.name for p in (out / "overlays").glob("astronaut_face0*")) == [
        "astronaut_face0.png", "astronaut_face0_levels.png"]
    assert not list((runs["base"][0] / "overlays").glob("*_levels.png"))


def test_fit_level_final_needs_lambert_shading(astronaut_path, tmp_path):
    result = CliRunner().invoke(main, ["fit", str(astronaut_path), "--out", str(tmp_path / "x"), "--level", "final",
                                       "--shading", "blinn-phong"])
    assert result.exit_code == 2 and "--shading lambert" in result.output
    with pytest.raises(InputError, match="lambert"):
        from facerecon.fitting.optimize import paper002_settings
        from facerecon.stages.fit import check_level

        check_level(FitOptions(level="final", settings=paper002_settings()))
    assert FitOptions(settings=paper002_settings()).fit_level == "base"


def test_export_picks_the_level(two_level_fits, tmp_path):
    import trimesh

    _photos, runs = two_level_fits
    fits = runs["final"][0] / "fits.h5"
    faces = _faces(fits)
    key = next(k for k in faces if k.endswith("astronaut.png"))
    for level, array in (("base", "vertices_base"), ("final", "vertices"), (None, "vertices")):
        out = tmp_path / str(level)
        args = ["export", str(fits), "--out", str(out), "--format", "ply", "--json"]
        result = CliRunner().invoke(main, args + (["--level", level] if level else []))
        assert result.exit_code == 0, result.output
        mesh = trimesh.load(next(out.rglob("astronaut_face0.ply")), force="mesh", process=False)
        assert np.allclose(mesh.vertices, faces[key][array], atol=1e-4), level
    result = CliRunner().invoke(main, ["export", str(runs["base"][0] / "fits.h5"), "--out", str(tmp_path / "b"),
                                       "--level", "final", "--json"])
    assert result.exit_code == 1 and "base level only" in result.output


def test_learn_correctives_writes_a_model_that_fits_use(two_level_fits, ict_embedded_model_file, tmp_path):
    photos, runs = two_level_fits
    out_model = tmp_path / "fml.h5"
    result = CliRunner().invoke(main, ["model", "learn-correctives", str(runs["base"][0] / "fits.h5"),
                                       "--face-model", str(ict_embedded_model_file), "--out", str(out_model),
                                       "--geometry-modes", "1", "--reflectance-modes", "2", "--steps", "5",
                                       "--json"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.output[result.output.index("{"):])
    assert summary["photos"] == 2 and summary["reflectance_modes"] == 2
    assert summary["photometric_face_learned"] < summary["photometric_face_base"]
    model = load_face_model(out_model)
    assert model.correctives.n_geometry == 1 and model.correctives.n_reflectance == 2
    again = CliRunner().invoke(main, ["model", "learn-correctives", str(runs["base"][0] / "fits.h5"),
                                      "--face-model", str(ict_embedded_model_file), "--out", str(out_model)])
    assert again.exit_code == 1 and "--force" in again.output
    # a final-level fit with that model solves the learned space's coefficients
    out = tmp_path / "fit"
    result = CliRunner().invoke(main, ["fit", str(photos / "astronaut.png"), "--out", str(out), "--face-model",
                                       str(out_model), "--level", "final", *FAST])
    assert result.exit_code == 0, result.output
    face = next(iter(_faces(out / "fits.h5").values()))
    assert face["corrective_reflectance_coefficients"].shape == (2,)
    stored = next(iter(read_fits(out / "fits.h5")))[1]["settings"]
    stored = json.loads(stored) if isinstance(stored, str) else stored
    assert stored["corrective_space"] == f"learned:{model.correctives.digest()}"
