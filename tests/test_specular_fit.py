"""Paper 002 in the fit: specular albedo space, losses, Blinn-Phong fitting, synth and CLI."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from facerecon.cli import main
from facerecon.detection.skin import skin_attention_image
from facerecon.evaluation.rendered import albedo_errors
from facerecon.facemodel.annotate import SPECULAR_BY_REGION, default_specular_space
from facerecon.facemodel.embedding import face_oval_indices
from facerecon.facemodel.model import load_face_model, save_face_model
from facerecon.facemodel.tensors import FaceModelTensors
from facerecon.fitting.optimize import (
    SPECULAR_PARAMETER_NAMES,
    FaceFitter,
    FaceTargets,
    FitSettings,
    blinn_phong_settings,
    paper002_settings,
)
from facerecon.losses.specular import (
    HEAVY_LANDMARKS_68_PAPER002,
    inner_mouth_loss,
    landmark_weights_68_paper002,
    light_chroma,
    skin_confidence,
    soft_polygon_mask,
)
from facerecon.stages.fit import read_fits
from facerecon.synthetic import random_parameters, render_faces, textured_backgrounds, to_uint8

# ------------------------------------------------------------------ losses


def test_skin_confidence_is_one_above_one_half_and_the_probability_below():
    p = torch.tensor([0.0, 0.2, 0.5, 0.51, 0.9])
    assert torch.equal(skin_confidence(p), torch.tensor([0.0, 0.2, 0.5, 1.0, 1.0]))


def test_light_chroma_is_zero_for_a_grey_light_and_grows_with_colour():
    grey = torch.zeros(1, 27)
    grey[:, [0, 9, 18]] = 1.0
    grey[:, [1, 10, 19]] = 0.3
    tinted = grey.clone()
    tinted[:, 0] += 0.2  # more red ambient
    assert light_chroma(grey).item() == pytest.approx(0.0, abs=1e-12)
    # (0.2 - 0.2/3)^2 + 2 (0.2/3)^2
    assert light_chroma(tinted).item() == pytest.approx((0.2 * 2 / 3) ** 2 + 2 * (0.2 / 3) ** 2)


def test_paper002_landmark_weights_favour_brows_and_outer_mouth():
    weights = landmark_weights_68_paper002()
    assert set(torch.nonzero(weights == 20).flatten().tolist()) == set(HEAVY_LANDMARKS_68_PAPER002)
    assert (weights[list(range(17))] == 1).all() and (weights[60:] == 1).all()


def test_soft_polygon_covers_the_polygon_area_and_its_gradient_moves_edges_towards_the_target():
    square = torch.tensor([[[10.0, 10.0], [30.0, 10.0], [30.0, 20.0], [10.0, 20.0]]], dtype=torch.float64)
    xs, ys = torch.arange(0, 40.0, dtype=torch.float64), torch.arange(0, 30.0, dtype=torch.float64)
    mask = soft_polygon_mask(square, xs, ys)
    assert mask[0, 15, 20] > 0.99 and mask[0, 2, 2] < 0.01
    # area: 200 px, pixel centres on the border count about a half
    assert mask.sum().item() == pytest.approx(200.0, rel=0.1)
    # a detected opening 2 px lower: the loss pulls the polygon down (+y)
    ring = square.clone().requires_grad_(True)
    detected = torch.zeros(1, 64, 64, dtype=torch.float64)
    detected[0, 12:23, 10:31] = 1.0
    loss = inner_mouth_loss(ring, detected)
    loss.backward()
    assert loss.item() > 10
    assert (ring.grad[0, :, 1] < 0).all()  # descending moves every vertex towards +y
    moved = inner_mouth_loss(square + torch.tensor([0.0, 2.0], dtype=torch.float64), detected)
    assert moved.item() < loss.item() / 2


def test_inner_mouth_loss_of_a_closed_mouth_is_small():
    line = torch.tensor([[[10.0, 20.0], [20.0, 20.0], [30.0, 20.0], [20.0, 20.0]]])
    open_mouth = torch.tensor([[[10.0, 20.0], [20.0, 14.0], [30.0, 20.0], [20.0, 26.0]]])
    closed = torch.zeros(1, 64, 64)
    assert inner_mouth_loss(line, closed).item() < 0.2 * inner_mouth_loss(open_mouth, closed).item()


# ------------------------------------------------------------------ face model


def test_ict_import_stores_a_plausible_grey_specular_space(ict_model, tmp_path):
    assert ict_model.specular_kind == "default"
    mean, basis = ict_model.specular_mean, ict_model.specular_basis
    assert mean.shape == (ict_model.n_vertices, 3) and basis.shape[1:] == (ict_model.n_vertices, 3)
    assert np.allclose(mean[:, 0], mean[:, 1]) and np.allclose(mean[:, 0], mean[:, 2])  # grey
    regions = ict_model.regions
    assert mean[regions["nose"], 0].mean() > mean[regions["skin"], 0].mean() > mean[regions["brows"], 0].mean()
    assert 0.5 * SPECULAR_BY_REGION["skin"] < np.median(mean[regions["skin"], 0]) < 2 * SPECULAR_BY_REGION["t_zone"]
    loaded = load_face_model(save_face_model(ict_model, tmp_path / "m.h5"))
    assert loaded.specular_kind == "default"
    assert np.array_equal(loaded.specular_basis, basis) and np.array_equal(loaded.specular_mean, mean)
    assert loaded.summary()["specular_coefficients"] == len(basis)


def test_a_model_without_a_specular_space_gets_the_default_one(ict_model):
    from dataclasses import replace

    bare = replace(ict_model, specular_mean=None, specular_basis=None, specular_kind="none")
    mean, basis, kind = bare.specular_space()
    assert kind == "default"
    expected = default_specular_space(ict_model.mean_shape, ict_model.triangles, ict_model.regions,
                                      ict_model.landmarks68)
    assert np.array_equal(mean, expected[0]) and np.array_equal(basis, expected[1])
    tensors = FaceModelTensors(bare)
    values = tensors.specular(torch.full((2, tensors.n_specular), -50.0))
    assert values.shape == (2, ict_model.n_vertices, 3) and values.min() >= 0  # clamped: no negative reflectance


def test_settings_validate_the_shading_and_paper002_preset():
    with pytest.raises(Exception, match="shading"):
        FitSettings(shading="phong")
    assert FitSettings().shading == "lambert"  # paper 000's fit stays the default (docs/fitting.md)
    preset = paper002_settings(coarse_steps=3)
    assert preset.shading == "blinn-phong" and preset.coarse_steps == 3 and preset.uniform_light_weight == 1.0
    measured = blinn_phong_settings()
    assert measured.uniform_light_weight == 0.0 and measured.weights == preset.weights
    assert preset.weights["photo"] == 1.92 and preset.weights["landmark"] == 1.8e-3
    assert preset.inner_mouth_weight == 1.3e-3 and preset.landmark_weighting == "paper002"
    assert set(SPECULAR_PARAMETER_NAMES) <= set(preset.parameter_names)
    assert not set(SPECULAR_PARAMETER_NAMES) & set(FitSettings().parameter_names)


# ------------------------------------------------------------------ synth and fit


def test_specular_synthesis_only_adds_highlights(ict_embedded_model):
    tensors = FaceModelTensors(ict_embedded_model)
    plain = random_parameters(tensors, 2, torch.Generator().manual_seed(4))
    shiny = random_parameters(tensors, 2, torch.Generator().manual_seed(4), specular=True)
    for name in plain:
        assert torch.equal(plain[name], shiny[name])
    a = render_faces(tensors, plain, 96, zoom=0.8)
    b = render_faces(tensors, shiny, 96, zoom=0.8)
    assert (b.images >= a.images - 1e-6).all()  # light only adds (before the clamp to 1)
    assert (b.images - a.images).max() > 0.1


@pytest.fixture(scope="module")
def highlight_fits(ict_embedded_model):
    """A frontal face with a strong highlight, fitted with both shadings (skin attention from the
    colour model, as the detect stage computes it)."""
    tensors = FaceModelTensors(ict_embedded_model)
    generator = torch.Generator().manual_seed(5)
    params = random_parameters(tensors, 1, generator, pitch_degrees=0.0, yaw_degrees=0.0, specular=True)
    params["light_color"][:] = 2.0
    batch = render_faces(tensors, params, 224, textured_backgrounds(1, 224, generator))
    attention = torch.from_numpy(skin_attention_image(to_uint8(batch.images)[0]))[None]
    targets = FaceTargets(batch.images, batch.landmarks68, batch.dense, attention)
    truth = tensors.albedo(params["albedo"]).clamp(0, 1)[0].numpy()
    results = {}
    for name, settings in (("lambert", FitSettings(coarse_steps=120)),
                           ("blinn-phong", paper002_settings(coarse_steps=120))):
        fitter = FaceFitter(tensors, ict_embedded_model.regions, settings, oval_indices=face_oval_indices())
        results[name] = fitter.fit(targets)
    return params, truth, results


def test_blinn_phong_fit_explains_highlights_better_than_lambert(highlight_fits, ict_embedded_model):
    params, truth, results = highlight_fits
    lambert, specular = results["lambert"], results["blinn-phong"]
    assert not lambert.failed.any() and not specular.failed.any()
    assert specular.losses["photometric"][0] < 0.8 * lambert.losses["photometric"][0]
    # the light comes from the front half-space, as the true one
    assert specular.parameters["light_direction"][0, 2] < 0 and np.exp(specular.parameters["log_shininess"][0, 0]) > 2
    # the de-lit albedo has less of the highlight baked in (after the per-channel gain that light
    # and albedo share: one photo cannot split the light's colour from the skin's)
    skin = ict_embedded_model.regions["skin"]

    def error(result):
        albedo = FaceModelTensors(ict_embedded_model).albedo(torch.as_tensor(result.parameters["albedo"]))
        colors = (albedo.clamp(0, 1)[0].numpy() * 255 + 0.5).astype(np.uint8)
        return albedo_errors(colors, truth, skin)["albedo_error_gain"]

    assert error(results["blinn-phong"]) < error(results["lambert"])


def test_fit_command_with_blinn_phong_stores_the_light(ict_embedded_model_file, astronaut_path, tmp_path):
    out = tmp_path / "out"
    result = CliRunner().invoke(main, [
        "fit", str(astronaut_path), "--out", str(out), "--face-model", str(ict_embedded_model_file),
        "--shading", "blinn-phong", "--steps", "30", "20", "2", "--no-perceptual",
        "--format", "obj,glb", "--texture-size", "128", "--json", "-q"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.output)
    assert summary["faces_fitted"] == 1
    (_, attrs, faces), = list(read_fits(out / "fits.h5"))
    assert json.loads(attrs["settings"])["fit"]["shading"] == "blinn-phong"
    face = faces[0]
    for name in SPECULAR_PARAMETER_NAMES:
        assert name in face and np.isfinite(face[name]).all()
    losses = json.loads(face["attrs"]["losses"])
    for term in ("photometric", "photometric_diffuse", "photometric_final", "uniform", "inner_mouth"):
        assert np.isfinite(losses[term])
    assert 0 < float(face["shininess"]) and face["diffuse_texture"].shape == face["specular_texture"].shape == (128, 128, 3)
    # a relightable material next to the photo texture, and paper 002's decomposition overlay
    names = sorted(p.name for p in (out / "meshes").iterdir())
    stem = names[0].split(".")[0]
    for suffix in ("_diffuse.png", "_specular.png", "_texture.png", ".mtl", ".glb"):
        assert stem + suffix in names, names
    mtl = (out / "meshes" / f"{stem}.mtl").read_text()
    assert f"map_Kd {stem}_diffuse.png" in mtl and f"map_Ks {stem}_specular.png" in mtl and "Ns " in mtl
    assert (out / "overlays" / f"{stem}_decomposition.png").is_file()
    # export rebuilds the same material from fits.h5
    again = tmp_path / "again"
    result = CliRunner().invoke(main, ["export", str(out / "fits.h5"), "--out", str(again), "--format", "obj"])
    assert result.exit_code == 0, result.output
    assert (again / f"{stem}_specular.png").is_file() or any(again.rglob(f"{stem}_specular.png"))
