"""The NoW protocol: crop, alignment and scan-to-mesh metric on known inputs, the layout
reader, and the `evaluate now` command end to end on a miniature NoW release rendered from
the face model (image lists, iphone_pictures/, scans/ + MeshLab .pp landmarks)."""

from __future__ import annotations

import csv
import json
import math

import numpy as np
import pytest
from click.testing import CliRunner

from facerecon.cli import main
from facerecon.evaluation import now
from facerecon.evaluation.geometry import Similarity

IMAGE_SIZE = 320
SUBJECT_A, SUBJECT_B, SUBJECT_C = "FaMoS_180424_03335_TA", "FaMoS_180426_03336_TA", "FaMoS_180427_03338_TA"


def write_pp(path, points) -> None:
    """A MeshLab picked-points file, as NoW's scans_lmks_onlypp holds."""
    path.parent.mkdir(parents=True, exist_ok=True)
    body = "\n".join(f' <point x="{x:.5f}" y="{y:.5f}" z="{z:.5f}" active="1" name="{i}"/>'
                     for i, (x, y, z) in enumerate(points))
    path.write_text("<!DOCTYPE PickedPoints>\n<PickedPoints>\n <DocumentData>\n  <DateTime time=\"16:00:00\" "
                    "date=\"2019-01-01\"/>\n  <User name=\"annotator\"/>\n  <DataFileName name=\"scan.obj\"/>\n"
                    f" </DocumentData>\n{body}\n</PickedPoints>\n")


def write_obj(path, vertices, triangles) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = [f"v {x:.5f} {y:.5f} {z:.5f}" for x, y, z in vertices]
    lines += [f"f {a + 1} {b + 1} {c + 1}" for a, b, c in triangles]
    path.write_text("\n".join(lines) + "\n")


def rotation_y(degrees: float) -> np.ndarray:
    a = math.radians(degrees)
    return np.array([[math.cos(a), 0.0, math.sin(a)], [0.0, 1.0, 0.0], [-math.sin(a), 0.0, math.cos(a)]])


def scan_of(model, neutral: np.ndarray, similarity: Similarity):
    """A scan of a neutral face: the face moved by ``similarity`` (scanner frame), cut to
    130 mm around the nose, and its 7 NoW landmarks."""
    from facerecon.evaluation.aflw2000 import landmark_points68

    moved = similarity.apply(neutral)
    keep = np.linalg.norm(moved - moved[model.landmarks68[30]], axis=1) < 130.0
    remap = np.full(len(moved), -1)
    remap[keep] = np.arange(keep.sum())
    triangles = remap[model.triangles]
    triangles = triangles[(triangles >= 0).all(axis=1)]
    return moved[keep], triangles, landmark_points68(model, moved)[list(now.LANDMARK_INDICES68)]


@pytest.fixture(scope="module")
def now_tree(ict_embedded_model, tmp_path_factory):
    """A NoW release in miniature. Subject A: multiview_neutral + multiview_expressions photos,
    scan + .pp; subject B: one selfie, scan + .pp; subject C: one photo, no scan. The
    validation list also names a photo that is missing; the test list names C's photo."""
    import cv2
    import torch

    from facerecon.facemodel.tensors import FaceModelTensors
    from facerecon.synthetic import random_parameters, render_faces, textured_backgrounds, to_uint8

    root = tmp_path_factory.mktemp("now") / "NoW_Dataset" / "final_release_version"
    tensors = FaceModelTensors(ict_embedded_model)
    generator = torch.Generator().manual_seed(21)
    photos = [(SUBJECT_A, "multiview_neutral", "IMG_0041.jpg", -12.0, False),
              (SUBJECT_A, "multiview_expressions", "IMG_0057.jpg", 20.0, True),
              (SUBJECT_B, "selfie", "IMG_0302.jpg", 5.0, True),
              (SUBJECT_C, "multiview_neutral", "IMG_0011.jpg", 0.0, False)]
    identities = {}
    for index, subject in enumerate((SUBJECT_A, SUBJECT_B, SUBJECT_C)):
        base = random_parameters(tensors, 1, generator, yaw_degrees=0.0, pitch_degrees=0.0)
        identities[subject] = base
        if subject == SUBJECT_C:
            continue
        neutral = tensors.shape(base["identity"], torch.zeros_like(base["expression"]))[0].numpy().astype(np.float64)
        scanner = Similarity(1.0, rotation_y(15.0 * (index + 1)), np.array([20.0, -35.0, 600.0]))
        vertices, triangles, landmarks = scan_of(ict_embedded_model, neutral, scanner)
        write_obj(root / "scans" / subject / "natural_head_rotation.000001.obj", vertices, triangles)
        write_pp(root / "scans_lmks_onlypp" / subject / "natural_head_rotation.000001_picked_points.pp", landmarks)
    params = {k: torch.cat([identities[p[0]][k] for p in photos]) for k in identities[SUBJECT_A]}
    expressive = random_parameters(tensors, len(photos), generator, expression_scale=0.3)["expression"]
    params["expression"] = torch.where(torch.tensor([p[4] for p in photos])[:, None], expressive,
                                       torch.zeros_like(expressive))
    params["angles"][:, 1] = torch.deg2rad(torch.tensor([p[3] for p in photos]))
    background = textured_backgrounds(len(photos), IMAGE_SIZE, generator)
    images = to_uint8(render_faces(tensors, params, IMAGE_SIZE, background, zoom=0.6).images)
    lines = []
    for (subject, challenge, name, _yaw, _expr), image in zip(photos, images):
        path = root / "iphone_pictures" / subject / challenge / name
        path.parent.mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(path), np.ascontiguousarray(image[..., ::-1]), [cv2.IMWRITE_JPEG_QUALITY, 95])
        lines.append(f"{subject}/{challenge}/{name}")
    (root / "imagepathsvalidation.txt").write_text("\n".join(lines + [f"{SUBJECT_B}/selfie/IMG_0999.jpg"]) + "\n")
    (root / "imagepathstest.txt").write_text(lines[3] + "\n")
    return root


# --------------------------------------------------------------------------- end to end


def test_evaluate_now_end_to_end_resume_and_test_split(now_tree, ict_embedded_model, ict_embedded_model_file,
                                                       tmp_path):
    out = tmp_path / "eval"
    args = ["evaluate", "now", str(now_tree.parent.parent), "--split", "val", "--out", str(out), "--face-model",
            str(ict_embedded_model_file), "--steps", "40", "0", "0", "--json"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    assert "multiview_expressions" in result.output and "missing image" in result.output  # rich tables
    data = json.loads(result.output[result.output.index("{\n"):])
    assert data["protocol"] == "now" and data["split"] == "val" and data["dataset"] == str(now_tree)
    assert (data["images_total"], data["predicted"], data["scored"], data["missing_predictions"]) == (5, 4, 3, 1)
    assert 0.05 < data["median_mm"] < 3.0 and data["median_mm"] < data["mean_mm"] < 4.0 and data["std_mm"] > 0
    challenges = {row["challenge"]: row for row in data["challenges"]}
    assert list(challenges) == ["multiview_neutral", "multiview_expressions", "selfie"]
    assert [(c["images"], c["predicted"], c["scored"]) for c in challenges.values()] == [(2, 2, 1), (1, 1, 1),
                                                                                          (2, 1, 1)]
    for row in challenges.values():
        assert math.isfinite(row["median_mm"]) and math.isfinite(row["std_mm"]) and row["points"] > 1000
    rows = {r["image"]: r for r in data["images"]}
    scored = rows[f"{SUBJECT_A}/multiview_neutral/IMG_0041.jpg"]
    assert scored["status"] == "ok" and 0.85 < scored["scale"] < 1.15 and scored["landmark_rmse_mm"] < 6.0
    assert rows[f"{SUBJECT_C}/multiview_neutral/IMG_0011.jpg"]["status"] == "predicted"
    assert rows[f"{SUBJECT_C}/multiview_neutral/IMG_0011.jpg"]["reason"].startswith("no ground-truth scan")
    assert rows[f"{SUBJECT_B}/selfie/IMG_0999.jpg"]["reason"].startswith("missing image")
    # the pooled numbers are over all vertices of all scored images
    pooled = np.concatenate([np.load(out / "results" / SUBJECT_A / "multiview_neutral" / "IMG_0041_distances.npy"),
                             np.load(out / "results" / SUBJECT_A / "multiview_expressions" /
                                     "IMG_0057_distances.npy"),
                             np.load(out / "results" / SUBJECT_B / "selfie" / "IMG_0302_distances.npy")])
    assert len(pooled) == data["points"] and np.median(pooled) == pytest.approx(data["median_mm"], rel=1e-5)
    # predictions in NoW's layout: mesh (mm) + 7 landmarks lying on it
    mesh = out / "predictions" / SUBJECT_A / "multiview_expressions" / "IMG_0057.obj"
    landmarks = np.load(mesh.with_suffix(".npy"))
    from facerecon.evaluation.micc import read_obj

    vertices, triangles = read_obj(mesh)
    assert vertices.shape == (ict_embedded_model.n_vertices, 3) and len(triangles) == len(ict_embedded_model.triangles)
    assert landmarks.shape == (7, 3) and now.scan_to_mesh_distances(landmarks, vertices, triangles).max() < 1e-3
    assert 80 < np.linalg.norm(landmarks[0] - landmarks[3]) < 120  # outer eye corners ~ 10 cm apart: mm
    assert (out / "predictions" / SUBJECT_C / "multiview_neutral" / "IMG_0011.npy").is_file()
    table = list(csv.DictReader((out / "now_results.csv").open()))
    assert len(table) == 5 and sorted(r["status"] for r in table) == ["failed", "ok", "ok", "ok", "predicted"]
    assert (out / "now_cumulative_error.png").stat().st_size > 2000
    # resumable: nothing is fitted or scored again
    again = CliRunner().invoke(main, args)
    assert again.exit_code == 0, again.output
    second = json.loads(again.output[again.output.index("{\n"):])
    assert second["images_fitted_this_run"] == 0 and second["images_resumed"] == 3
    assert (second["median_mm"], second["mean_mm"], second["std_mm"]) == \
        (data["median_mm"], data["mean_mm"], data["std_mm"])
    # the test split (no scans published): predictions only, the fit reused
    test = CliRunner().invoke(main, args[:4] + ["test"] + args[5:])
    assert test.exit_code == 0, test.output
    hidden = json.loads(test.output[test.output.index("{\n"):])
    assert (hidden["images_total"], hidden["predicted"], hidden["scored"]) == (1, 1, 0)
    assert hidden["median_mm"] is None and hidden["images_fitted_this_run"] == 0


def test_evaluate_now_bad_inputs(tmp_path, ict_embedded_model_file):
    model = ["--face-model", str(ict_embedded_model_file)]
    result = CliRunner().invoke(main, ["evaluate", "now", str(tmp_path), "--out", str(tmp_path / "o"), "-q"] + model)
    assert result.exit_code == 1 and "imagepathsvalidation.txt" in result.output
    (tmp_path / "imagepathsvalidation.txt").write_text("subject/multiview_neutral/IMG_1.jpg\n")
    result = CliRunner().invoke(main, ["evaluate", "now", str(tmp_path), "--out", str(tmp_path / "o"), "--json",
                                       "-q"] + model)
    assert result.exit_code == 1 and json.loads(result.output)["images"][0]["reason"].startswith("missing image")
    bad = CliRunner().invoke(main, ["evaluate", "now", str(tmp_path), "--out", str(tmp_path / "o"),
                                    "--challenges", "profile"])
    assert bad.exit_code == 2


def test_evaluate_now_stop_keeps_reports(now_tree, ict_embedded_model_file, tmp_path):
    options = now.NowOptions(face_model=str(ict_embedded_model_file), challenges=("selfie",))
    stopped = now.run_now(now_tree, tmp_path / "stopped", options, should_stop=lambda: True)
    assert stopped.summary["interrupted"] and stopped.summary["predicted"] == 0
    reasons = {r["image"]: r["reason"] for r in stopped.rows}
    assert reasons == {f"{SUBJECT_B}/selfie/IMG_0302.jpg": "not evaluated (interrupted)",
                       f"{SUBJECT_B}/selfie/IMG_0999.jpg": reasons[f"{SUBJECT_B}/selfie/IMG_0999.jpg"]}
    assert reasons[f"{SUBJECT_B}/selfie/IMG_0999.jpg"].startswith("missing image")
    assert json.loads((tmp_path / "stopped" / "now_results.json").read_text())["interrupted"]


# --------------------------------------------------------------------------- units


def test_crop_region_follows_now():
    landmarks = np.array([[-45.0, 0, 0], [-15, 0, 0], [15, 0, 0], [45, 0, 0], [0, -40, 10], [-25, -70, 0],
                          [25, -70, 0]])
    centre, radius = now.crop_region(landmarks)
    # nose (0, -40, 10), mid inner eyes (0, 0, 0): centre 30 % of the way up; radius 1.4 (90 + |(0, 40, -10)|) / 2
    assert np.allclose(centre, [0.0, -28.0, 7.0])
    assert radius == pytest.approx(1.4 * (90.0 + math.sqrt(1700.0)) / 2)
    grid = np.stack(np.meshgrid(np.linspace(-150, 150, 61), np.linspace(-150, 150, 61), [7.0]), -1).reshape(-1, 3)
    kept = now.crop_scan(grid, landmarks)
    assert len(kept) and np.linalg.norm(kept - centre, axis=1).max() <= radius
    assert np.linalg.norm(grid - centre, axis=1)[np.linalg.norm(grid - centre, axis=1) <= radius].size == len(kept)
    # the rule, term by term: widening the outer eye corners (lm0, lm3) by d adds 1.4 d / 2; raising
    # the nose (lm4) away from the inner eyes by d adds 1.4 d / 2 and moves the centre by 0.7 d;
    # the mouth corners (lm5, lm6) and any rigid motion change nothing
    wider = landmarks.copy()
    wider[0, 0] -= 5.0
    wider[3, 0] += 5.0
    assert now.crop_region(wider)[1] == pytest.approx(radius + 1.4 * 10.0 / 2)
    longer = landmarks.copy()
    longer[4] += 6.0 * (landmarks[4] - [0, 0, 0]) / np.linalg.norm(landmarks[4])
    long_centre, long_radius = now.crop_region(longer)
    assert long_radius == pytest.approx(radius + 1.4 * 6.0 / 2)
    assert np.linalg.norm(long_centre - centre) == pytest.approx(0.7 * 6.0)
    mouth = landmarks.copy()
    mouth[5:] += [3.0, -8.0, 2.0]
    assert now.crop_region(mouth)[1] == pytest.approx(radius)
    c, s = math.cos(0.4), math.sin(0.4)
    rotation = np.array([[c, 0.0, s], [0.0, 1.0, 0.0], [-s, 0.0, c]])
    moved_centre, moved_radius = now.crop_region(landmarks @ rotation.T + [10.0, -3.0, 40.0])
    assert moved_radius == pytest.approx(radius)
    assert np.allclose(moved_centre, centre @ rotation.T + [10.0, -3.0, 40.0])


def test_scan_to_mesh_distance_known_offsets(ict_model):
    # a flat square: points above it at a known height
    xs, ys = np.meshgrid(np.arange(11.0), np.arange(11.0))
    plane = np.stack([xs.ravel(), ys.ravel(), np.zeros(121)], axis=1)
    index = np.arange(121).reshape(11, 11)
    quads = np.stack([index[:-1, :-1].ravel(), index[:-1, 1:].ravel(), index[1:, 1:].ravel(), index[1:, :-1].ravel()],
                     axis=1)
    triangles = np.concatenate([quads[:, [0, 1, 2]], quads[:, [0, 2, 3]]])
    rng = np.random.default_rng(0)
    above = np.concatenate([rng.uniform(1, 9, (200, 2)), np.full((200, 1), 0.7)], axis=1)
    assert np.allclose(now.scan_to_mesh_distances(above, plane, triangles), 0.7)
    assert np.allclose(now.scan_to_mesh_distances(above * [1, 1, -1], plane, triangles), 0.7)  # unsigned
    # the face: points on the surface are at ~0, points moved 0.5 mm along the normals at ~0.5
    from facerecon.evaluation.geometry import triangle_normals

    vertices, faces = ict_model.mean_shape.astype(np.float64), np.asarray(ict_model.triangles)
    picked = rng.choice(len(faces), 3000, replace=False)
    bary = rng.dirichlet(np.ones(3), 3000)
    on_surface = (vertices[faces[picked]] * bary[..., None]).sum(axis=1)
    assert now.scan_to_mesh_distances(on_surface, vertices, faces, chunk=700).max() < 1e-6
    offset = on_surface + 0.5 * triangle_normals(vertices, faces)[picked]
    distances = now.scan_to_mesh_distances(offset, vertices, faces)
    assert np.median(distances) == pytest.approx(0.5, abs=0.01) and distances.max() <= 0.5 + 1e-6


def test_alignment_recovers_a_known_similarity(ict_embedded_model):
    from facerecon.evaluation.aflw2000 import landmark_points68

    model = ict_embedded_model
    prediction = model.mean_shape.astype(np.float64)
    triangles = np.asarray(model.triangles)
    landmarks = landmark_points68(model, prediction)[list(now.LANDMARK_INDICES68)]
    truth = Similarity(1.08, rotation_y(25.0) @ np.array([[1.0, 0, 0], [0, math.cos(0.2), -math.sin(0.2)],
                                                          [0, math.sin(0.2), math.cos(0.2)]]),
                       np.array([30.0, -12.0, 480.0]))
    scan_vertices, _, scan_landmarks = scan_of(model, prediction, truth)
    scan_landmarks = scan_landmarks + np.random.default_rng(3).normal(0, 2.0, (7, 3))  # annotation noise
    points = now.crop_scan(scan_vertices, scan_landmarks)
    gt = now.NowGroundTruth(points, scan_landmarks, *now.crop_region(scan_landmarks), len(scan_vertices))
    score = now.score_prediction(prediction, triangles, landmarks, gt)
    found = score.alignment
    assert found.scale == pytest.approx(1.08, abs=2e-3)
    angle = math.degrees(math.acos(np.clip((np.trace(found.rotation @ truth.rotation.T) - 1) / 2, -1, 1)))
    assert angle < 0.2
    assert np.abs(found.apply(prediction) - truth.apply(prediction)).max() < 0.5
    assert score.statistics()["median_mm"] < 0.02 and score.statistics()["points"] == len(points)
    # the landmarks alone (noisy) are clearly worse: the surface refinement did the work
    initial = now.scan_to_mesh_distances(points, score.initial.apply(prediction), triangles)
    assert np.median(initial) > 10 * score.statistics()["median_mm"]


def test_pooled_statistics_pool_vertices_not_images():
    stats = now.pooled_statistics([np.zeros(3), np.array([10.0]), np.array([np.nan])])
    assert stats == {"median_mm": 0.0, "mean_mm": 2.5, "std_mm": pytest.approx(math.sqrt(18.75)), "points": 4}
    assert now.pooled_statistics([])["median_mm"] is None


def test_layout_reader(tmp_path):
    dataset = tmp_path / "final_release_version"
    photo = dataset / "iphone_pictures" / SUBJECT_A / "selfie" / "IMG_0001.jpg"
    photo.parent.mkdir(parents=True)
    photo.write_bytes(b"")
    (dataset / "imagepathsvalidation.txt").write_text(
        f"{SUBJECT_A}/selfie/IMG_0001.jpg\n\n{SUBJECT_A}/selfie/IMG_0001.jpg\n"
        f"iphone_pictures/{SUBJECT_A}/multiview_neutral/IMG_0002.jpg\n")
    found, list_path, entries = now.discover_entries(tmp_path, "val")
    assert found == dataset and list_path.name == "imagepathsvalidation.txt"
    assert [(e.subject, e.challenge, e.filename) for e in entries] == \
        [(SUBJECT_A, "selfie", "IMG_0001.jpg"), (SUBJECT_A, "multiview_neutral", "IMG_0002.jpg")]
    assert entries[0].image == photo and entries[1].image is None and entries[1].reason.startswith("missing image")
    assert len(now.discover_entries(dataset, "val", challenges=["selfie"])[2]) == 1
    with pytest.raises(ValueError, match="imagepathstest.txt"):
        now.discover_entries(dataset, "test")
    with pytest.raises(ValueError, match="subject"):
        now.parse_entry("IMG_0001.jpg")
    # ground truth: scan + MeshLab .pp; the first file by name
    write_obj(dataset / "scans" / SUBJECT_A / "b.obj", np.eye(3), [[0, 1, 2]])
    assert now.find_ground_truth(dataset, SUBJECT_A)[2].startswith("no scan landmarks")
    points = np.arange(21.0).reshape(7, 3)
    write_pp(dataset / "scans_lmks_onlypp" / SUBJECT_A / "b_picked_points.pp", points)
    scan, marks, reason = now.find_ground_truth(dataset, SUBJECT_A)
    assert (scan.name, marks.name, reason) == ("b.obj", "b_picked_points.pp", "")
    assert np.allclose(now.read_landmarks(marks), points)
    assert now.find_ground_truth(dataset, SUBJECT_B)[2].startswith("no ground-truth scan")
    np.savetxt(tmp_path / "l.txt", points)
    assert np.allclose(now.read_landmarks(tmp_path / "l.txt"), points)
    write_pp(tmp_path / "short.pp", points[:5])
    with pytest.raises(ValueError, match="expected 7 points"):
        now.read_landmarks(tmp_path / "short.pp")
    with pytest.raises(ValueError, match=r"only \d+ vertices"):  # scan in metres, landmarks in mm
        now.prepare_ground_truth(scan, marks)
