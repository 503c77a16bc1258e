"""Paper 002 in the network (CPU): `loss.shading = "blinn-phong"` trains R-Net to predict the
specular unknowns, and `fit --shading blinn-phong --checkpoint` uses them."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from facerecon.fitting.optimize import INITIAL_LIGHT_DIRECTION, INITIAL_SHININESS
from facerecon.losses.specular import PAPER002_WEIGHTS
from facerecon.stages.synth import SynthOptions, run_synth
from facerecon.training.config import ConfigError, parse_config
from facerecon.training.trainer import Trainer, load_faces, prepare_data, split_validation


def test_shading_config_takes_paper002_weights_and_excludes_lambertian_trainers():
    config = parse_config("[data]\nimages = ['x']\n[loss]\nshading = 'blinn-phong'\n")
    assert config.shading == "blinn-phong" and config.weights["photo"] == PAPER002_WEIGHTS["photo"]
    assert config.weights["coefficients"] == PAPER002_WEIGHTS["coefficients"]
    own = parse_config("[data]\nimages = ['x']\n[loss]\nshading = 'blinn-phong'\nphoto = 2.5\n")
    assert own.weights["photo"] == 2.5
    assert parse_config("[data]\nimages = ['x']\n").weights["photo"] == 1.9
    with pytest.raises(ConfigError, match="loss.shading must be one of"):
        parse_config("[data]\nimages = ['x']\n[loss]\nshading = 'phong'\n")
    with pytest.raises(ConfigError, match="correctives.enabled needs loss.shading = 'lambert'"):
        parse_config("[data]\nimages = ['x']\n[loss]\nshading = 'blinn-phong'\n[correctives]\nenabled = true\n")


@pytest.fixture(scope="module")
def specular_run(ict_embedded_model_file, tmp_path_factory):
    root = tmp_path_factory.mktemp("train_specular")
    run_synth(root / "synth", SynthOptions(face_model=str(ict_embedded_model_file), count=6, size=224, zoom=0.6,
                                           max_yaw=25, max_pitch=10, specular=True))
    config = parse_config(f"""
[data]
images = ["{root / 'synth' / 'images'}"]
validation_fraction = 0.0
[model]
face_model = "{ict_embedded_model_file}"
[network]
architecture = "resnet18"
[loss]
shading = "blinn-phong"
[optim]
learning_rate = 3e-4
batch_size = 3
steps = 8
[augment]
enabled = false
[output]
directory = "{root / 'run'}"
checkpoint_every = 100
preview_every = 100
validate_every = 100
""")
    faces = load_faces(prepare_data(config))
    train_set, valid_set = split_validation(faces, config.validation_fraction)
    trainer = Trainer(config, torch.device("cpu"))
    summary = trainer.run(train_set, valid_set, resume=False)
    return {"root": root, "config": config, "trainer": trainer, "summary": summary}


def test_blinn_phong_training_learns_the_specular_unknowns(specular_run):
    config, trainer = specular_run["config"], specular_run["trainer"]
    assert specular_run["summary"].steps_done == 8
    records = [json.loads(line) for line in (config.output / "metrics.jsonl").read_text().splitlines()]
    # paper 002's terms are what is trained: eq. 8's photometric, eq. 13's uniform loss, the specular prior
    assert all(k in records[0] for k in ("photometric_002", "photometric_diffuse", "uniform", "specular_prior"))
    assert np.mean([r["loss"] for r in records[-3:]]) < np.mean([r["loss"] for r in records[:3]])
    checkpoint = torch.load(config.output / "checkpoints" / "latest.pt", weights_only=False)
    assert checkpoint["sizes"]["specular"] == trainer.tensors.n_specular and checkpoint["sizes"]["log_shininess"] == 1
    from facerecon.networks.rnet import rnet_from_checkpoint

    network = rnet_from_checkpoint(checkpoint, trainer.tensors).eval()
    with torch.no_grad():
        out = network(torch.rand(2, 3, 224, 224))
    assert out["specular"].shape == (2, trainer.tensors.n_specular)
    assert out["light_direction"].shape == (2, 3) and out["light_color"].shape == (2, 3)
    assert out["log_shininess"].shape == (2, 1)
    # trained: the light moved off the untrained network's start (the fit's initial light)
    start = torch.tensor([*INITIAL_LIGHT_DIRECTION, 1.0, 1.0, 1.0, math.log(INITIAL_SHININESS)])
    now = torch.cat([out["light_direction"][0], out["light_color"][0], out["log_shininess"][0]])
    assert float((now - start).abs().max()) > 1e-3


def test_network_fit_with_blinn_phong_uses_the_predicted_light(specular_run, ict_embedded_model_file):
    from facerecon.stages.fit import FitOptions, read_fits, run_fit
    from facerecon.fitting.optimize import blinn_phong_settings
    from facerecon.training.network_fit import NetworkPredictor

    root, config = specular_run["root"], specular_run["config"]
    checkpoint = config.output / "checkpoints" / "latest.pt"
    options = FitOptions(face_model=str(ict_embedded_model_file), checkpoint=str(checkpoint), texture_size=32,
                         overlays=False, formats=["ply"], recognition_weights=None,
                         settings=blinn_phong_settings())
    run_fit([str(root / "run" / "detections.h5")], root / "fit", options)
    predictor = NetworkPredictor(checkpoint, specular_run["trainer"].tensors, "ict-face-light")
    faces = load_faces([root / "run" / "detections.h5"])
    predicted = predictor(faces.targets(np.arange(len(faces)), "cpu"))
    fits = list(read_fits(root / "fit" / "fits.h5"))
    assert len(fits) == len(faces)
    by_key = {key: faces_[0] for key, _, faces_ in fits}
    for i, key in enumerate(faces.keys):
        face = by_key[key.split(":", 1)[1].split("#")[0]]
        np.testing.assert_allclose(face["light_direction"], predicted["light_direction"][i].numpy(), atol=1e-5)
        np.testing.assert_allclose(face["log_shininess"], predicted["log_shininess"][i].numpy(), atol=1e-5)
