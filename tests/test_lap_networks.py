"""Paper 003 (LAP), networks route: eq. 4 aggregation, the filtered connection and attribute
injection, the [lap] training configuration, a CPU smoke run of the three training steps and
`facerecon aggregate --method lap --checkpoint`."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from click.testing import CliRunner

from facerecon.networks.lap import (AttributeInjection, AttributeRefiner, FilteredConnection, LapNetworks,
                                    aggregate_codes, load_lap_networks)
from facerecon.training.config import ConfigError, parse_config
from tests.helpers_detect import write_synth_detections

SIZE = 64


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny tensors: one intra-op thread is as fast and does not collapse on shared cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# --------------------------------------------------------------------------- eq. 4


def test_aggregation_weights_are_a_softmax_over_the_album_per_channel():
    torch.manual_seed(0)
    codes = torch.randn(2, 3, 5)  # G = 2 albums of N = 3 photos, c = 5
    logits = torch.randn(2, 3, 5)
    merged, weights = aggregate_codes(codes, logits)
    assert merged.shape == (2, 5) and weights.shape == (2, 3, 5)
    torch.testing.assert_close(weights, torch.softmax(logits, dim=1))
    torch.testing.assert_close(weights.sum(1), torch.ones(2, 5))
    torch.testing.assert_close(merged, (torch.softmax(logits, 1) * codes).sum(1))
    # per channel: channel 0 follows photo 0, channel 1 photo 2
    logits = torch.zeros(1, 3, 2)
    logits[0, 0, 0] = logits[0, 2, 1] = 30.0
    merged, _ = aggregate_codes(codes[:1, :, :2], logits)
    torch.testing.assert_close(merged[0], torch.stack([codes[0, 0, 0], codes[0, 2, 1]]), atol=1e-5, rtol=0)
    # equal logits: the plain average
    torch.testing.assert_close(aggregate_codes(codes, torch.zeros_like(codes))[0], codes.mean(1))


def test_a_single_photo_album_gives_that_photos_code_and_padding_has_no_weight():
    torch.manual_seed(1)
    codes, logits = torch.randn(1, 1, 7), torch.randn(1, 1, 7)
    merged, weights = aggregate_codes(codes, logits)
    torch.testing.assert_close(merged, codes[:, 0])
    assert torch.equal(weights, torch.ones(1, 1, 7))
    # an album padded to 3 with 2 absent photos: the same code, whatever the padding holds
    padded = torch.cat([codes, 100 * torch.randn(1, 2, 7)], 1)
    mask = torch.tensor([[True, False, False]])
    merged, weights = aggregate_codes(padded, torch.randn(1, 3, 7), mask)
    torch.testing.assert_close(merged, codes[:, 0])
    assert torch.equal(weights[0, 1:], torch.zeros(2, 7))


def _tiny_networks(size=SIZE, width=4, code=16) -> LapNetworks:
    valid = torch.zeros(size, size, dtype=torch.bool)
    valid[8:-8, 10:-10] = True
    return LapNetworks(size, width, code, torch.full((size, size), 60.0), valid, torch.zeros(68, 2),
                       torch.tensor([0.0, 0.0, 1070.0]))


def test_networks_single_photo_album_and_shapes():
    torch.manual_seed(2)
    net = _tiny_networks()
    images = torch.rand(1, 3, 3, SIZE, SIZE) * 2 - 1
    with torch.no_grad():
        alone = net.aggregate(images[:, :1])
        padded = net.aggregate(images, torch.tensor([[True, False, False]]))
        full = net.aggregate(images)
    torch.testing.assert_close(padded["depth"], alone["depth"])
    torch.testing.assert_close(padded["albedo"], alone["albedo"])
    assert full["depth"].shape == (1, SIZE, SIZE) and full["albedo"].shape == (1, SIZE, SIZE, 3)
    assert ((full["albedo"] >= 0) & (full["albedo"] <= 1)).all()
    assert (full["depth"][0][~net.valid] == 0).all()
    scene = net.scene(images[0])
    assert scene["angles"].shape == (3, 3) and scene["sh"].shape == (3, 27) and scene["sigma"].shape == (3, 2, 16, 16)
    torch.testing.assert_close(scene["translation"], torch.tensor([[0.0, 0.0, 1070.0]]).expand(3, 3))  # default pose
    # the refiners start as the identity: personalised == canonical
    depth, albedo = net.personalise(full["depth"].expand(3, -1, -1), full["albedo"].expand(3, -1, -1, -1), images[0])
    torch.testing.assert_close(depth, full["depth"].expand(3, -1, -1))


def test_filtered_connection_and_attribute_injection_shapes():
    torch.manual_seed(3)
    filt = FilteredConnection(enc_channels=6, dec_channels=10)
    out, mask = filt(torch.randn(2, 6, 8, 8), torch.randn(2, 10, 8, 8))
    assert out.shape == (2, 10, 8, 8) and mask.shape == (2, 1, 8, 8)
    assert ((mask > 0) & (mask < 1)).all()
    inject = AttributeInjection(channels=12, target_channels=12)
    assert inject(torch.randn(2, 12, 4, 4), torch.randn(2, 12, 4, 4)).shape == (2, 12, 4, 4)
    # the refiner: masks at 4x4 ... R/2 and injection at 8x8, 4x4, 1x1
    refiner = AttributeRefiner(channels=3, size=SIZE, width=4)
    residual, masks = refiner(torch.randn(2, 3, SIZE, SIZE), torch.randn(2, 3, SIZE, SIZE), return_masks=True)
    assert residual.shape == (2, 3, SIZE, SIZE) and torch.equal(residual, torch.zeros_like(residual))
    assert [m.shape[-1] for m in masks] == [4, 8, 16, 32]
    sizes = [refiner.encoder(torch.zeros(1, 3, SIZE, SIZE))[i].shape[-1] for i in refiner.injected]
    assert sizes == [8, 4, 1]


# --------------------------------------------------------------------------- configuration


GROUPED = "[data]\nimages=['x']\ngroup_by='folder'\n[lap]\nenabled = true\n"


@pytest.mark.parametrize("text, message", [
    ("[data]\nimages=['x']\n[lap]\nenabled = true", "lap.enabled needs data.group_by"),
    (GROUPED + "image_size = 96", "lap.image_size must be one of"),
    (GROUPED + "depth_template = 'bfm'", "lap.depth_template must be"),
    (GROUPED + "relaxed_weight = 2.0", "lap.relaxed_weight must be in"),
    (GROUPED + "[cnet]\nenabled = true\nrnet_checkpoint = 'r.pt'", "enable one"),
])
def test_bad_lap_configs_fail_with_one_line(text, message):
    with pytest.raises(ConfigError, match=message):
        parse_config(text)


def test_lap_config_defaults_are_the_papers():
    config = parse_config("[data]\nimages=['x']\ngroup_by='folder'\n[lap]\nenabled = true")
    lap = config.lap
    assert config.learning_rate == 1e-4 and lap.max_album_size == 6 and lap.relaxed_weight == 0.3
    assert config.steps == lap.aggregate_steps + lap.personalise_steps + lap.finetune_steps
    assert [lap.phase(s) for s in (0, lap.aggregate_steps, lap.aggregate_steps + lap.personalise_steps)] == [1, 2, 3]
    assert parse_config("[data]\nimages=['x']").lap is None


# --------------------------------------------------------------------------- training and aggregate


@pytest.fixture(scope="module")
def grouped_data(ict_model_file, tmp_path_factory):
    from facerecon.stages.synth import SynthOptions, run_synth

    root = tmp_path_factory.mktemp("lapnet")
    run_synth(root / "synth", SynthOptions(face_model=str(ict_model_file), count=3, views=3, size=SIZE, zoom=1.0,
                                           max_yaw=30, max_pitch=10))
    images = sorted((root / "synth" / "images").glob("*.png"))
    return write_synth_detections(root / "detections.h5", root / "synth", [(p.name, p) for p in images])


def _lap_config(data: Path, model_file, output: Path, steps=(6, 2, 2)) -> str:
    return f"""
[data]
detections = ["{data}"]
validation_fraction = 0.0
group_by = "synth"
[model]
face_model = "{model_file}"
[lap]
enabled = true
image_size = 64
width = 4
code_size = 16
identities_per_batch = 2
max_album_size = 3
aggregate_steps = {steps[0]}
personalise_steps = {steps[1]}
finetune_steps = {steps[2]}
learning_rate = 3e-3
[output]
directory = "{output}"
checkpoint_every = 4
preview_every = 100
validate_every = 100
"""


@pytest.fixture(scope="module")
def lap_run(grouped_data, ict_model_file, tmp_path_factory):
    """The three steps on 3 synthetic people of 3 photos: loss of fixed albums before and after."""
    from facerecon.training.lap_training import LapTrainer, lap_data
    from facerecon.training.trainer import load_faces

    out = tmp_path_factory.mktemp("laprun")
    config = parse_config(_lap_config(grouped_data, ict_model_file, out))
    faces = load_faces([grouped_data], "synth")
    trainer = LapTrainer(config, torch.device("cpu"))
    trainer.build(trainer.default_translation(faces))
    data = lap_data(faces, 64, 0.3)
    fixed = [g[:3] for g in data.groups]
    with torch.no_grad():
        before = float(trainer.losses(data, fixed, 1)[0])
    summary = trainer.run(faces, faces.subset(np.zeros(len(faces), bool)), resume=False)
    with torch.no_grad():
        after = float(trainer.losses(data, fixed, 1)[0])
    return out, summary, before, after


def test_lap_training_runs_the_three_steps_lowers_the_loss_and_writes_a_checkpoint(lap_run):
    out, summary, before, after = lap_run
    assert summary.steps_done == 10 and np.isfinite(summary.last_loss)
    assert after < before, (before, after)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["phase"] for r in records] == [1] * 6 + [2] * 2 + [3] * 2
    assert all(1 <= s <= 3 for r in records for s in r["album_sizes"])
    assert "personal" in records[-1] and "personal" not in records[0]
    assert (out / "checkpoints" / "latest.pt").is_file() and (out / "checkpoints" / "step_0000006.pt").is_file()
    assert (out / "previews" / "step_0000010.png").is_file()
    networks, state = load_lap_networks(out / "checkpoints" / "latest.pt")
    assert state["step"] == 10 and state["kind"] == "lap" and networks.image_size == 64
    # step 2 froze the aggregation networks: their weights at step 6 and 8 are equal, the refiners' not
    at6 = torch.load(out / "checkpoints" / "step_0000006.pt", weights_only=False)["networks"]
    at8 = torch.load(out / "checkpoints" / "step_0000008.pt", weights_only=False)["networks"]
    frozen = [k for k in at6 if k.startswith(("depth_encoder", "albedo_decoder", "pose_network", "confidence"))]
    assert frozen and all(torch.equal(at6[k], at8[k]) for k in frozen)
    assert any(not torch.equal(at6[k], at8[k]) for k in at6 if k.startswith("albedo_refiner"))


def test_lap_training_resumes_where_it_stopped(lap_run, grouped_data, ict_model_file, tmp_path):
    from facerecon.training.lap_training import LapTrainer
    from facerecon.training.trainer import load_faces

    out, _, _, _ = lap_run
    copy = tmp_path / "run"
    shutil.copytree(out, copy)
    config = parse_config(_lap_config(grouped_data, ict_model_file, copy, steps=(6, 2, 3)))
    trainer = LapTrainer(config, torch.device("cpu"))
    faces = load_faces([grouped_data], "synth")
    summary = trainer.run(faces, faces.subset(np.zeros(len(faces), bool)), resume=True)
    assert summary.steps_done == 11 and any("resumed at step 10" in n for n in summary.notes)
    records = [json.loads(line) for line in (copy / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, 12))


def test_aggregate_lap_with_checkpoint_writes_the_networks_faces(lap_run, ict_embedded_model_file, realdata,
                                                                  tmp_path):
    import trimesh

    from facerecon.cli import main

    out, _, _, _ = lap_run
    checkpoint = out / "checkpoints" / "latest.pt"
    source = sorted((realdata / "albums" / "id03").glob("*.jpg"))[:2]
    album = tmp_path / "people" / "id03"
    album.mkdir(parents=True)
    for path in source:
        shutil.copy(path, album / path.name)
    args = ["aggregate", str(tmp_path / "people"), "--out", str(tmp_path / "out"), "--face-model",
            str(ict_embedded_model_file), "--method", "lap", "--checkpoint", str(checkpoint), "--steps", "20", "2",
            "0", "--texture-size", "64", "--format", "obj", "-q", "--json", "--no-download"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["albums_ok"] == 1 and any("LAP networks" in n for n in data["notes"])
    folder = tmp_path / "out" / "id03"
    mesh = trimesh.load(folder / "id03_lap.obj", force="mesh")
    assert np.isfinite(mesh.vertices).all() and len(mesh.vertices) > 1000
    assert len(list((folder / "lap_personalised").glob("*.obj"))) == 2 and (folder / "lap_sheet.png").is_file()
    with h5py.File(tmp_path / "out" / "aggregate.h5") as f:
        lap = f["identities"]["id03"]["lap"]
        assert lap.attrs["route"] == "networks" and len(lap.attrs["checkpoint_sha256"]) == 64
        assert lap["depth"].shape == (64, 64) and lap["personal_depth"].shape == (2, 64, 64)
        np.testing.assert_allclose(lap["aggregation_weight_depth"][()].sum(), 1.0, atol=1e-5)
        for key in ("ssim_canonical", "photometric_canonical", "photometric_personal"):
            assert np.isfinite(lap[key][()]).all() and lap[key].shape == (2,)
    # the options that belong to the optimisation route are refused with a checkpoint
    bad = CliRunner().invoke(main, args[:-3] + ["--lap-size", "256"])
    assert bad.exit_code == 2 and "--lap-size" in bad.output
