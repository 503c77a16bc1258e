"""Detection, landmarks, alignment, skin, masks and the ``facerecon detect`` command."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
from click.testing import CliRunner

from facerecon.cli import main
from facerecon.detection.align import TEMPLATE5, estimate_similarity, invert_affine, transform_points, warp_crop
from facerecon.detection.landmarks import IBUG68_FROM_MP478, IBUG68_MIRROR, SYMMETRIC_PAIRS, points5
from facerecon.detection.mediapipe_backend import FaceAnalyzer, tile_origins
from facerecon.detection.skin import load_skin_model, packaged_model_path, skin_attention, skin_posterior
from facerecon.io.store import lock_path, open_results, parts_dir
from facerecon.stages.detect import analyze_image, iter_detections
from tests.helpers_detect import (ASTRONAUT_PNG, astronaut, can_make_unreadable, group_photo, on_background,
                                  save_exif_rotated, save_rgb, shared_dir, truncated_copy, write_flat_png)

REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def analyzer():
    with FaceAnalyzer() as fa:
        yield fa


@pytest.fixture(scope="module")
def photo() -> np.ndarray:
    return astronaut()


@pytest.fixture(scope="module")
def astro_faces(analyzer, photo):
    return analyze_image(analyzer, photo)


def _iod(points5_: np.ndarray) -> float:
    return float(np.linalg.norm(points5_[1] - points5_[0]))


def _run(args: list[str]):
    result = CliRunner().invoke(main, args, catch_exceptions=False)
    return result


def _json(result) -> dict:
    return json.loads(result.stdout)


# --------------------------------------------------------------------------- tables


def test_68_table_is_a_mirror_consistent_subset():
    table = IBUG68_FROM_MP478
    assert table.shape == (68,) and len(set(table.tolist())) == 68 and (table < 468).all()
    assert np.array_equal(IBUG68_MIRROR[IBUG68_MIRROR], np.arange(68))
    mirror_of = {}
    for right, left in SYMMETRIC_PAIRS:
        mirror_of[right], mirror_of[left] = left, right
    # wherever both a point and its iBUG mirror are known mirror pairs of the mesh, they agree
    checked = 0
    for i in range(68):
        a, b = int(table[i]), int(table[IBUG68_MIRROR[i]])
        if a in mirror_of:
            assert mirror_of[a] == b, (i, a, b)
            checked += 1
    assert checked >= 30


# --------------------------------------------------------------------------- detection


def test_astronaut_one_face_with_plausible_landmarks(astro_faces, photo):
    assert len(astro_faces) == 1
    face = astro_faces[0].face
    x0, y0, x1, y1 = face.box
    assert 150 < x0 < x1 < 300 and 40 < y0 < y1 < 200 and face.score > 0.7
    assert face.landmarks478.shape == (478, 3) and face.landmarks68.shape == (68, 2)
    assert face.points5.shape == (5, 2) and face.pose_degrees.shape == (3,)
    eyes = face.landmarks68[36:48]
    assert ((eyes[:, 0] > x0) & (eyes[:, 0] < x1) & (eyes[:, 1] > y0) & (eyes[:, 1] < y1)).all()
    right_eye, left_eye, nose, mouth_r, mouth_l = face.points5
    iod = _iod(face.points5)
    assert 0.3 < iod / (x1 - x0) < 0.6
    assert right_eye[0] < left_eye[0] and mouth_r[0] < mouth_l[0]  # subject's right on the image left
    assert max(right_eye[1], left_eye[1]) < nose[1] < min(mouth_r[1], mouth_l[1])
    assert abs(face.landmarks68[8, 0] - nose[0]) < 0.3 * iod and face.landmarks68[8, 1] > nose[1] + iod
    # iris centres lie inside their eye's contour box
    for iris, eye in ((468, face.landmarks68[36:42]), (473, face.landmarks68[42:48])):
        ix, iy = face.landmarks478[iris, :2]
        assert eye[:, 0].min() < ix < eye[:, 0].max() and eye[:, 1].min() - 3 < iy < eye[:, 1].max() + 3
    pitch, yaw, roll = face.pose_degrees
    assert abs(yaw) < 15 and abs(roll) < 10 and abs(pitch) < 25


def test_mirrored_photo_gives_mirrored_landmarks_and_pose(analyzer, photo, astro_faces):
    width = photo.shape[1]
    flipped = analyzer.analyze(np.ascontiguousarray(photo[:, ::-1]))
    assert len(flipped) == 1
    original = astro_faces[0].face
    back = flipped[0].landmarks68.copy()
    back[:, 0] = width - 1 - back[:, 0]
    error = np.linalg.norm(back[IBUG68_MIRROR] - original.landmarks68, axis=1)
    assert np.median(error) < 0.05 * _iod(original.points5) and error.max() < 0.1 * _iod(original.points5)
    assert abs(flipped[0].pose_degrees[1] + original.pose_degrees[1]) < 5  # yaw changes sign
    assert abs(flipped[0].pose_degrees[2] + original.pose_degrees[2]) < 5  # roll too


def test_turned_renders_give_the_sign_and_size_of_yaw(analyzer, ict_model):
    pytest.importorskip("facerecon.render.renderer")
    from facerecon.facemodel.embedding import render_mean_face

    for yaw in (-30.0, 30.0):
        image, _, _ = render_mean_face(ict_model, yaw)
        faces = analyzer.analyze(image)
        assert len(faces) == 1
        estimate = float(faces[0].pose_degrees[1])
        assert np.sign(estimate) == np.sign(yaw) and abs(estimate - yaw) < 12, (yaw, estimate)


def test_profile_render_found_by_the_short_range_fallback(analyzer, ict_model):
    pytest.importorskip("facerecon.render.renderer")
    from facerecon.facemodel.embedding import render_mean_face

    with_fallback = FaceAnalyzer(short_range_fallback=True)
    try:
        for yaw in (-75.0, 75.0):
            image, _, _ = render_mean_face(ict_model, yaw)
            assert analyzer.analyze(image) == []  # the full-range model (the default) misses this view
            faces = with_fallback.analyze(image)
            assert len(faces) == 1
            assert np.sign(faces[0].pose_degrees[1]) == np.sign(yaw)
        assert with_fallback.settings()["fallback_detector"] and "fallback_detector" not in analyzer.settings()
    finally:
        with_fallback.close()


def test_second_look_at_a_photo_over_4096_px_reduces_it_once(ict_model, monkeypatch):
    """Both whole-image looks (full range, then short range) share one view of a photo larger
    than the detector is ever given, and the face comes back in the photo's own pixels."""
    pytest.importorskip("facerecon.render.renderer")
    import cv2

    from facerecon.detection.mediapipe_backend import WHOLE_PASS_MAX_SIDE
    from facerecon.facemodel.embedding import render_mean_face

    image, _, _ = render_mean_face(ict_model, 75.0, image_size=1100)  # the full-range model misses it
    big = cv2.resize(image, (4400, 4400), interpolation=cv2.INTER_LINEAR)
    assert max(big.shape) > WHOLE_PASS_MAX_SIDE
    with_fallback = FaceAnalyzer(short_range_fallback=True, detect_max_side=4400, tile_size=0)
    reduced, resize = [], cv2.resize

    def counting_resize(src, *args, **kwargs):
        if src.shape == big.shape:
            reduced.append(src.shape)
        return resize(src, *args, **kwargs)

    try:
        faces = with_fallback.analyze(image)
        monkeypatch.setattr(cv2, "resize", counting_resize)
        big_faces = with_fallback.analyze(big)
    finally:
        with_fallback.close()
    assert len(faces) == 1 and len(big_faces) == 1
    assert len(reduced) == 1  # one reduced view for both looks
    # in the photo's pixels (those of the reduced view would be 7 % off: ~150 px here)
    scale = big.shape[0] / image.shape[0]
    expected = (faces[0].landmarks68 + 0.5) * scale - 0.5  # pixel centres
    error = np.linalg.norm(big_faces[0].landmarks68 - expected, axis=1)
    assert np.median(error) < 0.05 * _iod(big_faces[0].points5), error


def test_blank_and_tiny_images_have_no_face(analyzer):
    assert analyzer.analyze(np.full((480, 640, 3), 127, np.uint8)) == []
    assert analyzer.analyze(np.zeros((4, 4, 3), np.uint8)) == []


def test_small_face_in_large_photo_is_found_by_tiles(analyzer, photo):
    import cv2

    small = cv2.resize(photo, (256, 256), interpolation=cv2.INTER_AREA)  # face ~50 px
    scene = on_background(small, 1920, 1080, 1300, 700)
    found = analyzer.analyze(scene)
    assert len(found) == 1
    assert 1300 < found[0].points5[2, 0] < 1556 and 700 < found[0].points5[2, 1] < 956
    untiled = FaceAnalyzer(tile_size=0)
    try:
        assert len(untiled.analyze(scene)) == 0  # the whole-image pass alone misses it
    finally:
        untiled.close()


def test_tiles_cover_the_image():
    origins = tile_origins(1920, 1080, 640, 0.25)
    covered = np.zeros((1080, 1920), bool)
    for x, y in origins:
        covered[y:y + 640, x:x + 640] = True
    assert covered.all()
    assert tile_origins(500, 400, 640) == [(0, 0)]


# --------------------------------------------------------------------------- alignment


def test_similarity_estimation_recovers_a_known_transform():
    rng = np.random.default_rng(1)
    src = rng.uniform(0, 500, size=(5, 2))
    angle, scale, shift = 0.4, 1.7, np.array([12.0, -30.0])
    rot = scale * np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    m = estimate_similarity(src, src @ rot.T + shift)
    assert np.allclose(m[:, :2], rot) and np.allclose(m[:, 2], shift)
    back = transform_points(transform_points(src, m), invert_affine(m))
    assert np.allclose(back, src, atol=1e-3)


def test_aligned_crop_contains_the_whole_face(astro_faces):
    result = astro_faces[0]
    size = result.crop.shape[0]
    assert result.crop.shape == (224, 224, 3) and result.crop.dtype == np.uint8
    lm = result.crop_landmarks478
    assert (lm[:, :2] > 2).all() and (lm[:, :2] < size - 3).all()  # forehead top to chin inside
    p5 = points5(lm)
    assert np.abs(p5 - (TEMPLATE5 * size - 0.5)).max() < 0.06 * size
    # the stored transform maps crop landmarks back onto the original ones
    back = transform_points(lm, invert_affine(result.matrix))
    assert np.allclose(back[:, :2], result.face.landmarks478[:, :2], atol=0.01)


def test_warp_crop_samples_the_right_pixels():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, size=(300, 400, 3), dtype=np.uint8)
    m = np.array([[1.0, 0.0, -50.0], [0.0, 1.0, -20.0]])  # pure shift
    assert np.array_equal(warp_crop(image, m, 64), image[20:84, 50:114])
    # strong reduction: area-averaged pre-shrink agrees with a direct area resize
    import cv2

    smooth = cv2.GaussianBlur(image, (0, 0), 6)
    m = np.array([[0.25, 0.0, 0.0], [0.0, 0.25, 0.0]])
    reduced = warp_crop(smooth, m, 64)
    reference = cv2.resize(smooth[:256, :256], (64, 64), interpolation=cv2.INTER_AREA)
    assert np.abs(reduced.astype(int) - reference.astype(int))[2:-2, 2:-2].mean() < 2.0
    outside = warp_crop(image, np.array([[1.0, 0, 1000.0], [0, 1.0, 0]]), 16)
    assert (outside == 0).all()


# --------------------------------------------------------------------------- skin and masks


def test_skin_posterior_on_typical_colours():
    skin = np.array([[224, 172, 140], [198, 134, 110], [141, 85, 36], [255, 219, 172], [90, 56, 37]], np.uint8)
    other = np.array([[0, 0, 255], [30, 60, 200], [40, 200, 40], [255, 255, 255], [128, 128, 128]], np.uint8)
    assert (skin_posterior(skin) > 0.5).all()
    assert (skin_posterior(other) < 0.1).all()
    assert skin_posterior(np.array([0, 0, 255], np.uint8)) < 0.01  # saturated blue
    # uint8 fast path and float reference agree
    grid = np.random.default_rng(0).integers(0, 256, size=(2000, 3)).astype(np.uint8)
    assert np.abs(skin_posterior(grid) - skin_posterior(grid.astype(np.float64))).max() < 1e-4
    # a higher prior raises the posterior
    assert (skin_posterior(other, prior=0.9) >= skin_posterior(other, prior=0.5)).all()


def test_skin_attention_formula():
    p = np.array([0.0, 0.2, 0.5, 0.50001, 0.9, 1.0], np.float32)
    assert np.allclose(skin_attention(p), [0.0, 0.2, 0.5, 1.0, 1.0, 1.0])


def test_packaged_skin_model_equals_the_shared_table():
    shared = shared_dir() / "data" / "skin_gmm_jones_rehg.json"
    if not shared.is_file():
        pytest.skip(f"shared data not found at {shared} (set FACERECON_SHARED_DIR)")
    ours = json.loads(packaged_model_path().read_text())
    theirs = json.loads(shared.read_text())
    for cls in ("skin", "non_skin"):
        for field in ("mean_rgb", "diag_cov_rgb", "weight"):
            assert np.array_equal(np.asarray(ours[cls][field]), np.asarray(theirs[cls][field])), (cls, field)
    model = load_skin_model()
    assert model.skin.means.shape == (16, 3) and model.non_skin.variances.shape == (16, 3)


def test_masks_and_skin_on_the_astronaut(astro_faces):
    result = astro_faces[0]
    masks = result.masks
    assert set(masks) == {"face", "eyes", "brows", "lips", "inner_mouth", "valid"}
    face = masks["face"] > 0
    for name in ("eyes", "brows", "lips", "inner_mouth"):
        region = masks[name] > 0
        assert region.sum() > 20, name  # she smiles with teeth showing: inner mouth too
        assert (region & ~face).sum() < 0.05 * region.sum(), name
    assert not ((masks["lips"] > 0) & (masks["inner_mouth"] > 0)).any()
    assert 0.25 < face.mean() < 0.75 and (masks["valid"] == 255).all()
    # cheeks and forehead are skin; the attention is high there and lower off the face
    attention = result.skin_attention.astype(np.float32) / 255.0
    parts = (masks["eyes"] > 0) | (masks["brows"] > 0) | (masks["lips"] > 0) | (masks["inner_mouth"] > 0)
    assert attention[face & ~parts].mean() > 0.85
    assert attention[~face].mean() < attention[face & ~parts].mean() - 0.2


# --------------------------------------------------------------------------- command line


@pytest.fixture(scope="module")
def cli_batch(tmp_path_factory, photo):
    """One detect run over good photos, a group photo, a blank image and bad inputs."""
    root = tmp_path_factory.mktemp("batch")
    cwd = os.getcwd()
    os.chdir(root)
    try:
        save_rgb(root / "in" / "astronaut.png", photo)
        save_exif_rotated(root / "in" / "rotated6.png", photo, 6)
        save_exif_rotated(root / "in" / "rotated8.png", photo, 8)
        group, squares = group_photo()
        save_rgb(root / "in" / "group.png", group)
        save_rgb(root / "in" / "blank.jpg", np.full((240, 320, 3), 200, np.uint8))
        save_rgb(root / "in" / "ünï cödé" / "my photo ✓.png", photo)
        (root / "bad").mkdir()
        (root / "bad" / "zero.jpg").write_bytes(b"")
        (root / "bad" / "text.jpg").write_text("hello, I am not a JPEG\n")
        truncated_copy(save_rgb(root / "tmp.jpg", photo, quality=90), root / "bad" / "truncated.jpg")
        write_flat_png(root / "bad" / "huge.png", 20000, 20000)
        unreadable = save_rgb(root / "bad" / "unreadable.png", photo)
        unreadable_ok = can_make_unreadable(unreadable)
        args = ["detect", "in", "bad/zero.jpg", "bad/text.jpg", "bad/truncated.jpg", "bad/huge.png",
                "bad/unreadable.png", "missing.png", "--out", "out/det.h5", "--json"]
        result = _run(args)
        unreadable.chmod(0o644)
        yield {"root": root, "args": args, "result": result, "squares": squares,
               "unreadable_checked": unreadable_ok}
    finally:
        os.chdir(cwd)


def test_cli_batch_outcomes(cli_batch):
    result = cli_batch["result"]
    assert result.exit_code == 0, result.output
    data = _json(result)
    status = {item["key"]: item for item in data["results"]}
    assert status["astronaut.png"]["status"] == "ok" and status["astronaut.png"]["faces"] == 1
    assert status["ünï cödé/my photo ✓.png"]["status"] == "ok"
    assert status["group.png"]["faces"] == 2
    assert status["blank.jpg"]["status"] == "no_face"
    assert status["huge.png"]["status"] in ("no_face", "failed")  # works, or fails cleanly
    reasons = {f["key"]: f["reason"] for f in data["failures"]}
    expected = {"zero.jpg": "empty file", "text.jpg": "not an image", "truncated.jpg": "truncated",
                "missing.png": "no such file"}
    if cli_batch["unreadable_checked"]:
        expected["unreadable.png"] = "permission denied"
    for key, reason in expected.items():
        assert reason in reasons[key], (key, reasons.get(key))
        assert reasons[key] in result.stderr  # one line in the summary table
    assert data["failed"] == len(reasons) and data["images"] == len(data["results"])
    single = 4 if cli_batch["unreadable_checked"] else 5  # as root the "unreadable" photo is read
    assert data["faces"] == single + 2
    assert "detect summary" in result.stderr


def test_cli_output_layout(cli_batch):
    out = cli_batch["root"] / "out" / "det.h5"
    assert out.is_file() and not parts_dir(out).exists() and not lock_path(out).exists()
    with h5py.File(out, "r") as f:
        assert f.attrs["kind"] == "detections" and "settings" in f.attrs
        group = f["images"]["astronaut.png"]
        attrs = group.attrs
        assert attrs["key"] == "astronaut.png" and attrs["status"] == "ok" and attrs["n_faces"] == 1
        assert attrs["image_width"] == 512 and len(attrs["sha256"]) == 64
        assert attrs["source_path"] == str(cli_batch["root"] / "in" / "astronaut.png")
        assert json.loads(attrs["settings"])["crop_size"] == 224
        face = group["faces"]["0"]
        assert face["crop"].shape == (224, 224, 3) and face["crop"].compression == "gzip"
        assert face["landmarks478"].shape == (478, 3) and face["align_matrix"].shape == (2, 3)
        for name in ("face", "eyes", "brows", "lips", "inner_mouth", "valid"):
            assert face["masks"][name].shape == (224, 224)
        assert f["images"]["text.jpg"].attrs["status"] == "failed"


def test_exif_rotated_copies_give_the_upright_landmarks(cli_batch):
    records = {key: faces for key, _attrs, faces in iter_detections(cli_batch["root"] / "out" / "det.h5")}
    upright = records["astronaut.png"][0].landmarks478
    for key in ("rotated6.png", "rotated8.png"):
        assert len(records[key]) == 1
        assert np.abs(records[key][0].landmarks478[:, :2] - upright[:, :2]).max() < 0.5, key


def test_group_photo_faces_are_ordered_by_size(cli_batch):
    records = {key: faces for key, _attrs, faces in iter_detections(cli_batch["root"] / "out" / "det.h5")}
    faces = records["group.png"]
    assert [f.index for f in faces] == [0, 1]
    area = [(f.box[2] - f.box[0]) * (f.box[3] - f.box[1]) for f in faces]
    assert area[0] > 1.5 * area[1]
    for face, (x, y, side) in zip(faces, cli_batch["squares"]):
        nose = face.points5[2]
        assert x < nose[0] < x + side and y < nose[1] < y + side


def test_largest_keeps_one_face(cli_batch):
    result = _run(["detect", str(cli_batch["root"] / "in" / "group.png"), "--largest", "--json",
                   "--out", str(cli_batch["root"] / "largest.h5")])
    assert result.exit_code == 0
    assert _json(result)["faces"] == 1
    records = list(iter_detections(cli_batch["root"] / "largest.h5"))
    x, y, side = cli_batch["squares"][0]
    assert x < records[0][2][0].points5[2, 0] < x + side


def test_resume_skips_done_images_and_overwrite_redoes_them(cli_batch):
    root = cli_batch["root"]
    out = root / "out" / "det.h5"
    before = {k: a["processed_at"] for k, a, _f in iter_detections(out) if a["status"] != "failed"}
    cwd = os.getcwd()
    os.chdir(root)
    try:
        again = _run(["detect", "in", "bad/zero.jpg", "--out", "out/det.h5", "--json"])
        assert again.exit_code == 0
        data = _json(again)
        assert data["skipped"] == 6 and data["processed"] == 0 and data["failed"] == 1
        after = {k: a["processed_at"] for k, a, _f in iter_detections(out) if a["status"] != "failed"}
        assert after == before  # failures are retried, done images are not touched
        time.sleep(1.1)  # processed_at has one-second resolution
        redo = _run(["detect", "in/blank.jpg", "in/astronaut.png", "--out", "out/det.h5", "--json",
                     "--overwrite"])
        data = _json(redo)
        assert data["processed"] == 2 and data["skipped"] == 0
        after = {k: a["processed_at"] for k, a, _f in iter_detections(out)}
        assert after["astronaut.png"] != before["astronaut.png"]
        assert after["group.png"] == before["group.png"]
        # a changed setting is not "done": the image is processed again
        changed = _run(["detect", "in/blank.jpg", "--out", "out/det.h5", "--json", "--crop-size", "128"])
        assert _json(changed)["processed"] == 1
    finally:
        os.chdir(cwd)


def test_exit_codes(tmp_path):
    only_bad = tmp_path / "bad.jpg"
    only_bad.write_text("nope")
    result = _run(["detect", str(only_bad), "--out", str(tmp_path / "o.h5"), "--json"])
    assert result.exit_code == 1 and _json(result)["failed"] == 1
    assert _run(["detect", str(only_bad)]).exit_code == 2                      # --out missing
    assert _run(["detect", "--out", str(tmp_path / "o.h5")]).exit_code == 2    # no INPUTS
    assert _run(["detect", str(only_bad), "--out", str(tmp_path / "o.h5"), "--crop-size", "x"]).exit_code == 2
    assert _run(["detect", str(only_bad), "--out", str(tmp_path), "--json"]).exit_code == 2  # a directory
    both = _run(["detect", str(only_bad), "--out", str(tmp_path / "o.h5"), "--largest", "--max-faces", "3"])
    assert both.exit_code == 2


# --------------------------------------------------------------------------- processes


def _spawn_detect(args: list[str], cwd: Path) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT))
    return subprocess.Popen([sys.executable, "-m", "facerecon", "detect", *args], cwd=cwd, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.fixture(scope="module")
def many_photos(tmp_path_factory, photo):
    """60 different 640x480 photos of the astronaut (distinct files, distinct SHA-256)."""
    import cv2

    root = tmp_path_factory.mktemp("many")
    portrait = cv2.resize(photo, (300, 300), interpolation=cv2.INTER_AREA)
    for i in range(60):
        scene = on_background(portrait, 640, 480, 20 + 5 * i, 40 + 2 * i, seed=i)
        save_rgb(root / "photos" / f"p{i:02d}.jpg", scene, quality=85)
    return root


def test_kill_9_mid_batch_then_resume(many_photos, tmp_path):
    out = tmp_path / "det.h5"
    proc = _spawn_detect([str(many_photos / "photos"), "--out", str(out), "--pack-interval", "0.3", "-q"],
                         tmp_path)
    deadline = time.monotonic() + 60
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            with open_results(out, "images") as results:
                if len(results) >= 8:
                    break
            time.sleep(0.02)
        assert proc.poll() is None, "the batch finished before it could be killed"
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait()
    with open_results(out, "images") as results:
        done = results.keys()
        assert 8 <= len(done) < 60
        for key in done:
            group = results[key]
            assert group.attrs["status"] == "ok"
            assert group["faces"]["0"]["crop"][()].shape == (224, 224, 3)
    rerun = _spawn_detect([str(many_photos / "photos"), "--out", str(out), "--json", "-q"], tmp_path)
    stdout, stderr = rerun.communicate(timeout=120)
    assert rerun.returncode == 0, stderr
    data = json.loads(stdout)
    assert data["skipped"] >= len(done) and data["skipped"] + data["processed"] == 60
    with h5py.File(out, "r") as f:
        assert len(f["images"]) == 60
    assert not parts_dir(out).exists()


def test_second_writer_refused_and_sigterm_saves_work(many_photos, tmp_path):
    out = tmp_path / "det.h5"
    # big crops make this run slow enough (~10 images/s) to still be running when stopped
    first = _spawn_detect([str(many_photos / "photos"), "--out", str(out), "-q", "--crop-size", "1024"], tmp_path)
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not list(parts_dir(out).glob("[!.]*.h5")):
            time.sleep(0.02)  # until a first image is complete
        second = _run(["detect", str(ASTRONAUT_PNG), "--out", str(out), "--json"])
        assert second.exit_code == 1
        assert "being written by process" in second.stderr and str(first.pid) in second.stderr
        assert "being written" in _json(second)["error"]
        first.send_signal(signal.SIGTERM)
        _, stderr = first.communicate(timeout=60)
    finally:
        if first.poll() is None:
            first.kill()
            first.wait()
    assert first.returncode == 130, stderr
    assert "interrupted" in stderr
    assert not parts_dir(out).exists() and not lock_path(out).exists()
    with h5py.File(out, "r") as f:
        assert len(f["images"]) >= 1
