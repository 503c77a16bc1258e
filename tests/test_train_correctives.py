"""Paper 004 in the network (CPU): R-Net's corrective level, multi-level training, the network fit."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from facerecon.facemodel.corrective_space import CorrectiveSpace
from facerecon.facemodel.tensors import FaceModelTensors
from facerecon.networks.rnet import RNet, rnet_from_checkpoint
from facerecon.stages.synth import SynthOptions, run_synth
from facerecon.training.config import ConfigError, parse_config
from facerecon.training.corrective_training import MultiLevelTrainer
from facerecon.training.network_fit import NetworkPredictor
from facerecon.training.trainer import TrainSummary, load_faces, prepare_data, split_validation

MODES = (6, 5)


def _layout(model):
    return {"geometry_modes": MODES[0], "reflectance_modes": MODES[1],
            "support": torch.as_tensor(model.regions["photometric"])}


def test_corrective_heads_start_at_the_base_level_and_decode_on_the_region(ict_model):
    tensors = FaceModelTensors(ict_model)
    torch.manual_seed(0)
    network = RNet(tensors, "resnet18", correctives=_layout(ict_model)).eval()
    source = network.correctives.initialise(tensors.mean_shape)
    assert source == "smooth random fields"
    images = torch.rand(2, 3, 224, 224)
    with torch.no_grad():
        base = network(images, final=False)
        out = network(images, fields=True)
    assert "corrective_geometry" not in base
    assert out["corrective_geometry"].shape == (2, MODES[0]) and out["corrective_reflectance"].shape == (2, MODES[1])
    assert not out["corrective_geometry"].any() and not out["corrective_reflectance_field"].any()  # zero heads
    for name in base:
        torch.testing.assert_close(out[name], base[name])
    # a unit coefficient: a smooth field on the rendered region, zero elsewhere
    unit = {"corrective_geometry": torch.eye(MODES[0])[:1], "corrective_reflectance": torch.eye(MODES[1])[:1]}
    geometry, reflectance = network.correctives.fields(unit)
    assert geometry.shape == (1, ict_model.n_vertices, 3)
    inside = np.zeros(ict_model.n_vertices, bool)
    inside[ict_model.regions["photometric"]] = True
    assert not geometry[0, ~inside].any() and not reflectance[0, ~inside].any()
    geometry = geometry.detach()
    rms = geometry[0, inside].pow(2).mean().sqrt()
    assert 0.45 < float(rms) < 0.55  # RANDOM_GEOMETRY_RMS mm
    # neighbouring vertices move alike (smooth): edge differences far below those of the same values shuffled
    edges = torch.as_tensor(ict_model.triangles[:, :2], dtype=torch.int64)
    edges = edges[torch.as_tensor(inside[ict_model.triangles[:, 0]] & inside[ict_model.triangles[:, 1]])]
    shuffled = geometry[0].clone()
    shuffled[inside] = shuffled[inside][torch.randperm(int(inside.sum()))]
    def edge_change(field):
        return float((field[edges[:, 0]] - field[edges[:, 1]]).norm(dim=-1).mean())
    assert edge_change(geometry[0]) < 0.5 * edge_change(shuffled)
    # a stored space: the bases are the model's (restricted to the region), and come back as a space
    g, r = network.correctives.space_arrays()
    other = RNet(tensors, "resnet18", correctives=_layout(ict_model))
    assert other.correctives.initialise(None, CorrectiveSpace(g, r)) == "face model's corrective space"
    torch.testing.assert_close(other.correctives.geometry_basis, network.correctives.geometry_basis)
    np.testing.assert_array_equal(other.correctives.space_arrays()[1], r)


def test_corrective_config_defaults_are_the_papers_and_bad_values_fail():
    config = parse_config("[data]\nimages = ['x']\n[correctives]\nenabled = true\n")
    s = config.correctives
    assert (s.base_steps, config.steps, s.optimizer) == (200000, 390000, "adadelta")
    assert (s.base_learning_rate, s.learning_rate, s.geometry_learning_rate, s.reflectance_learning_rate) == \
        (0.01, 0.001, 0.005, 0.01)
    assert config.learning_rate == 0.01 and (s.geometry_modes, s.reflectance_modes) == (500, 500)
    assert parse_config("[data]\nimages = ['x']\n").correctives is None
    for text, message in [("space = 'fixed'", "correctives.space must be one of"),
                          ("optimizer = 'sgd'", "correctives.optimizer must be one of"),
                          ("steps = 0", "correctives.steps must be at least 1"),
                          ("geometry_learning_rate = 0.0", "correctives.geometry_learning_rate must be positive")]:
        with pytest.raises(ConfigError, match=message):
            parse_config(f"[data]\nimages = ['x']\n[correctives]\nenabled = true\n{text}\n")
    with pytest.raises(ConfigError, match="exclude each other"):
        parse_config("[data]\nimages = ['x']\ngroup_by = 'folder'\n[correctives]\nenabled = true\n"
                     "[cnet]\nenabled = true\nrnet_checkpoint = 'r.pt'\n")


@pytest.fixture(scope="module")
def corrective_run(ict_embedded_model_file, tmp_path_factory):
    """A multi-level run: 3 steps of base pre-training, then 7 of fine-tuning (resnet18, 8 synthetic faces)."""
    root = tmp_path_factory.mktemp("train_correctives")
    run_synth(root / "synth", SynthOptions(face_model=str(ict_embedded_model_file), count=8, size=224, zoom=0.6,
                                           max_yaw=25, max_pitch=10))
    config = parse_config(f"""
[data]
images = ["{root / 'synth' / 'images'}"]
validation_fraction = 0.0
[model]
face_model = "{ict_embedded_model_file}"
[network]
architecture = "resnet18"
[optim]
batch_size = 4
[augment]
enabled = false
[correctives]
enabled = true
geometry_modes = {MODES[0]}
reflectance_modes = {MODES[1]}
base_steps = 3
steps = 7
optimizer = "adam"
base_learning_rate = 1e-4
learning_rate = 1e-4
geometry_learning_rate = 3e-3
reflectance_learning_rate = 3e-3
[output]
directory = "{root / 'run'}"
checkpoint_every = 100
preview_every = 100
validate_every = 100
""")
    faces = load_faces(prepare_data(config))
    train_set, valid_set = split_validation(faces, config.validation_fraction)
    trainer = MultiLevelTrainer(config, torch.device("cpu"))
    initial = trainer.network.correctives.geometry_basis.detach().clone()
    summary = trainer.run(train_set, valid_set, resume=False)
    return {"root": root, "config": config, "trainer": trainer, "summary": summary, "initial_basis": initial,
            "faces": faces}


def test_multilevel_training_follows_the_schedule_and_learns_the_space(corrective_run):
    config, trainer, summary = corrective_run["config"], corrective_run["trainer"], corrective_run["summary"]
    assert summary.steps_done == 10 and not summary.interrupted
    records = [json.loads(line) for line in (config.output / "metrics.jsonl").read_text().splitlines()]
    # pre-training: the base level only; fine-tuning: the final level's terms too
    assert all("final_total" not in r for r in records[:3]) and all("final_total" in r for r in records[3:])
    assert {g["name"]: g["lr"] for g in trainer.optimizer.param_groups} == \
        {"base": 1e-4, "geometry": 3e-3, "reflectance": 3e-3}
    # the corrective space is learned with the network (paper 004), the heads moved off zero
    level = trainer.network.correctives
    assert not torch.equal(level.geometry_basis.detach(), corrective_run["initial_basis"])
    assert level.geometry_head.weight.abs().sum() > 0 and level.reflectance_head.weight.abs().sum() > 0
    assert np.mean([r["loss"] for r in records[-3:]]) < np.mean([r["loss"] for r in records[:3]])
    checkpoint = torch.load(config.output / "checkpoints" / "latest.pt", weights_only=False)
    assert checkpoint["kind"] == "rnet" and checkpoint["correctives"]["geometry_modes"] == MODES[0]
    assert checkpoint["correctives"]["space"] == "learn"
    network = rnet_from_checkpoint(checkpoint, trainer.tensors).eval()
    with torch.no_grad():
        out = network(torch.rand(3, 3, 224, 224), fields=True)
    assert out["corrective_reflectance"].shape == (3, MODES[1])
    assert out["corrective_geometry_field"].shape == (3, trainer.tensors.n_vertices, 3)


def test_fine_tuning_the_corrective_level_lowers_the_final_photometric_error(corrective_run):
    """Base level frozen (learning rate ~0): heads and bases alone bring the final render closer to the photos."""
    root, faces = corrective_run["root"], corrective_run["faces"]
    config = parse_config(f"""
[data]
images = ["unused"]
[model]
face_model = "{corrective_run['config'].face_model}"
[network]
architecture = "resnet18"
[correctives]
enabled = true
geometry_modes = {MODES[0]}
reflectance_modes = {MODES[1]}
base_steps = 0
steps = 15
optimizer = "adam"
learning_rate = 1e-12
geometry_learning_rate = 3e-3
reflectance_learning_rate = 3e-3
base_checkpoint = "{corrective_run['config'].output / 'checkpoints' / 'latest.pt'}"
[output]
directory = "{root / 'frozen'}"
""")
    trainer = MultiLevelTrainer(config, torch.device("cpu"))
    summary = TrainSummary(output="")
    trainer._start(False, summary)
    assert any("initialised from" in note for note in summary.notes)
    batch = faces.targets(np.arange(2), "cpu")
    seen = []
    for _ in range(15):
        trainer.before_step()
        loss, values = trainer.training_loss(batch)
        seen.append({k: float(v) for k, v in values.items()} | {"loss": float(loss.detach())})
        trainer.backward(loss)
    assert abs(seen[-1]["photometric_face"] - seen[0]["photometric_face"]) < 1e-3  # the base level stayed
    assert seen[-1]["final_photometric_face"] < 0.9 * seen[-1]["photometric_face"], seen[-1]
    assert seen[-1]["final_total"] < seen[0]["final_total"]


def test_network_fit_stores_both_levels_from_the_networks_correctives(corrective_run, ict_embedded_model_file):
    from facerecon.stages.fit import FitOptions, read_fits, run_fit

    root, config = corrective_run["root"], corrective_run["config"]
    checkpoint = config.output / "checkpoints" / "latest.pt"
    options = FitOptions(face_model=str(ict_embedded_model_file), checkpoint=str(checkpoint), texture_size=32,
                         overlays=False, level="final", formats=["ply"], recognition_weights=None)
    photos = root / "two"
    photos.mkdir()
    for image in sorted((root / "synth" / "images").glob("*.png"))[:2]:
        shutil.copy(image, photos / image.name)
    summary = run_fit([str(photos)], root / "fit", options)
    assert any("network's corrective coefficients" in note for note in summary.notes)
    predictor = NetworkPredictor(checkpoint, corrective_run["trainer"].tensors, "ict-face-light")
    geometry_basis, reflectance_basis = predictor.corrective_space().geometry, predictor.corrective_space().reflectance
    fits = list(read_fits(root / "fit" / "fits.h5"))
    assert len(fits) == 2
    key, attrs, faces = fits[0]
    face = faces[0]
    assert attrs["method"] == "network" and face["attrs"]["level"] == "final"
    assert json.loads(face["attrs"]["steps"])["correctives"] == 0  # predicted, not optimised
    coefficients = face["corrective_geometry_coefficients"]
    assert coefficients.shape == (MODES[0],) and np.abs(coefficients).max() > 0
    np.testing.assert_allclose(face["corrective_geometry"], np.einsum("c,cnd->nd", coefficients, geometry_basis),
                               atol=1e-4)
    np.testing.assert_allclose(face["corrective_reflectance"],
                               np.einsum("c,cnd->nd", face["corrective_reflectance_coefficients"], reflectance_basis),
                               atol=1e-5)
    assert face["vertices_base"].shape == face["vertices"].shape
    assert not np.allclose(face["vertices_base"], face["vertices"])
    losses = json.loads(face["attrs"]["losses"])
    assert np.isfinite(losses["photometric_face_base"]) and np.isfinite(losses["photometric_face_final"])
