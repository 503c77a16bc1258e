"""C-Net (paper 000 sec. 5): eq. 7 aggregation, the network, label-free training over a frozen
R-Net (eq. 8), and `facerecon aggregate --method cnet`."""

from __future__ import annotations

import json
import math
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from click.testing import CliRunner

from facerecon.cli import main
from facerecon.networks.cnet import CNet, aggregate_coefficients, grouped_aggregate
from facerecon.training.config import ConfigError, parse_config
from tests.helpers_detect import write_synth_detections

SIZE = 64


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny tensors: one intra-op thread is as fast, and does not collapse (10-100x) when another
    process shares the cores (OpenMP threads spin waiting for each other)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# --------------------------------------------------------------------------- eq. 7 and the network


def test_zero_initialised_cnet_gives_exactly_the_plain_average():
    torch.manual_seed(0)
    cnet = CNet(stage_channels=64, pooled_dim=512, outputs=7)
    confidences = cnet(torch.randn(6, 64, 16, 16), torch.rand(6, 512))
    assert confidences.shape == (6, 7) and torch.equal(confidences, torch.full((6, 7), 0.5))
    coefficients = torch.randn(2, 3, 7)  # G = 2 identities of N = 3 images
    aggregated = aggregate_coefficients(coefficients, confidences.reshape(2, 3, 7))
    assert aggregated.shape == (2, 7)
    assert torch.equal(aggregated, coefficients.sum(dim=1) / 3)
    torch.testing.assert_close(aggregated, coefficients.mean(dim=1))
    # the batch form broadcasts each group's aggregate back to its members
    rows = grouped_aggregate(coefficients.reshape(6, 7), confidences, 3)
    assert torch.equal(rows, aggregated.repeat_interleave(3, dim=0))


def test_aggregation_weights_each_coefficient_by_its_own_confidence():
    coefficients = torch.tensor([[[0.0, 0.0, 0.0], [1.0, 1.0, 1.0]]])  # (G=1, N=2, K=3)
    confidences = torch.tensor([[[0.9, 0.1, 0.5], [0.1, 0.9, 0.5]]], requires_grad=True)
    aggregated = aggregate_coefficients(coefficients, confidences)
    torch.testing.assert_close(aggregated, torch.tensor([[0.1, 0.9, 0.5]]))
    # element-wise, not per image: each coefficient follows the image most confident about it
    assert aggregated[0, 0] < 0.5 < aggregated[0, 1]
    # only relative confidences matter, and eq. 7 is differentiable in the confidences
    torch.testing.assert_close(aggregate_coefficients(coefficients, 3 * confidences), aggregated)
    aggregated.sum().backward()
    assert confidences.grad is not None and confidences.grad.abs().sum() > 0


def test_cnet_has_the_papers_size_on_resnet50_features():
    cnet = CNet(stage_channels=256, pooled_dim=2048, outputs=80)  # paper: ~3M parameters
    count = sum(p.numel() for p in cnet.parameters())
    assert 2.8e6 < count < 3.2e6
    assert [m.stride for m in cnet.shallow if isinstance(m, torch.nn.Conv2d)] == [(2, 2)] * 3


# --------------------------------------------------------------------------- data


@pytest.fixture(scope="module")
def grouped_data(ict_model_file, tmp_path_factory):
    from facerecon.stages.synth import SynthOptions, run_synth

    root = tmp_path_factory.mktemp("cnet")
    run_synth(root / "synth", SynthOptions(face_model=str(ict_model_file), count=8, views=3, size=SIZE, zoom=1.0,
                                           max_yaw=30, max_pitch=10))
    images = sorted((root / "synth" / "images").glob("*.png"))
    return write_synth_detections(root / "detections.h5", root / "synth", [(p.name, p) for p in images])


@pytest.fixture(scope="module")
def rnet_checkpoint(ict_model_file, tmp_path_factory):
    """A resnet18 R-Net checkpoint whose identity output depends on the image (an untrained R-Net
    predicts the mean face for every image, which leaves C-Net nothing to weigh)."""
    from facerecon.training.trainer import Trainer

    config = parse_config(f"""
[data]
images = ["unused"]
[model]
face_model = "{ict_model_file}"
[network]
architecture = "resnet18"
""")
    trainer = Trainer(config, torch.device("cpu"))
    n_identity = trainer.network.sizes["identity"]
    with torch.no_grad():
        generator = torch.Generator().manual_seed(3)
        fc = trainer.network.backbone.fc.weight
        fc[:n_identity] = torch.randn(n_identity, fc.shape[1], generator=generator) * 0.05
    path = tmp_path_factory.mktemp("rnet") / "rnet.pt"
    trainer.save(path)
    return path


def _cnet_config(data: Path, model_file, rnet: Path, output: Path, steps: int = 4, extra: str = "") -> str:
    return f"""
[data]
detections = ["{data}"]
validation_fraction = 0.25
group_by = "synth"
[model]
face_model = "{model_file}"
[loss]
render_size = 32
[cnet]
enabled = true
rnet_checkpoint = "{rnet}"
images_per_identity = 3
identities_per_batch = 2
learning_rate = 1e-3
steps = {steps}
{extra}
[output]
directory = "{output}"
checkpoint_every = 2
preview_every = 4
validate_every = 4
"""


def _records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


# --------------------------------------------------------------------------- training


def test_cnet_training_freezes_rnet_trains_cnet_and_resumes_exactly(grouped_data, ict_model_file, rnet_checkpoint,
                                                                    tmp_path):
    from facerecon.networks.cnet import CHECKPOINT_KIND
    from facerecon.training.cnet_training import CNetTrainer
    from facerecon.training.run import run_training
    from facerecon.training.trainer import load_faces

    config = parse_config(_cnet_config(grouped_data, ict_model_file, rnet_checkpoint, tmp_path / "run"))
    assert (config.learning_rate, config.batch_size, config.steps, config.views_per_identity) == (1e-3, 6, 4, 3)
    summary, trainer = run_training(config, "cpu")
    assert isinstance(trainer, CNetTrainer) and summary.steps_done == 4
    records = _records(config.output / "metrics.jsonl")
    assert len(records) == 4 and all(math.isfinite(r["loss"]) for r in records)
    assert records[0]["confidence_mean"] == pytest.approx(0.5)  # zero-initialised last layer
    assert "photometric" in records[0] and "landmark" in records[0]
    assert summary.validation_loss is not None and math.isfinite(summary.validation_loss)
    assert (config.output / "previews" / "step_0000004.png").is_file()

    source = torch.load(rnet_checkpoint, weights_only=False)
    saved = torch.load(config.output / "checkpoints" / "latest.pt", weights_only=False)
    assert saved["kind"] == CHECKPOINT_KIND and saved["step"] == 4 and saved["architecture"] == "resnet18"
    assert saved["model_id"] == source["model_id"] and saved["cnet_layout"]["aggregated"] == ["identity"]
    # R-Net frozen: every weight and batch-norm buffer bit-identical to the source checkpoint
    assert saved["network"].keys() == source["network"].keys()
    for name, value in source["network"].items():
        assert torch.equal(saved["network"][name], value), name
    # C-Net trained: its last layer left zero
    assert saved["cnet"]["fc2.weight"].abs().sum() > 0
    assert saved["cnet"]["fc2.weight"].shape[0] == source["sizes"]["identity"]

    # eq. 8 at the start: every image rendered with its group's plain-average identity
    fresh = CNetTrainer(config, torch.device("cpu"))
    train = load_faces([grouped_data], "synth")
    index = np.arange(6)  # synth groups are consecutive: identities 0 and 1, 3 views each
    batch = train.targets(index, torch.device("cpu"))
    loss, values = fresh.training_loss(batch)
    with torch.no_grad():
        params = fresh.rnet(batch.crops.permute(0, 3, 1, 2))
    averaged = dict(params, identity=params["identity"].reshape(2, 3, -1).mean(1).repeat_interleave(3, 0))
    expected = fresh.loss.losses(averaged, batch, config.render_size)["total"].mean()
    torch.testing.assert_close(loss.detach(), expected.detach(), rtol=1e-4, atol=1e-6)
    assert fresh.rnet.training is False and all(not p.requires_grad for p in fresh.rnet.parameters())

    # interrupted after 2 steps and resumed: the same loss curve
    halted = parse_config(_cnet_config(grouped_data, ict_model_file, rnet_checkpoint, tmp_path / "run2"))
    calls = []
    first, _ = run_training(halted, "cpu", should_stop=lambda: calls.append(1) or len(calls) > 2)
    assert first.interrupted and first.steps_done == 2
    second, _ = run_training(halted, "cpu", resume=True)
    assert second.steps_done == 4 and any("resumed at step 2" in n for n in second.notes)
    np.testing.assert_allclose([r["loss"] for r in _records(halted.output / "metrics.jsonl")],
                               [r["loss"] for r in records], rtol=1e-5)


@pytest.mark.parametrize("text, message", [
    ("[data]\nimages=['x']\n[cnet]\nenabled = true\nrnet_checkpoint = 'r.pt'",
     "cnet.enabled needs data.group_by = 'folder' or 'synth'"),
    ("[data]\nimages=['x']\ngroup_by = 'synth'\n[cnet]\nenabled = true", "cnet.rnet_checkpoint must name"),
    ("[data]\nimages=['x']\ngroup_by = 'synth'\n[cnet]\nenabled = true\nrnet_checkpoint = 'r.pt'\n"
     "images_per_identity = 1", "cnet.images_per_identity must be at least 2"),
    ("[data]\nimages=['x']\n[cnet]\nenabled = 1", "cnet.enabled must be bool"),
    ("[data]\nimages=['x']\n[cnet]\nlearning_rate = '2e-5'", "cnet.learning_rate must be int or float"),
    ("[data]\nimages=['x']\n[cnet]\nimages_per_id = 3", "unknown key cnet.images_per_id"),
    ("[data]\nimages=['x']\ngroup_by = 'folder'\n[cnet]\nenabled = true\nrnet_checkpoint = 'runs/checkpoints/"
     "latest.pt'\nsteps = 0\n[output]\ndirectory = 'elsewhere'", "cnet.steps must be at least 1"),
    ("[data]\nimages=['x']\ngroup_by = 'folder'\n[cnet]\nenabled = true\nrnet_checkpoint = 'runs/checkpoints/"
     "latest.pt'\n[output]\ndirectory = 'runs'", "cnet.rnet_checkpoint lies in output.directory's checkpoints"),
])
def test_bad_cnet_configs_fail_with_one_line(text, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")) as info:
        parse_config(text)
    assert "\n" not in str(info.value)


def test_cnet_defaults_are_the_papers_and_runs_refuse_what_they_cannot_do(grouped_data, ict_model_file,
                                                                          rnet_checkpoint, tmp_path, monkeypatch):
    from facerecon.training.run import run_training
    from facerecon.training.trainer import Trainer, load_faces, split_validation

    printed = CliRunner().invoke(main, ["train", "--print-config"]).output
    assert "[cnet]" in printed
    # enable [cnet] only: the other sections with an `enabled` key ([lap], [correctives]) stay off
    head, cnet_section = printed.split("[cnet]", 1)
    printed = head + "[cnet]" + cnet_section.replace("enabled = false", "enabled = true", 1)
    config = parse_config(printed.replace("images = []", "images = ['x']").replace('group_by = "none"',
                                                                                     'group_by = "synth"')
                          .replace('rnet_checkpoint = ""', 'rnet_checkpoint = "r.pt"')
                          .replace('directory = "runs/rnet"', 'directory = "runs/cnet"'))
    assert (config.learning_rate, config.steps, config.batch_size, config.views_per_identity) == (2e-5, 10000, 5, 5)
    assert (config.weights["landmark"], config.weights["photo"], config.weights["perceptual"]) == (1.6e-3, 1.9, 0.1)
    assert config.cnet.aggregated == ("identity",) and config.weights["coefficients"] == 3e-4
    # a missing R-Net checkpoint, torchrun, and an R-Net resume over C-Net checkpoints: one line each
    text = _cnet_config(grouped_data, ict_model_file, tmp_path / "missing.pt", tmp_path / "run")
    bad = tmp_path / "bad.toml"
    bad.write_text(text)
    result = CliRunner().invoke(main, ["train", "--config", str(bad), "-q"])
    assert result.exit_code == 1 and "missing.pt does not exist" in result.output
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ValueError, match="start it without torchrun"):
        run_training(parse_config(text), "cpu")
    monkeypatch.delenv("WORLD_SIZE")
    cnet_config = parse_config(_cnet_config(grouped_data, ict_model_file, rnet_checkpoint, tmp_path / "c", steps=1))
    run_training(cnet_config, "cpu")
    rnet_config = parse_config(f"""
[data]
detections = ["{grouped_data}"]
[model]
face_model = "{ict_model_file}"
[network]
architecture = "resnet18"
[output]
directory = "{tmp_path / 'c'}"
""")
    train, valid = split_validation(load_faces([grouped_data]), 0.0)
    with pytest.raises(ValueError, match="is a cnet checkpoint, not rnet"):
        Trainer(rnet_config, torch.device("cpu")).run(train, valid, resume=True)


def test_validation_fallback_holds_out_a_whole_identity():
    from facerecon.training.trainer import FaceSet, split_validation

    n = 6
    faces = FaceSet([f"x.h5:{i}.png#0" for i in range(n)], np.zeros((n, 4, 4, 3), np.uint8),
                    np.zeros((n, 68, 2), np.float32), np.zeros((n, 468, 2), np.float32), np.zeros((n, 4, 4), np.uint8),
                    ["a", "a", "a", "b", "b", "b"])
    train, valid = split_validation(faces, 1e-12)  # no identity falls below the fraction
    assert valid.groups == ["b", "b", "b"] and train.groups == ["a", "a", "a"]


# --------------------------------------------------------------------------- aggregate --method cnet


@pytest.fixture(scope="module")
def cnet_checkpoint(grouped_data, ict_model_file, rnet_checkpoint, tmp_path_factory):
    from facerecon.training.run import run_training

    output = tmp_path_factory.mktemp("cnet_run")
    config = parse_config(_cnet_config(grouped_data, ict_model_file, rnet_checkpoint, output, steps=2))
    run_training(config, "cpu")
    return output / "checkpoints" / "latest.pt"


def test_aggregate_with_cnet_stores_confidence_vectors_and_follows_eq7(grouped_data, ict_model_file,
                                                                      cnet_checkpoint, tmp_path):
    synth = grouped_data.parent / "synth"
    images = sorted((synth / "images").glob("*.png"))
    pairs = [(f"ann/{p.name}", p) for p in images[:3]] + [(f"bob/{p.name}", p) for p in images[3:5]]
    detections = write_synth_detections(tmp_path / "people.h5", synth, pairs)
    # a C-Net with clearly unequal confidences (two training steps barely move them from 0.5)
    state = torch.load(cnet_checkpoint, weights_only=False)
    state["cnet"]["fc2.weight"] = torch.randn(state["cnet"]["fc2.weight"].shape,
                                              generator=torch.Generator().manual_seed(5))
    varied = tmp_path / "varied.pt"
    torch.save(state, varied)
    out = tmp_path / "out"
    args = ["aggregate", str(detections), "--out", str(out), "--face-model", str(ict_model_file),
            "--cnet", str(varied), "--texture-size", "64", "--format", "obj", "-q", "--json", "--no-download"]
    result = CliRunner().invoke(main, args)  # --method defaults to cnet when --cnet is given
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["method"] == "cnet" and data["albums_ok"] == 2
    n_identity = state["sizes"]["identity"]
    with h5py.File(out / "aggregate.h5") as f:
        ann = f["identities"]["ann"]
        vectors, sums, kept = ann["confidence_vector"][()], ann["confidence"][()], ann["kept"][()]
        singles, identity = ann["single_identity"][()], ann["identity"][()]
        assert ann.attrs["method"] == "cnet" and len(ann.attrs["cnet_sha256"]) == 64
    assert vectors.shape == (3, n_identity) and kept.any()
    np.testing.assert_allclose(vectors.sum(axis=1), sums, rtol=1e-6)
    assert ((vectors[kept] > 0) & (vectors[kept] < 1)).all() and (vectors[~kept] == 0).all()
    # the stored identity is eq. 7 of the kept photos' R-Net identities with those vectors
    expected = (vectors[kept] * singles[kept]).sum(0) / vectors[kept].sum(0)
    np.testing.assert_allclose(identity, expected, rtol=1e-4, atol=1e-6)
    assert np.abs(identity - singles[kept].mean(0)).max() > 1e-2  # and not the plain average
    assert not np.allclose(singles[kept], singles[kept][:1])  # the photos do differ
    assert (out / "ann" / "ann_neutral.obj").is_file() and (out / "ann" / "contact_sheet.png").is_file()
    report = next(a for a in data["identities"] if a["name"] == "ann")
    assert set(report["confidences"]) == {f"ann/{p.name}#0" for p, k in zip(images[:3], kept) if k}

    # unchanged inputs and checkpoint: skipped; another checkpoint file: redone
    again = json.loads(CliRunner().invoke(main, args).stdout)
    assert again["albums_skipped"] == 2
    changed = json.loads(CliRunner().invoke(main, [str(cnet_checkpoint) if a == str(varied) else a
                                                   for a in args]).stdout)
    assert changed["albums_ok"] == 2 and changed["albums_skipped"] == 0


def test_aggregate_method_cnet_needs_a_checkpoint(ict_model_file, rnet_checkpoint, tmp_path):
    (tmp_path / "album").mkdir()
    base = ["aggregate", str(tmp_path / "album"), "--out", str(tmp_path / "out"), "--face-model",
            str(ict_model_file), "-q"]
    result = CliRunner().invoke(main, [*base, "--method", "cnet"])
    assert result.exit_code == 2 and "--method cnet needs --cnet CKPT" in result.output
    result = CliRunner().invoke(main, [*base, "--method", "mean", "--cnet", str(rnet_checkpoint)])
    assert result.exit_code == 2 and "--cnet is used only by --method cnet" in result.output
    # an R-Net checkpoint is not a C-Net checkpoint: one line, exit 1
    (tmp_path / "album" / "x.png").write_bytes(b"")
    result = CliRunner().invoke(main, [*base, "--cnet", str(rnet_checkpoint)])
    assert result.exit_code == 1 and "is not a C-Net checkpoint" in result.output
