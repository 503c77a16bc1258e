"""Album discovery, identity consistency, robust weights, shared-identity fitting, aggregate stage."""

from __future__ import annotations

import shutil

import h5py
import numpy as np
import pytest
import torch

from facerecon.aggregation.albums import find_albums
from facerecon.aggregation.identity import consistent_faces, robust_photo_weights, shape_distances, view_weights
from facerecon.facemodel.tensors import FaceModelTensors
from facerecon.fitting.optimize import FaceFitter, FaceTargets, FitSettings
from facerecon.stages.aggregate import AggregateOptions, run_aggregate
from facerecon.synthetic import random_parameters, render_faces, textured_backgrounds


def test_find_albums_single_and_parent_folders(tmp_path, astronaut_path):
    person = tmp_path / "person"
    person.mkdir()
    shutil.copy(astronaut_path, person / "a.png")
    parent = tmp_path / "people"
    for name in ("ann", "bob"):
        (parent / name).mkdir(parents=True)
        shutil.copy(astronaut_path, parent / name / "x.png")
    (tmp_path / "empty").mkdir()
    albums, problems = find_albums([str(person), str(parent), str(tmp_path / "empty"), str(astronaut_path)])
    assert [a.name for a in albums] == ["person", "ann", "bob"]
    assert [len(a.photos) for a in albums] == [1, 1, 1]
    assert [p[1] for p in problems] == ["no photos found", "not a folder or detections file (an album is a folder "
                                                           "of one person's photos)"]


def test_consistency_excludes_the_stranger_and_second_faces():
    rng = np.random.default_rng(0)
    person = rng.normal(size=(1, 50, 3)) * 3
    shapes = person + rng.normal(size=(6, 50, 3)) * 0.3
    stranger = rng.normal(size=(1, 50, 3)) * 3
    shapes = np.concatenate([shapes, stranger])
    keep, reference, _ = consistent_faces(shape_distances(shapes), [0, 1, 2, 3, 4, 5, 6])
    assert keep[:6].all() and not keep[6] and reference < 6
    # two faces of the person in one photo: only the closer one stays
    keep, _, _ = consistent_faces(shape_distances(shapes[:6]), [0, 1, 2, 3, 4, 4])
    assert keep.sum() == 5


def test_robust_weights_down_weight_outliers():
    weights = robust_photo_weights(np.array([1.0, 1.1, 0.9, 1.0, 6.0]))
    assert np.allclose(weights[:4], 1.0) and 0.2 < weights[4] < 0.3


def test_view_weights_fall_off_towards_profile():
    degrees = np.array([[0, 0, 0], [0, 30, 0], [0, -45, 0], [0, 60, 0], [0, 90, 0], [30, 30, 0], [np.nan, 0, 0]])
    weights = view_weights(np.radians(degrees))
    expected = [1.0, 1.0, (np.cos(np.radians(45)) / np.cos(np.radians(30))) ** 2, 1 / 3, 0.0, 0.75, 0.0]
    assert np.allclose(weights, expected, atol=1e-6)
    # the other Euler branch of a yaw-60 face: (pitch 180, yaw 120, roll 180)
    assert np.isclose(view_weights(np.radians([[180.0, 120.0, 180.0]]))[0], 1 / 3)


def test_shared_identity_prior_counts_once_per_set(ict_embedded_model):
    tensors = FaceModelTensors(ict_embedded_model)
    params = random_parameters(tensors, 4, torch.Generator().manual_seed(4))
    batch = render_faces(tensors, params, 96)
    targets = FaceTargets(batch.images, batch.landmarks68, batch.dense, torch.ones(4, 96, 96))
    shared = {**params, "identity": params["identity"][:1]}
    terms = {}
    for prior in ("per_set", "per_photo"):
        fitter = FaceFitter(tensors, ict_embedded_model.regions, FitSettings(shared_identity_prior=prior))
        terms[prior] = fitter.losses(shared, targets, None)["coefficients"]
    weight = FitSettings().weights["reg_identity"]
    identity_term = weight * float((params["identity"][0] ** 2).sum())
    assert torch.allclose(terms["per_photo"] - terms["per_set"], torch.full((4,), identity_term * 3 / 4), rtol=1e-4)
    with pytest.raises(ValueError, match="shared_identity_prior"):
        FaceFitter(tensors, ict_embedded_model.regions, FitSettings(shared_identity_prior="once"))


def test_shared_identity_fit_gives_one_identity(ict_embedded_model):
    tensors = FaceModelTensors(ict_embedded_model)
    generator = torch.Generator().manual_seed(2)
    params = random_parameters(tensors, 3, generator, pitch_degrees=0.0)
    params["identity"][:] = params["identity"][0]
    batch = render_faces(tensors, params, 224, textured_backgrounds(3, 224, generator))
    targets = FaceTargets(batch.images, batch.landmarks68, batch.dense, torch.ones(3, 224, 224))
    fitter = FaceFitter(tensors, ict_embedded_model.regions, FitSettings(coarse_steps=20, fine_steps=5))
    result = fitter.fit(targets, shared_identity=True, face_weights=torch.tensor([1.0, 1.0, 0.5]))
    identity = result.parameters["identity"]
    assert identity.shape == (3, tensors.n_identity)
    assert np.allclose(identity, identity[0]) and np.abs(identity[0]).sum() > 0
    assert not result.failed.any() and result.landmark_error_px.max() < 1.5
    # started from given parameters the landmark stage is skipped unless asked for
    init = {n: torch.as_tensor(v) for n, v in result.parameters.items()}
    assert fitter.fit(targets, shared_identity=True, init=init).steps["landmarks"] == 0
    again = fitter.fit(targets, shared_identity=True, init=init, refit_landmarks=True)
    assert again.steps["landmarks"] > 0 and again.landmark_error_px.max() < 1.5


def test_aggregate_stage_writes_identity_mesh_and_sheet(ict_embedded_model_file, astronaut_path, tmp_path):
    album = tmp_path / "astronaut"
    album.mkdir()
    for i in range(3):
        shutil.copy(astronaut_path, album / f"{i}.png")
    (album / "broken.jpg").write_bytes(b"\xff\xd8 not really")
    options = AggregateOptions(face_model=str(ict_embedded_model_file), method="mean", texture_size=128,
                               settings=FitSettings(landmark_steps=30, coarse_steps=5, fine_steps=0))
    summary = run_aggregate([str(album)], tmp_path / "out", options)
    assert summary.exit_code == 0
    outcome = summary.albums[0]
    assert outcome.status == "ok" and outcome.faces_used == 3
    assert [f[0] for f in outcome.failures] == ["broken.jpg"]
    assert (tmp_path / "out" / "astronaut" / "astronaut_neutral.obj").is_file()
    assert (tmp_path / "out" / "astronaut" / "contact_sheet.png").is_file()
    with h5py.File(tmp_path / "out" / "aggregate.h5") as f:
        group = f["identities"]["astronaut"]
        singles = group["single_identity"][()]
        np.testing.assert_allclose(group["identity"][()], singles.mean(axis=0), atol=1e-5)


def _people(tmp_path, astronaut_path):
    people = tmp_path / "people"
    for name, count in (("ann", 2), ("bob", 1)):
        (people / name).mkdir(parents=True)
        for i in range(count):
            shutil.copy(astronaut_path, people / name / f"{i}.png")
    (people / "ann" / "broken.jpg").write_bytes(b"\xff\xd8 not really")
    return people


FAST = ["--steps", "30", "4", "0", "--texture-size", "128", "--format", "obj,glb", "-q", "--json", "--no-download"]


def test_aggregate_command_runs_resumes_and_reports(ict_embedded_model_file, astronaut_path, tmp_path):
    import json

    import trimesh
    from click.testing import CliRunner

    from facerecon.cli import main

    people = _people(tmp_path, astronaut_path)
    args = ["aggregate", str(people), "--out", str(tmp_path / "out"), "--face-model", str(ict_embedded_model_file),
            *FAST]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["albums"] == 2 and data["albums_ok"] == 2 and data["method"] == "joint"
    ann = next(a for a in data["identities"] if a["name"] == "ann")
    assert ann["faces_used"] == 2 and ann["failures"][0]["photo"] == "broken.jpg"
    assert set(ann["confidences"]) == {"0.png#0", "1.png#0"}
    mesh = trimesh.load(tmp_path / "out" / "ann" / "ann_neutral.obj", force="mesh")
    assert len(mesh.vertices) > 1000 and np.isfinite(mesh.vertices).all()
    assert (tmp_path / "out" / "bob" / "bob_neutral.glb").is_file()
    # a second run finds both albums done and redoes nothing
    again = CliRunner().invoke(main, args)
    assert again.exit_code == 0
    data = json.loads(again.stdout)
    assert data["albums_skipped"] == 2 and data["albums_ok"] == 0
    assert next(a for a in data["identities"] if a["name"] == "ann")["failures"][0]["photo"] == "broken.jpg"
    # a changed album is redone, the other one still skipped
    shutil.copy(astronaut_path, people / "bob" / "1.png")
    third = json.loads(CliRunner().invoke(main, args).stdout)
    assert {a["name"]: a["status"] for a in third["identities"]} == {"ann": "skipped", "bob": "ok"}


def test_aggregate_takes_albums_from_a_detections_file(ict_embedded_model_file, astronaut_path, tmp_path):
    import json

    from click.testing import CliRunner

    from facerecon.cli import main
    from facerecon.stages.detect import run_detect

    people = _people(tmp_path, astronaut_path)
    run_detect([str(people)], tmp_path / "det.h5")
    result = CliRunner().invoke(main, ["aggregate", str(tmp_path / "det.h5"), "--out", str(tmp_path / "out"),
                                       "--method", "mean", "--face-model", str(ict_embedded_model_file), *FAST])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert sorted(a["name"] for a in data["identities"]) == ["ann", "bob"]
    assert next(a for a in data["identities"] if a["name"] == "ann")["faces_used"] == 2
    assert not (tmp_path / "out" / "ann" / "detections.h5").exists()  # the given detections were used


def test_aggregate_with_nothing_usable_exits_1(ict_embedded_model_file, tmp_path):
    import json

    from click.testing import CliRunner

    from facerecon.cli import main

    (tmp_path / "empty").mkdir()
    (tmp_path / "notes.txt").write_text("hello")
    result = CliRunner().invoke(main, ["aggregate", str(tmp_path / "empty"), str(tmp_path / "notes.txt"),
                                       "--out", str(tmp_path / "out"), "--face-model",
                                       str(ict_embedded_model_file), *FAST])
    assert result.exit_code == 1
    reasons = [p["reason"] for p in json.loads(result.stdout)["problems"]]
    assert reasons[0] == "no photos found" and reasons[1].startswith("not a folder or detections file")


def test_recognition_embeddings_exclude_the_stranger(ict_embedded_model_file, astronaut_path, tmp_path):
    from facerecon.aggregation.identity import embedding_distances
    from facerecon.networks.iresnet import IResNet

    torch.manual_seed(0)
    weights = tmp_path / "backbone.pth"
    torch.save(IResNet("r18").state_dict(), weights)

    rng = np.random.default_rng(1)
    person = rng.normal(size=512)
    embeddings = np.stack([person + rng.normal(size=512) * 0.4 for _ in range(5)] + [rng.normal(size=512)])
    keep, reference, threshold = consistent_faces(embedding_distances(embeddings), list(range(6)),
                                                  min_threshold=0.6, spread=2.0)
    assert keep[:5].all() and not keep[5]
    # the stage uses the user's recognition network for the check: copies of one photo are one person
    album = tmp_path / "astronaut"
    album.mkdir()
    for i in range(3):
        shutil.copy(astronaut_path, album / f"{i}.png")
    options = AggregateOptions(face_model=str(ict_embedded_model_file), method="mean", texture_size=64,
                               recognition_weights=str(weights),
                               settings=FitSettings(landmark_steps=20, coarse_steps=2, fine_steps=0))
    summary = run_aggregate([str(album)], tmp_path / "out", options)
    assert summary.albums[0].status == "ok" and summary.albums[0].faces_used == 3
    assert "face-recognition embeddings" in summary.notes[0]


def test_albedo_distances_ignore_colour_balance_and_occluders():
    from facerecon.aggregation.identity import albedo_distances

    rng = np.random.default_rng(2)
    person = 0.5 + 0.1 * rng.random((400, 3))
    warm_light = person * np.array([1.2, 1.0, 0.8])  # the same skin under another light's colour
    occluded = person.copy()
    occluded[:120] = [0.1, 0.1, 0.1]  # a dark occluder over 30 % of the skin
    stranger = 0.5 + 0.1 * rng.random((400, 3))
    d = albedo_distances(np.stack([person, warm_light, occluded, stranger]))
    assert d.shape == (4, 4) and np.allclose(np.diag(d), 0)
    assert d[0, 1] < 1e-6 and d[0, 2] < 1e-6
    assert d[0, 3] > 0.05
    # compared only where both photos saw the skin: what a photo did not see does not count
    half_seen = person.copy()
    half_seen[140:] = stranger[140:]  # the part it did not see is only the prior's guess
    visible = np.ones((2, 400), bool)
    visible[1, 140:] = False
    assert albedo_distances(np.stack([person, half_seen]))[0, 1] > 0.01
    assert albedo_distances(np.stack([person, half_seen]), visible, min_points=100)[0, 1] < 1e-6
    # too few shared points: everything counts
    assert albedo_distances(np.stack([person, half_seen]), visible, min_points=300)[0, 1] > 0.01


def test_joint_aggregation_excludes_a_stranger_by_skin_pattern(ict_embedded_model, ict_embedded_model_file, tmp_path):
    from facerecon.export.meshio import write_png
    from facerecon.synthetic import random_parameters, render_faces, textured_backgrounds, to_uint8

    tensors = FaceModelTensors(ict_embedded_model)
    generator = torch.Generator().manual_seed(8)
    params = random_parameters(tensors, 5, generator, pitch_degrees=0.0)
    params["angles"][:, 1] = torch.deg2rad(torch.tensor([-25.0, -10.0, 5.0, 20.0, 0.0]))
    params["identity"][:4] = params["identity"][0]
    params["albedo"][:4] = params["albedo"][0]
    params["albedo"][4] = -1.5 * params["albedo"][0]  # the stranger: another skin pattern
    album = tmp_path / "person"
    album.mkdir()
    batch = render_faces(tensors, params, 320, textured_backgrounds(5, 320, generator), zoom=0.6)
    for i, image in enumerate(to_uint8(batch.images)):
        write_png(album / (f"photo_{i}.png" if i < 4 else "stranger.png"), image)
    options = AggregateOptions(face_model=str(ict_embedded_model_file), method="joint", texture_size=64,
                               identity_check="shape",  # the check without face recognition
                               settings=FitSettings(landmark_steps=40, coarse_steps=60, fine_steps=0))
    summary = run_aggregate([str(album)], tmp_path / "out", options)
    outcome = summary.albums[0]
    assert outcome.status == "ok", outcome.reason
    assert [face for face, _ in outcome.excluded] == ["stranger.png#0"], outcome.excluded
    assert "skin-pattern distance" in outcome.excluded[0][1]
    assert outcome.faces_used == 4 and "stranger.png#0" not in outcome.confidences
    kept = []
    with h5py.File(tmp_path / "out" / "aggregate.h5") as f:
        f.visititems(lambda name, obj: kept.append(obj[()]) if name.endswith("kept") else None)
    assert len(kept) == 1 and kept[0].tolist() == [True] * 4 + [False]
