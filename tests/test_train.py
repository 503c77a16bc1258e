"""R-Net training on synthetic faces (CPU): loss falls, resume reproduces, bad configs fail clearly."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from facerecon.cli import main
from facerecon.stages.synth import SynthOptions, run_synth
from facerecon.training.config import ConfigError, parse_config
from facerecon.training.trainer import Trainer, load_faces, prepare_data, split_validation


@pytest.fixture(scope="module")
def training_data(ict_embedded_model_file, tmp_path_factory):
    root = tmp_path_factory.mktemp("train")
    run_synth(root / "synth", SynthOptions(face_model=str(ict_embedded_model_file), count=32, size=256, zoom=0.6,
                                           max_yaw=30, max_pitch=10))
    return root


def _config(root, model_file, steps=40, output="run"):
    return parse_config(f"""
[data]
images = ["{root / 'synth' / 'images'}"]
validation_fraction = 0.15
[model]
face_model = "{model_file}"
[network]
architecture = "resnet18"
[optim]
learning_rate = 1e-3
batch_size = 8
steps = {steps}
[output]
directory = "{root / output}"
checkpoint_every = 10
preview_every = 40
validate_every = 20
""")


def _losses(path):
    return [json.loads(line)["loss"] for line in path.read_text().splitlines()]


def test_training_lowers_loss_and_landmark_error_and_resumes_exactly(training_data, ict_embedded_model_file):
    config = _config(training_data, ict_embedded_model_file)
    faces = load_faces(prepare_data(config))
    train_set, valid_set = split_validation(faces, config.validation_fraction)
    assert len(train_set) + len(valid_set) == len(faces) and len(valid_set) >= 1
    summary = Trainer(config, torch.device("cpu")).run(train_set, valid_set, resume=False)
    assert summary.steps_done == 40 and summary.validation_loss is not None
    records = [json.loads(line) for line in (config.output / "metrics.jsonl").read_text().splitlines()]
    early = np.mean([r["landmark"] for r in records[:5]])
    late = np.mean([r["landmark"] for r in records[-5:]])
    assert late < 0.5 * early, (early, late)
    assert np.mean([r["loss"] for r in records[-5:]]) < 0.7 * np.mean([r["loss"] for r in records[:5]])
    assert (config.output / "previews" / "step_0000040.png").is_file()
    # interrupted after 20 steps, then resumed: the same loss curve as the uninterrupted run
    halted = _config(training_data, ict_embedded_model_file, output="run2")
    calls = []
    first = Trainer(halted, torch.device("cpu")).run(train_set, valid_set, resume=False,
                                                      should_stop=lambda: calls.append(1) or len(calls) > 20)
    assert first.interrupted and first.steps_done == 20
    second = Trainer(halted, torch.device("cpu")).run(train_set, valid_set, resume=True)
    assert second.steps_done == 40
    np.testing.assert_allclose(_losses(halted.output / "metrics.jsonl"), _losses(config.output / "metrics.jsonl"),
                               rtol=1e-4)
    checkpoint = torch.load(config.output / "checkpoints" / "latest.pt", weights_only=False)
    assert checkpoint["model_id"] == "ict-face-light" and checkpoint["step"] == 40 and "config" in checkpoint


@pytest.mark.parametrize("text, message", [
    ("[optim]\nbatch_sise = 4\n[data]\nimages=['x']", "unknown key optim.batch_sise"),
    ("[data]\nimages = 'x'", "data.images must be list"),
    ("[network]\narchitecture = 'vgg'\n[data]\nimages=['x']", "network.architecture must be one of"),
    ("[data]\nimages = []", "data.detections or data.images"),
    ("[olt]\nx = 1", "unknown section [olt]"),
    ("[data\n", "not valid TOML"),
    ("[augment]\nflip = 1\n[data]\nimages=['x']", "augment.flip must be bool"),
    ("[augment]\nshift = 0.9\n[data]\nimages=['x']", "augment: shift must be in"),
])
def test_bad_configs_fail_with_one_line(text, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
        parse_config(text)


def test_cli_print_config_and_bad_config(tmp_path):
    printed = CliRunner().invoke(main, ["train", "--print-config"])
    assert printed.exit_code == 0 and "[optim]" in printed.output
    parse_config(printed.output.replace("images = []", "images = ['x']"))  # the default is valid
    bad = tmp_path / "bad.toml"
    bad.write_text("[optim]\nsteps = 0\n[data]\nimages = ['x']\n")
    result = CliRunner().invoke(main, ["train", "--config", str(bad)])
    assert result.exit_code == 2 and "optim.steps must be at least 1" in result.output


def test_fit_with_a_checkpoint_uses_the_network(ict_embedded_model_file, ict_embedded_model, astronaut_path,
                                                tmp_path):
    from facerecon.stages.fit import FitOptions, read_fits, run_fit

    config = parse_config(f"""
[data]
images = ["unused"]
[model]
face_model = "{ict_embedded_model_file}"
[network]
architecture = "resnet18"
""")
    trainer = Trainer(config, torch.device("cpu"))
    checkpoint = tmp_path / "rnet.pt"
    trainer.save(checkpoint)  # an untrained R-Net predicts the mean face, frontal and centred
    errors = {}
    for refine in (0, 15):
        options = FitOptions(face_model=str(ict_embedded_model_file), checkpoint=str(checkpoint), refine=refine,
                             texture_size=64, overlays=False)
        summary = run_fit([str(astronaut_path)], tmp_path / f"out{refine}", options)
        assert any("method network" in note for note in summary.notes)
        (key, attrs, faces), = list(read_fits(tmp_path / f"out{refine}" / "fits.h5"))
        assert attrs["method"] == "network" and faces[0]["vertices"].shape == (9409, 3)
        errors[refine] = summary.faces[0].landmark_error_px
    assert errors[15] < errors[0]
    other = tmp_path / "other.pt"
    state = torch.load(checkpoint, weights_only=False)
    state["model_id"] = "bfm2009"
    torch.save(state, other)
    result = CliRunner().invoke(main, ["fit", str(astronaut_path), "--out", str(tmp_path / "o"), "--face-model",
                                       str(ict_embedded_model_file), "--checkpoint", str(other), "--quiet"])
    assert result.exit_code == 1 and "trained with face model 'bfm2009'" in result.output
