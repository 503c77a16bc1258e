"""The MICC Florence protocol: layout reader, frame sampling, neutral averaging, and the
`evaluate micc` command end to end on a miniature MICC tree rendered from the face model."""

from __future__ import annotations

import csv
import json
import math

import numpy as np
import pytest
from click.testing import CliRunner

from facerecon.cli import main
from facerecon.evaluation import micc

FRAME_SIZE = 320


def write_obj(path, vertices, triangles) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = [f"v {x:.4f} {y:.4f} {z:.4f}" for x, y, z in vertices]
    lines += [f"f {a + 1}/{a + 1} {b + 1}/{b + 1} {c + 1}/{c + 1}" for a, b, c in triangles]
    path.write_text("\n".join(lines) + "\n")


def write_video(path, frames_rgb) -> None:
    import cv2

    path.parent.mkdir(parents=True, exist_ok=True)
    height, width = frames_rgb[0].shape[:2]
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 25, (width, height))
    assert writer.isOpened()
    for frame in frames_rgb:
        writer.write(np.ascontiguousarray(frame[..., ::-1]))
    writer.release()


def write_frames(folder, frames_rgb) -> None:
    import cv2

    folder.mkdir(parents=True, exist_ok=True)
    for i, frame in enumerate(frames_rgb):
        cv2.imwrite(str(folder / f"{i:04d}.jpg"), np.ascontiguousarray(frame[..., ::-1]))


def render_subject(tensors, model, generator, frames: int = 6):
    """One identity: its neutral face scan (mm, face area) and ``frames`` photos with small
    pose and expression changes."""
    import torch

    from facerecon.evaluation.geometry import crop_sphere
    from facerecon.synthetic import random_parameters, render_faces, textured_backgrounds, to_uint8

    base = random_parameters(tensors, 1, generator, yaw_degrees=0.0, pitch_degrees=0.0)
    varied = random_parameters(tensors, frames, generator, expression_scale=0.15)
    params = {k: v.repeat(frames, *([1] * (v.dim() - 1))) for k, v in base.items()}
    params["expression"] = varied["expression"]
    params["angles"][:, 0] = torch.deg2rad(torch.linspace(-6, 6, frames))
    params["angles"][:, 1] = torch.deg2rad(torch.linspace(-15, 15, frames))
    params["angles"][:, 2] = 0.0
    background = textured_backgrounds(1, FRAME_SIZE, generator).expand(frames, -1, -1, -1)
    photos = to_uint8(render_faces(tensors, params, FRAME_SIZE, background.contiguous(), zoom=0.6).images)
    neutral = tensors.shape(base["identity"], torch.zeros_like(base["expression"]))[0].numpy().astype(np.float64)
    tip = neutral[model.landmarks68[30]]
    scan, triangles, _ = crop_sphere(neutral, tip, 115.0, model.triangles)
    return scan, triangles, list(photos)


@pytest.fixture(scope="module")
def micc_tree(ict_embedded_model, tmp_path_factory):
    """subject_01: scan, cooperative .mjpg (raw MJPEG, as MICC), indoor as a frame folder;
    subject_02: scan, cooperative .avi, no indoor video."""
    import torch

    from facerecon.facemodel.tensors import FaceModelTensors

    root = tmp_path_factory.mktemp("micc")
    tensors = FaceModelTensors(ict_embedded_model)
    generator = torch.Generator().manual_seed(3)
    for number, extension in ((1, ".mjpg"), (2, ".avi")):
        subject = root / f"subject_{number:02d}"
        scan, triangles, photos = render_subject(tensors, ict_embedded_model, generator)
        write_obj(subject / "Model" / "frontal1" / "obj" / "110920150452.obj", scan, triangles)
        write_video(subject / "Video" / f"Indoor-Cooperative{extension}", photos)
        if number == 1:
            write_frames(subject / "Video" / "PTZ-Indoor", photos[::-1])
    return root


# --------------------------------------------------------------------------- end to end


def test_evaluate_micc_end_to_end_and_resume(micc_tree, ict_embedded_model_file, tmp_path):
    out = tmp_path / "eval"
    args = ["evaluate", "micc", str(micc_tree), "--out", str(out), "--scenarios", "cooperative,indoor",
            "--frames", "3", "--face-model", str(ict_embedded_model_file), "--steps", "60", "25", "0", "--json"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    assert "per subject" in result.output and "subject_02" in result.output  # rich tables (stderr)
    data = json.loads(result.output[result.output.index("{\n"):])
    assert data["protocol"] == "micc" and data["variant"] == micc.VARIANT and data["crop_radius_mm"] == 95.0
    table = {row["scenario"]: row for row in data["scenarios"]}
    assert list(table) == ["cooperative", "indoor"]
    assert (table["cooperative"]["videos"], table["cooperative"]["scored"]) == (2, 2)
    assert (table["indoor"]["videos"], table["indoor"]["scored"]) == (2, 1)
    for row in table.values():
        assert 0.1 < row["rmse_mean_mm"] < 4.0 and math.isfinite(row["rmse_std_mm"])
        assert 0.05 < row["mean_distance_mean_mm"] < 4.0
    videos = {(r["subject"], r["scenario"]): r for r in data["videos"]}
    assert set(videos) == {("subject_01", "cooperative"), ("subject_01", "indoor"), ("subject_02", "cooperative"),
                           ("subject_02", "indoor")}
    for key in [("subject_01", "cooperative"), ("subject_01", "indoor"), ("subject_02", "cooperative")]:
        row = videos[key]
        assert row["status"] == "ok" and row["frames_decoded"] == 6 and row["frames_sampled"] == 3
        assert 1 <= row["frames_fitted"] <= 3 and 0.8 < row["scale"] < 1.25 and row["seconds"] > 0
    assert videos[("subject_01", "indoor")]["video_kind"] == "frames"
    missing = videos[("subject_02", "indoor")]
    assert missing["status"] == "failed" and missing["reason"].startswith("missing video")
    assert sorted(p.name for p in (out / "frames" / "subject_01" / "cooperative").glob("*.png")) == \
        ["frame_000001.png", "frame_000003.png", "frame_000005.png"]
    rows = list(csv.DictReader((out / "micc_results.csv").open()))
    assert len(rows) == 4 and {r["status"] for r in rows} == {"ok", "failed"}
    assert json.loads((out / "micc_results.json").read_text())["scored"] == 3
    for plot in ("micc_cumulative_error.png", "micc_error_heatmap.png"):
        assert (out / plot).stat().st_size > 2000
    # resumable: finished videos are not decoded, fitted or scored again
    again = CliRunner().invoke(main, args)
    assert again.exit_code == 0, again.output
    second = json.loads(again.output[again.output.index("{\n"):])
    resumed = {(r["subject"], r["scenario"]): r for r in second["videos"]}
    assert all(resumed[k]["resumed"] for k in videos if videos[k]["status"] == "ok")
    assert [r["rmse_mean_mm"] for r in second["scenarios"]] == [r["rmse_mean_mm"] for r in data["scenarios"]]
    assert second["seconds_per_video"] is None and second["elapsed_seconds"] < data["elapsed_seconds"]


def test_evaluate_micc_nothing_scored_exits_1(tmp_path, ict_embedded_model_file):
    subject = tmp_path / "micc" / "subject_01"
    (subject / "Video").mkdir(parents=True)
    (subject / "Video" / "Indoor-Cooperative.mjpg").write_bytes(b"not a video")
    x, y = np.meshgrid(np.arange(-60.0, 61.0, 5.0), np.arange(-60.0, 61.0, 5.0))
    dome = np.stack([x.ravel(), y.ravel(), 30 * np.exp(-(x.ravel() ** 2 + y.ravel() ** 2) / 2000)], axis=1)
    write_obj(subject / "Model" / "frontal1" / "obj" / "1.obj", dome, np.zeros((0, 3), int))
    args = ["evaluate", "micc", str(tmp_path / "micc"), "--out", str(tmp_path / "out"), "--scenarios", "cooperative",
            "--face-model", str(ict_embedded_model_file), "--json", "-q"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 1, result.output
    data = json.loads(result.output[result.output.index("{\n"):])
    assert data["videos"][0]["reason"].startswith("no frames decoded from")
    assert CliRunner().invoke(main, args[:-2] + ["--scenarios", "sideways"]).exit_code == 2
    stopped = micc.run_micc(tmp_path / "micc", tmp_path / "stopped", micc.MiccOptions(
        face_model=str(ict_embedded_model_file), scenarios=("cooperative",)), should_stop=lambda: True)
    assert stopped.summary["interrupted"] and stopped.rows == []
    empty = CliRunner().invoke(main, ["evaluate", "micc", str(tmp_path / "out"), "--out", str(tmp_path / "o2"), "-q"])
    assert empty.exit_code == 1 and "subject_XX" in empty.output


# --------------------------------------------------------------------------- units


def test_discover_subjects_views_scenarios_and_missing_scan(tmp_path):
    root = tmp_path / "MICC"
    tri = np.array([[0, 1, 2]])
    points = np.eye(3)
    # subject_02: frontal1 and frontal2 -> frontal1; videos in both naming styles
    s2 = root / "subject_02"
    write_obj(s2 / "Model" / "frontal2" / "obj" / "2.obj", points, tri)
    write_obj(s2 / "Model" / "frontal1" / "obj" / "9.obj", points, tri)
    (s2 / "Model" / "frontal1" / "vrml").mkdir()
    (s2 / "Video").mkdir()
    (s2 / "Video" / "Indoor-Cooperative.MJPEG").write_bytes(b"")
    (s2 / "Video" / "PTZ-Outdoor.mpg").write_bytes(b"")
    (s2 / "Video" / "PTZ-Indoor").mkdir()
    (s2 / "Video" / "PTZ-Indoor" / "0001.png").write_bytes(b"")
    (s2 / "Video" / "notes.txt").write_text("x")
    # subject_10: frontal2 only (like MICC's subject 30 the other way round) -> frontal2
    s10 = root / "subject_10"
    write_obj(s10 / "Model" / "frontal2" / "obj" / "5.obj", points, tri)
    write_obj(s10 / "Model" / "sidel" / "obj" / "1.obj", points, tri)
    # subject_3: side views only -> first by name; an empty frame folder is no video
    s3 = root / "subject_3"
    write_obj(s3 / "Model" / "sider" / "obj" / "1.obj", points, tri)
    write_obj(s3 / "Model" / "sidel" / "obj" / "1.obj", points, tri)
    (s3 / "Video" / "Indoor-Cooperative").mkdir(parents=True)
    # subject_04: no scan at all
    (root / "subject_04" / "Model" / "frontal1" / "vrml").mkdir(parents=True)
    (root / "other").mkdir()

    subjects = micc.discover_subjects(root)
    assert [s.name for s in subjects] == ["subject_02", "subject_3", "subject_04", "subject_10"]
    by_name = {s.name: s for s in subjects}
    assert by_name["subject_02"].scan_view == "frontal1" and by_name["subject_02"].scan.name == "9.obj"
    assert by_name["subject_10"].scan_view == "frontal2"
    assert by_name["subject_3"].scan_view == "sidel"
    assert by_name["subject_04"].scan is None and by_name["subject_04"].scan_reason.startswith("missing scan")
    videos = by_name["subject_02"].videos
    assert videos["cooperative"].kind == "video" and videos["cooperative"].path.name == "Indoor-Cooperative.MJPEG"
    assert videos["indoor"].kind == "frames" and videos["indoor"].path.name == "PTZ-Indoor"
    assert videos["outdoor"].path.name == "PTZ-Outdoor.mpg"
    assert by_name["subject_3"].videos == {"cooperative": None, "indoor": None, "outdoor": None}
    assert list(micc.discover_subjects(root, ["indoor"])[0].videos) == ["indoor"]
    assert [s.name for s in micc.discover_subjects(s2)] == ["subject_02"]  # ROOT may be one subject
    with pytest.raises(ValueError, match="subject_XX"):
        micc.discover_subjects(tmp_path / "MICC" / "other")
    with pytest.raises(ValueError, match="unknown MICC scenario"):
        micc.discover_subjects(root, ["sideways"])


def test_frame_sampling_counts_by_decoding(tmp_path):
    frames = [np.full((48, 64, 3), 10 * i, np.uint8) for i in range(11)]
    video = tmp_path / "Indoor-Cooperative.mjpg"  # raw MJPEG: its metadata frame count is meaningless
    write_video(video, frames)
    assert micc.count_decodable_frames(video) == 11
    assert micc.count_decodable_frames(tmp_path / "missing.mjpg") == 0
    assert micc.sample_indices(11, 4) == [1, 4, 6, 9] and micc.sample_indices(3, 5) == [0, 1, 2]
    assert micc.sample_indices(0, 5) == []
    out = tmp_path / "frames"
    sample = micc.sample_frames(micc.VideoSource(video, "video"), out, 4)
    assert sample.decoded == 11 and sample.indices == [1, 4, 6, 9] and not sample.reused
    assert sorted(p.name for p in out.glob("*.png")) == [micc.frame_name(i) for i in (1, 4, 6, 9)]
    import cv2

    assert abs(int(cv2.imread(str(out / micc.frame_name(6)))[..., 0].mean()) - 60) <= 3
    assert micc.sample_frames(micc.VideoSource(video, "video"), out, 4).reused
    resampled = micc.sample_frames(micc.VideoSource(video, "video"), out, 2)  # stale PNGs removed
    assert not resampled.reused and sorted(p.name for p in out.glob("*.png")) == \
        [micc.frame_name(i) for i in (2, 8)]
    folder = tmp_path / "PTZ-Indoor"
    write_frames(folder, frames[:5])
    from_folder = micc.sample_frames(micc.VideoSource(folder, "frames"), tmp_path / "f2", 10)
    assert from_folder.decoded == 5 and len(from_folder.files) == 5


def test_average_neutral_uses_fitted_frames_only():
    a, b = np.zeros((4, 3), np.float32), np.ones((4, 3), np.float32) * 2
    fits = [
        ("frame_000001.png", {"status": "ok"}, [{"vertices_neutral": a, "vertices": a + 5}]),
        ("frame_000002.png", {"status": "ok"}, [{"vertices_neutral": b}, {"vertices_neutral": b * 100}]),
        ("frame_000003.png", {"status": "no_face"}, []),
        ("frame_000004.png", {"status": "failed"}, [{"align_matrix": np.eye(2, 3)}]),
        ("frame_000005.png", {"status": "ok"}, [{"vertices_neutral": np.full((4, 3), np.nan, np.float32)}]),
        ("stale.png", {"status": "ok"}, [{"vertices_neutral": b * 7}]),
    ]
    mean, used = micc.average_neutral(fits, keys=[f"frame_00000{i}.png" for i in range(1, 6)])
    assert used == ["frame_000001.png", "frame_000002.png"] and np.allclose(mean, 1.0)
    assert micc.average_neutral(fits[2:4]) == (None, [])


def test_scan_scoring_recovers_a_similarity(ict_model):
    from facerecon.evaluation.geometry import crop_sphere

    neutral = ict_model.mean_shape.astype(np.float64)
    tip_index = int(ict_model.landmarks68[30])
    scan, _, _ = crop_sphere(neutral, neutral[tip_index], 120.0)
    angle = np.deg2rad(8.0)
    rotation = np.array([[np.cos(angle), 0, np.sin(angle)], [0, 1, 0], [-np.sin(angle), 0, np.cos(angle)]])
    moved = 1.05 * scan @ rotation.T + np.array([5.0, -40.0, 300.0])
    tip = micc.find_scan_nose_tip(moved)
    assert np.linalg.norm(tip - (1.05 * neutral[tip_index] @ rotation.T + [5.0, -40.0, 300.0])) < 6.0
    gt_points, _, _ = crop_sphere(moved, tip, micc.CROP_RADIUS_MM)
    gt = micc.GroundTruth(gt_points, tip, len(moved), 3.0)
    score = micc.score_shape(neutral, ict_model.triangles, tip_index, gt)
    assert score.rmse_point_to_plane < 0.2 and abs(score.scale - 1.05) < 0.01
    assert np.isfinite(score.vertex_errors).sum() > 1000 and np.nanmax(score.vertex_errors) < 1.0
