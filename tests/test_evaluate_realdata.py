"""Real-data protocols: `evaluate landmarks`, `evaluate scan`, `evaluate albums`.

Unit tests pin the readers and metrics on constructed inputs; the end-to-end tests run each
protocol on a few files of ``../shared/realdata`` (real photos, a real scan), with short fits.
"""

from __future__ import annotations

import json
import math
import shutil

import numpy as np
import pytest
from click.testing import CliRunner
from scipy.io import savemat

from facerecon.cli import main
from facerecon.evaluation import albums, landmarks, scan
from facerecon.facemodel.blendshape_pairs import expression_report, opposing_pairs

SHORT = ["--steps", "30", "15", "0"]


# --------------------------------------------------------------------------- readers


def test_landmark_readers_agree_on_one_set_of_points(tmp_path):
    points = np.random.default_rng(3).uniform(20, 400, (68, 2))
    body = "\n".join(f"{x + 1:.4f} {y + 1:.4f}" for x, y in points)  # .pts is 1-based
    (tmp_path / "a.pts").write_text(f"version: 1\nn_points:  68\n{{\n{body}\n}}\n")
    (tmp_path / "b.ljson").write_text(json.dumps(
        {"version": 2, "groups": {"LJSON": {"landmarks": {"points": [[y, x] for x, y in points]}}}}))
    savemat(str(tmp_path / "c.mat"), {"pt2d": points.T, "Pose_Para": np.array([[0.1, -0.5, 0.0, 0, 0, 0, 1.0]])})
    read = {name: landmarks.read_annotation(tmp_path / name) for name in ("a.pts", "b.ljson", "c.mat")}
    for annotation in read.values():
        assert np.allclose(annotation.landmarks[:, :2], points, atol=1e-4)
    assert [a.format for a in read.values()] == ["pts", "ljson", "mat"]
    assert math.isnan(read["a.pts"].yaw_degrees) and read["c.mat"].yaw_degrees == pytest.approx(math.degrees(-0.5))
    (tmp_path / "bad.pts").write_text("version: 1\n{\n1 2\n}\n")
    with pytest.raises(ValueError, match="expected 68 points"):
        landmarks.read_annotation(tmp_path / "bad.pts")
    (tmp_path / "bad.ljson").write_text("{}")
    with pytest.raises(ValueError, match="no group of 68"):
        landmarks.read_annotation(tmp_path / "bad.ljson")


def test_discovery_pairs_photos_with_any_format(tmp_path):
    for name in ("a.jpg", "b.png", "c.jpg", "d.jpg"):
        (tmp_path / name).write_bytes(b"")
    (tmp_path / "a.pts").write_text("x")
    (tmp_path / "b.ljson").write_text("x")
    (tmp_path / "c.mat").write_bytes(b"x")
    (tmp_path / "c.pts").write_text("x")  # .pts is preferred over .mat
    items = {i.name: i for i in landmarks.discover_items(tmp_path)}
    assert sorted(items) == ["a.jpg", "b.png", "c.jpg", "d.jpg"]
    assert items["c.jpg"].annotation.suffix == ".pts" and items["d.jpg"].annotation is None
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "x.jpg").write_bytes(b"")
    with pytest.raises(ValueError, match="no .pts/.ljson/.mat annotations"):
        landmarks.discover_items(empty)


# --------------------------------------------------------------------------- metrics


def test_verification_auc_and_aligned_rms():
    assert albums.verification_auc(np.array([1.0, 2.0]), np.array([3.0, 4.0])) == 1.0
    assert albums.verification_auc(np.array([3.0, 4.0]), np.array([1.0, 2.0])) == 0.0
    assert albums.verification_auc(np.array([1.0, 3.0]), np.array([2.0, 3.0])) == pytest.approx((1 + 0 + 1 + 0.5) / 4)
    rng = np.random.default_rng(0)
    shape = rng.normal(size=(50, 3)) * 30
    angle = 0.4
    rotation = np.array([[math.cos(angle), -math.sin(angle), 0], [math.sin(angle), math.cos(angle), 0], [0, 0, 1]])
    moved = 1.3 * shape @ rotation.T + [5.0, -2.0, 9.0]
    assert albums.aligned_rms(shape, moved) < 1e-6  # a similarity is not a shape difference
    bumped = shape.copy()
    bumped[:, 2] += rng.normal(size=50)
    assert albums.aligned_rms(shape, bumped) > 0.5
    distances = albums.pairwise_distances(np.stack([shape, moved, bumped]))
    assert distances.shape == (3, 3) and np.allclose(distances, distances.T) and distances[0, 1] < 1e-5


def test_expression_report_flags_opposing_pairs():
    names = ["eyeLookUp_L", "eyeLookDown_L", "jawLeft", "jawRight", "jawOpen"]
    assert opposing_pairs(names).tolist() == [[0, 1], [2, 3]]
    neutral = expression_report(np.array([0.1, 0.0, 0.2, 0.05, 0.4]), names)
    assert neutral["neutral_ok"] and neutral["max_name"] == "jawOpen" and not neutral["opposing_active"]
    invented = expression_report(np.array([1.0, 0.76, 0.0, 0.0, 0.0]), names)
    assert not invented["neutral_ok"] and invented["opposing_active"] == ["eyeLookUp_L+eyeLookDown_L"]
    assert not expression_report(np.array([0.0, 0.0, 0.0, 0.0, 0.6]), names)["neutral_ok"]


def test_identity_similarity_is_one_for_the_photo_itself_and_drops_for_a_grey_face(astronaut_path):
    import torch

    from facerecon.detection.mediapipe_backend import FaceAnalyzer
    from facerecon.evaluation.identity import composite_similarity
    from facerecon.io.images import load_image
    from facerecon.losses.perceptual import PerceptualLoss
    from facerecon.networks.recognition import load_recognition_network
    from facerecon.stages.detect import analyze_image

    face = analyze_image(FaceAnalyzer(max_faces=1), load_image(astronaut_path).rgb)[0]
    crop = torch.as_tensor(face.crop, dtype=torch.float32)[None] / 255.0
    landmarks = torch.as_tensor(face.crop_landmarks68, dtype=torch.float32)[None]
    size = crop.shape[1]
    mask = torch.zeros(crop.shape[:3], dtype=torch.bool)
    mask[:, size // 4: 3 * size // 4, size // 4: 3 * size // 4] = True  # the middle of the face
    perceptual = PerceptualLoss(load_recognition_network("dlib"))
    same = composite_similarity(perceptual, crop, crop, mask, landmarks)
    grey = composite_similarity(perceptual, torch.full_like(crop, 0.5), crop, mask, landmarks)
    assert same.item() == pytest.approx(1.0, abs=1e-5) and grey.item() < 0.9


def test_scan_units_and_self_score(ict_embedded_model):
    assert scan.units_factor(np.array([[0, 0, 0], [0.3, 0.3, 0.2]]))[1] == "m"
    assert scan.units_factor(np.array([[0, 0, 0], [30.0, 30, 20]]))[1] == "cm"
    assert scan.units_factor(np.array([[0, 0, 0], [300.0, 300, 200]]))[1] == "mm"
    with pytest.raises(ValueError):
        scan.units_factor(np.zeros((2, 3)), "inch")
    model = ict_embedded_model
    vertices = model.mean_shape.astype(np.float64)
    lm = landmarks.landmark_points68(model, vertices, on_surface=True)
    # the mean face as a "scan" of itself, moved and scaled: crop, landmark start, ICP -> ~zero error
    fake = scan.Scan(vertices, model.triangles, lm[17:], np.arange(17, 68), "mm")
    truth = scan.prepare_truth(fake)
    tip = int(np.argmax(vertices[:, 2]))
    own = scan.score_mesh(vertices * 1.1 + [3.0, 1.0, -2.0], model.triangles, lm * 1.1 + [3.0, 1.0, -2.0], truth, tip)
    assert own["mean_mm"] < 0.05 and own["scale"] == pytest.approx(1 / 1.1, rel=1e-3)
    other = vertices.copy()
    other[:, 2] *= 1.15  # a deeper face is a different shape: no similarity makes it match
    assert scan.score_mesh(other, model.triangles, lm, truth, tip)["mean_mm"] > 20 * own["mean_mm"] + 0.3


# --------------------------------------------------------------------------- real data, end to end


def test_evaluate_landmarks_on_real_photos(realdata, ict_embedded_model_file, tmp_path):
    root = tmp_path / "set"
    root.mkdir()
    source = realdata / "landmarks"
    for name in ("image_0001.png", "image_0001.pts", "lenna.png", "lenna.ljson", "image00050.jpg", "image00050.mat"):
        shutil.copy(source / name, root / name)
    (root / "orphan.pts").write_text((source / "einstein.pts").read_text())  # ground truth, no photo
    (root / "blank.png").write_bytes((source / "image_0001.png").read_bytes()[:200])  # unreadable photo
    shutil.copy(source / "einstein.pts", root / "blank.pts")
    out = tmp_path / "eval"
    args = ["evaluate", "landmarks", str(root), "--out", str(out), "--face-model", str(ict_embedded_model_file),
            "--json", *SHORT]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    data = json.loads(result.output[result.output.index("{\n"):])
    rows = {r["image"]: r for r in data["images"]}
    assert data["protocol"] == "landmarks" and data["scored"] == 3
    assert {rows[n]["format"] for n in ("image_0001.png", "lenna.png", "image00050.jpg")} == {"pts", "ljson", "mat"}
    for name in ("image_0001.png", "lenna.png", "image00050.jpg"):
        # real photos: the fit's 68 points land within a few percent of the human annotation
        assert 0.5 < rows[name]["nme_percent"] < 8.0 and 0.5 < rows[name]["detector_nme_percent"] < 8.0
    assert rows["image00050.jpg"]["yaw_source"] == "annotation" and rows["lenna.png"]["yaw_source"] == "fit"
    assert rows["orphan.jpg"]["reason"].startswith("missing image")
    assert rows["blank.png"]["status"] == "failed" and not rows["blank.png"]["missed"]
    assert (out / "landmarks_results.csv").is_file() and (out / "landmarks_nme_by_yaw.png").stat().st_size > 2000
    again = CliRunner().invoke(main, args)
    assert json.loads(again.output[again.output.index("{\n"):])["images_resumed"] == 3


def test_evaluate_landmarks_counts_a_missed_face(realdata, ict_embedded_model_file, tmp_path):
    root = tmp_path / "set"
    root.mkdir()
    shutil.copy(realdata / "landmarks" / "image_0001.pts", root / "wall.pts")
    import cv2

    cv2.imwrite(str(root / "wall.png"), np.full((200, 200, 3), 128, np.uint8))  # no face in it
    result = landmarks.run_landmarks(root, tmp_path / "eval", landmarks.LandmarkOptions(
        face_model=str(ict_embedded_model_file)))
    assert result.summary["missed"] == 1 and result.summary["missed_images"] == ["wall.png"]
    assert result.rows[0]["reason"] == "no face detected" and result.summary["scored"] == 0


def test_evaluate_scan_semi_real(realdata, ict_embedded_model_file, tmp_path):
    scans = realdata / "scans"
    out = tmp_path / "scan"
    result = CliRunner().invoke(main, [
        "evaluate", "scan", str(scans / "flame_scan.obj"), "--landmarks", str(scans / "flame_scan_lmks.npy"),
        "--out", str(out), "--yaws", "0,25", "--pitches", "0", "--face-model", str(ict_embedded_model_file),
        "--json", *SHORT])
    assert result.exit_code == 0, result.output
    data = json.loads(result.output[result.output.index("{\n"):])
    assert data["variant"] == "rendered" and data["scan_units"] == "m" and data["nose_tip"] == "landmark 30"
    assert data["reconstructed"] == 2 and len(list((out / "renders").glob("*.png"))) == 2
    # a real face: the fit and the mean face are both within a few mm of it, neither exact
    assert 0.3 < data["fit_mean_mm"] < 4.0 and 0.3 < data["mean_face_mean_mm"] < 4.0
    for row in data["images"]:
        assert row["max_blendshape_name"] and 0.0 <= row["max_blendshape"] <= 1.0
    assert (out / "scan_results.csv").is_file()


def test_evaluate_albums_on_real_people(realdata, ict_embedded_model_file, tmp_path):
    root = tmp_path / "people"
    for person in ("id11", "id12"):
        shutil.copytree(realdata / "albums" / person, root / person)
    out = tmp_path / "albums"
    result = CliRunner().invoke(main, [
        "evaluate", "albums", str(root), "--out", str(out), "--resolutions", "240,480",
        "--face-model", str(ict_embedded_model_file), "--json", *SHORT])
    assert result.exit_code == 0, result.output
    data = json.loads(result.output[result.output.index("{\n"):])
    assert data["people"] == 2 and data["fitted"] == 4 and data["pairs_same"] == 2 and data["pairs_different"] == 4
    assert 0.0 <= data["auc"] <= 1.0 and data["same_median_mm"] > 0 and data["different_median_mm"] > 0
    assert data["resolution"]["photos"] == 2 and data["resolution"]["median_spread_mm"] > 0
    # identity similarity: the photo against its fit rendered over it, per photo and averaged
    similarities = [r["identity_similarity"] for r in data["photos"]]
    assert all(0.5 < v <= 1.0 for v in similarities)
    assert data["identity_similarity_mean"] == pytest.approx(np.mean(similarities))
    single = tmp_path / "one"
    shutil.copytree(realdata / "albums" / "id11", single / "id11")
    bad = CliRunner().invoke(main, ["evaluate", "albums", str(single), "--out", str(tmp_path / "o"), "-q",
                                    "--face-model", str(ict_embedded_model_file)])
    assert bad.exit_code == 1 and "at least two person folders" in bad.output


def test_evaluate_user_mistakes_are_one_line_and_bugs_keep_their_traceback(tmp_path, monkeypatch):
    not_a_scan = tmp_path / "scan.obj"
    not_a_scan.write_text("v 0 0 0\n")
    result = CliRunner().invoke(main, ["evaluate", "scan", str(not_a_scan), "--out", str(tmp_path / "o"), "-q"])
    assert result.exit_code == 1 and "not a scan mesh" in result.output and "Traceback" not in result.output

    def broken(*args, **kwargs):
        raise ValueError("operands could not be broadcast together")  # an internal bug, not a user mistake

    monkeypatch.setattr(landmarks, "run_landmarks", broken)
    result = CliRunner().invoke(main, ["evaluate", "landmarks", str(tmp_path), "--out", str(tmp_path / "o2"), "-q"])
    assert isinstance(result.exception, ValueError) and not isinstance(result.exception, SystemExit)


def test_nme_by_face_part_and_open_mouth_detection():
    from facerecon.evaluation.landmarks import REGIONS_68, mouth_open, nme, nme_by_region

    rng = np.random.default_rng(0)
    truth = rng.uniform(0, 100, (68, 2))
    truth[[61, 62, 63]] = [[40, 70], [50, 70], [60, 70]]
    truth[[67, 66, 65]] = [[40, 71], [50, 71], [60, 71]]  # lips 1 px apart on a ~100 px face: closed
    moved = truth.copy()
    moved[60:68] += [3.0, 4.0]  # only the inner lips are off, by 5 px
    parts = nme_by_region(moved, truth)
    assert set(parts) == set(REGIONS_68)
    extent = truth.max(0) - truth.min(0)
    assert parts["inner_lips"] == pytest.approx(100 * 5 / np.sqrt(extent[0] * extent[1]))
    assert all(parts[name] == 0 for name in parts if name != "inner_lips")
    # the parts' point-weighted mean is the whole face's NME
    whole = sum(parts[n] * len(REGIONS_68[n]) for n in parts) / 68
    assert whole == pytest.approx(100 * nme(moved, truth))
    assert not mouth_open(truth)
    opened = truth.copy()
    opened[[67, 66, 65], 1] += 12.0
    assert mouth_open(opened)
