"""The AFLW2000-3D protocol: NME, yaw bins, the .mat reader, layout discovery, and the
`evaluate aflw2000` command end to end on a miniature AFLW2000-3D folder rendered from the
face model (image<NNNNN>.jpg + .mat with pt3d_68 and Pose_Para, written with scipy)."""

from __future__ import annotations

import csv
import json
import math

import numpy as np
import pytest
from click.testing import CliRunner
from scipy.io import savemat

from facerecon.cli import main
from facerecon.evaluation import aflw2000

IMAGE_SIZE = 320
YAWS = (6.0, 42.0, -64.0)  # one face per yaw bin (the last one negative: bins use |yaw|)


def write_mat(path, landmarks_xy: np.ndarray, pitch: float, yaw: float, roll: float) -> None:
    """An AFLW2000-3D annotation: pt3d_68 (3, 68) and Pose_Para (1, 7), angles in radians."""
    points = np.concatenate([np.asarray(landmarks_xy, np.float64).T, np.zeros((1, 68))], axis=0)
    savemat(str(path), {"pt3d_68": points, "Pose_Para": np.array([[pitch, yaw, roll, 0.0, 0.0, 0.0, 1.0]])})


@pytest.fixture(scope="module")
def aflw_tree(ict_embedded_model, tmp_path_factory):
    """image00002..4: faces at |yaw| 6, 42, 64 with exact landmarks; image00005.jpg without
    .mat; image00006.jpg unreadable (with .mat); image00007.mat without a photo."""
    import cv2
    import torch

    from facerecon.facemodel.tensors import FaceModelTensors
    from facerecon.synthetic import random_parameters, render_faces, textured_backgrounds, to_uint8

    root = tmp_path_factory.mktemp("aflw") / "AFLW2000"
    root.mkdir()
    tensors = FaceModelTensors(ict_embedded_model)
    generator = torch.Generator().manual_seed(11)
    count = len(YAWS)
    params = random_parameters(tensors, count, generator, expression_scale=0.2)
    params["angles"][:, 0] = torch.deg2rad(torch.tensor([-4.0, 3.0, -2.0]))
    params["angles"][:, 1] = torch.deg2rad(torch.tensor(YAWS))
    params["angles"][:, 2] = torch.deg2rad(torch.tensor([2.0, -3.0, 1.0]))
    batch = render_faces(tensors, params, IMAGE_SIZE, textured_backgrounds(count, IMAGE_SIZE, generator), zoom=0.6)
    photos = to_uint8(batch.images)
    for i in range(count):
        name = f"image{i + 2:05d}"
        cv2.imwrite(str(root / f"{name}.jpg"), np.ascontiguousarray(photos[i][..., ::-1]),
                    [cv2.IMWRITE_JPEG_QUALITY, 95])
        angles = params["angles"][i].tolist()
        write_mat(root / f"{name}.mat", batch.landmarks68[i].numpy(), *angles)
    cv2.imwrite(str(root / "image00005.jpg"), np.ascontiguousarray(photos[0][..., ::-1]))
    (root / "image00006.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    write_mat(root / "image00006.mat", batch.landmarks68[0].numpy(), 0.0, 0.1, 0.0)
    write_mat(root / "image00007.mat", batch.landmarks68[0].numpy(), 0.0, 0.1, 0.0)
    return root


# --------------------------------------------------------------------------- end to end


def test_evaluate_aflw2000_end_to_end_and_resume(aflw_tree, ict_embedded_model_file, tmp_path):
    out = tmp_path / "eval"
    args = ["evaluate", "aflw2000", str(aflw_tree.parent), "--out", str(out), "--face-model",
            str(ict_embedded_model_file), "--steps", "40", "0", "0", "--json"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    assert "mean of bins" in result.output and "(60, 90]" in result.output  # the rich table (stderr)
    data = json.loads(result.output[result.output.index("{\n"):])
    assert data["protocol"] == "aflw2000" and data["images_total"] == 6 and data["scored"] == 3
    bins = data["yaw_bins"]
    assert [b["yaw_bin"] for b in bins] == ["[0, 30]", "(30, 60]", "(60, 90]"]
    # annotated images per bin: image00006 (unreadable photo) and image00007 (no photo) have |yaw| 5.7
    assert [(b["images"], b["scored"]) for b in bins] == [(3, 1), (1, 1), (1, 1)]
    for row in bins:
        assert 0.0 < row["nme_mean_percent"] < 15.0 and math.isfinite(row["detector_nme_mean_percent"])
    means = [b["nme_mean_percent"] for b in bins]
    assert data["nme_balanced_percent"] == pytest.approx(np.mean(means))
    assert data["nme_mean_percent"] == pytest.approx(np.mean([r["nme_percent"] for r in data["images"]
                                                              if r["status"] == "ok"]))
    rows = {r["image"]: r for r in data["images"]}
    assert rows["image00003.jpg"]["yaw_bin"] == "(30, 60]" and rows["image00004.jpg"]["yaw_bin"] == "(60, 90]"
    assert abs(rows["image00004.jpg"]["yaw_degrees"] + 64.0) < 1e-3
    assert rows["image00002.jpg"]["box_iou"] > 0.7 and rows["image00002.jpg"]["face"] == 0
    assert rows["image00005.jpg"]["reason"].startswith("missing annotation")
    assert rows["image00006.jpg"]["status"] == "failed" and rows["image00006.jpg"]["reason"]
    assert rows["image00007.jpg"]["reason"].startswith("missing image")
    assert data["images_fitted_this_run"] == 3 and data["seconds_per_image"] > 0
    table = list(csv.DictReader((out / "aflw2000_results.csv").open()))
    assert len(table) == 6 and sum(r["status"] == "ok" for r in table) == 3
    assert json.loads((out / "aflw2000_results.json").read_text())["scored"] == 3
    for plot in ("aflw2000_nme_by_yaw.png", "aflw2000_cumulative_nme.png"):
        assert (out / plot).stat().st_size > 2000
    # resumable: nothing is fitted again and the numbers are the same
    again = CliRunner().invoke(main, args)
    assert again.exit_code == 0, again.output
    second = json.loads(again.output[again.output.index("{\n"):])
    assert second["images_fitted_this_run"] == 0 and second["images_resumed"] == 3
    assert [b["nme_mean_percent"] for b in second["yaw_bins"]] == means


def test_evaluate_aflw2000_bad_inputs(tmp_path, ict_embedded_model_file):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "photo.jpg").write_bytes(b"x")
    result = CliRunner().invoke(main, ["evaluate", "aflw2000", str(empty), "--out", str(tmp_path / "o"), "-q",
                                       "--face-model", str(ict_embedded_model_file)])
    assert result.exit_code == 1 and "no .mat annotations" in result.output
    only_mats = tmp_path / "mats"
    only_mats.mkdir()
    write_mat(only_mats / "image00002.mat", np.random.default_rng(0).uniform(0, 100, (68, 2)), 0.0, 0.0, 0.0)
    result = CliRunner().invoke(main, ["evaluate", "aflw2000", str(only_mats), "--out", str(tmp_path / "o2"), "-q",
                                       "--face-model", str(ict_embedded_model_file), "--json"])
    assert result.exit_code == 1
    assert json.loads(result.output)["images"][0]["reason"].startswith("missing image")
    assert CliRunner().invoke(main, ["evaluate", "aflw2000", str(only_mats), "--out", str(tmp_path / "o3"),
                                     "--limit", "0"]).exit_code == 2


def test_evaluate_aflw2000_stop_keeps_reports(aflw_tree, ict_embedded_model_file, tmp_path):
    options = aflw2000.AflwOptions(face_model=str(ict_embedded_model_file), limit=2)
    stopped = aflw2000.run_aflw2000(aflw_tree, tmp_path / "stopped", options, should_stop=lambda: True)
    assert stopped.summary["interrupted"] and stopped.summary["scored"] == 0
    assert [r["image"] for r in stopped.rows] == ["image00002.jpg", "image00003.jpg"]
    assert all(r["reason"].startswith("not reconstructed (interrupted") for r in stopped.rows)
    assert json.loads((tmp_path / "stopped" / "aflw2000_results.json").read_text())["interrupted"]


# --------------------------------------------------------------------------- units


def test_nme_known_values():
    truth = np.array([[10.0, 20.0], [110.0, 20.0], [10.0, 70.0], [60.0, 45.0]])  # box 100 x 50
    assert aflw2000.nme(truth, truth) == 0.0
    shifted = truth + np.array([3.0, 4.0])  # every point 5 px off
    assert aflw2000.nme(shifted, truth) == pytest.approx(5.0 / math.sqrt(100 * 50))
    one_off = truth.copy()
    one_off[3] += [0.0, 8.0]  # one of four points 8 px off
    assert aflw2000.nme(one_off, truth) == pytest.approx(2.0 / math.sqrt(5000))
    batch = aflw2000.nme(np.stack([truth, shifted]), np.stack([truth, truth]))
    assert np.allclose(batch, [0.0, 5.0 / math.sqrt(5000)])
    pt3d = np.concatenate([truth, np.full((4, 1), 99.0)], axis=1)  # z of pt3d_68 is ignored
    assert aflw2000.nme(shifted, pt3d) == pytest.approx(5.0 / math.sqrt(5000))
    with pytest.raises(ValueError):
        aflw2000.nme(truth[:3], truth)


def test_yaw_bins_follow_the_protocol():
    cases = {0.0: 0, 29.9: 0, 30.0: 0, -30.0: 0, 30.01: 1, -45.0: 1, 60.0: 1, 60.01: 2, -89.0: 2, 90.0: 2, 104.0: 2}
    assert {yaw: aflw2000.yaw_bin(yaw) for yaw in cases} == cases
    assert aflw2000.yaw_bin(float("nan")) is None and aflw2000.yaw_bin(None) is None
    rows = [{"yaw_bin": label, "status": status, "nme_percent": value, "detector_nme_percent": None}
            for label, status, value in [("[0, 30]", "ok", 2.0), ("[0, 30]", "ok", 4.0), ("(30, 60]", "ok", 5.0),
                                         ("(30, 60]", "failed", None), ("(60, 90]", "ok", 9.0)]]
    table = aflw2000.aggregate(rows)
    assert [(b["images"], b["scored"], b["nme_mean_percent"]) for b in table] == \
        [(2, 2, 3.0), (2, 1, 5.0), (1, 1, 9.0)]
    assert table[0]["nme_std_percent"] == pytest.approx(1.0)


def test_read_annotation_and_layout(tmp_path):
    points = np.random.default_rng(1).uniform(50, 300, (68, 2))
    write_mat(tmp_path / "image00010.mat", points, 0.1, math.radians(-50.0), 0.2)
    annotation = aflw2000.read_annotation(tmp_path / "image00010.mat")
    assert annotation.landmarks.shape == (68, 3) and np.allclose(annotation.landmarks[:, :2], points)
    assert annotation.yaw_degrees == pytest.approx(-50.0) and annotation.pose.shape == (7,)
    savemat(str(tmp_path / "image00011.mat"), {"pt3d_68": points, "Pose_Para": np.zeros((1, 7))})  # (68, 2)
    assert np.allclose(aflw2000.read_annotation(tmp_path / "image00011.mat").landmarks[:, :2], points)
    savemat(str(tmp_path / "image00012.mat"), {"pt2d": points.T})  # 300W-LP layout: read as well
    assert np.allclose(aflw2000.read_annotation(tmp_path / "image00012.mat").landmarks[:, :2], points)
    savemat(str(tmp_path / "image00015.mat"), {"other": points.T})
    with pytest.raises(ValueError, match="no pt3d_68 or pt2d"):
        aflw2000.read_annotation(tmp_path / "image00015.mat")
    (tmp_path / "image00013.mat").write_bytes(b"garbage")
    with pytest.raises(ValueError, match="unreadable annotation"):
        aflw2000.read_annotation(tmp_path / "image00013.mat")
    (tmp_path / "image00010.jpg").write_bytes(b"")
    (tmp_path / "image00014.jpg").write_bytes(b"")
    (tmp_path / "notes.txt").write_text("x")
    items = aflw2000.discover_items(tmp_path)
    assert [i.name for i in items] == [f"image000{n}.jpg" for n in (10, 11, 12, 13, 14, 15)]
    by_name = {i.name: i for i in items}
    assert by_name["image00010.jpg"].image is not None and by_name["image00010.jpg"].annotation is not None
    assert by_name["image00011.jpg"].image is None and by_name["image00014.jpg"].annotation is None


def test_projection_and_face_choice(ict_embedded_model):
    k = np.array([[500.0, 0.0, 111.5], [0.0, 500.0, 111.5], [0.0, 0.0, 1.0]])
    align = np.array([[0.5, 0.0, -10.0], [0.0, 0.5, 4.0]])  # photo -> crop: half size, shifted
    points = np.array([[0.0, 0.0, 1000.0], [20.0, -10.0, 1000.0]])
    photo = aflw2000.project_to_photo(points, k, align)
    crop = np.array([[111.5, 111.5], [121.5, 106.5]])
    assert np.allclose(photo, (crop - [-10.0, 4.0]) / 0.5)
    # two fitted faces: the one whose landmarks overlap the annotation is chosen
    model = ict_embedded_model
    vertices = model.mean_shape.astype(np.float64) + [0.0, 0.0, 1000.0]
    near = {"vertices_camera": vertices, "intrinsics": k, "align_matrix": np.array([[1.0, 0, 0], [0, 1.0, 0]]),
            "attrs": {"status": "ok", "index": 0}}
    far = dict(near, align_matrix=np.array([[1.0, 0, -150.0], [0, 1.0, 0]]), attrs={"status": "ok", "index": 1})
    truth = aflw2000.project_to_photo(aflw2000.landmark_points68(model, vertices), k, far["align_matrix"])
    choice, landmarks, iou = aflw2000.score_faces([near, far], truth, model)
    assert choice == 1 and iou == pytest.approx(1.0) and aflw2000.nme(landmarks, truth) < 1e-9
    assert aflw2000.score_faces([near], truth, model)[2] < aflw2000.MIN_BOX_IOU
