"""Multi-view training (paper 001): covisible maps, consistency losses, grouped batches,
AMP switches and torchrun/DDP on CPU (gloo)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from facerecon.cli import main
from facerecon.facemodel.tensors import FaceModelTensors
from facerecon.fitting.camera import camera_rotation, crop_intrinsics, model_to_camera
from facerecon.losses import multiview as mv
from facerecon.render.camera import project_points, scale_intrinsics
from tests.helpers_detect import write_synth_detections
from facerecon.render.renderer import MeshRenderer
from facerecon.synthetic import random_parameters
from facerecon.training.config import ConfigError, parse_config
from facerecon.training.distributed import DistContext, shard
from facerecon.training.trainer import (BatchPlan, FaceSet, Trainer, folder_group, load_faces, resolve_amp,
                                        split_validation)

REPO = Path(__file__).resolve().parents[1]
SIZE = 64


# --------------------------------------------------------------------------- scenes


@pytest.fixture(scope="module")
def face(ict_model):
    tensors = FaceModelTensors(ict_model)
    tris = ict_model.triangles[np.isin(ict_model.triangles, ict_model.regions["photometric"]).all(1)]
    return tensors, torch.as_tensor(tris)


def _scene(face, yaws, pitches=None, size=SIZE):
    """One face (same identity, expression, albedo) seen at several yaws; unlit renders."""
    tensors, tris = face
    p = random_parameters(tensors, 1, torch.Generator().manual_seed(1), yaw_degrees=0.0, pitch_degrees=0.0)
    b = len(yaws)
    p = {k: v.expand(b, *v.shape[1:]).clone() for k, v in p.items()}
    p["angles"] = torch.zeros(b, 3)
    p["angles"][:, 1] = torch.deg2rad(torch.tensor(yaws, dtype=torch.float32))
    if pitches is not None:
        p["angles"][:, 0] = torch.deg2rad(torch.tensor(pitches, dtype=torch.float32))
    cam = model_to_camera(tensors.shape(p["identity"], p["expression"]), p["angles"], p["translation"])
    k = crop_intrinsics(size, b)
    out = MeshRenderer((size, size), backend="torch").render(cam, tris, k, tensors.albedo(p["albedo"]).clamp(0, 1))
    landmarks = project_points(tensors.landmark_points(cam), k)[..., :2]
    return {"p": p, "cam": cam, "k": k, "tris": tris, "out": out, "landmarks": landmarks,
            "rotation": camera_rotation(p["angles"])}


def _losses(scene, angles=None, translation=None, views=2):
    p = scene["p"]
    rotation = scene["rotation"] if angles is None else camera_rotation(angles)
    translation = p["translation"] if translation is None else translation
    return mv.multiview_losses(scene["cam"], scene["tris"], scene["out"].image, scene["landmarks"], rotation,
                               translation, scene["k"], views, SIZE)


# --------------------------------------------------------------------------- pure functions


def test_relative_pose_and_view_pairs():
    generator = torch.Generator().manual_seed(0)
    angles = (torch.rand(4, 3, generator=generator) - 0.5)
    translation = torch.randn(4, 3, generator=generator) * 50 + torch.tensor([0.0, 0.0, 1200.0])
    points = (torch.randn(1, 20, 3, generator=generator) * 80).expand(4, -1, -1)  # one face, 4 poses
    cam = model_to_camera(points, angles, translation)
    r = camera_rotation(angles)
    rel_r, rel_t = mv.relative_pose(r[:2], translation[:2], r[2:], translation[2:])
    moved = cam[:2] @ rel_r.transpose(1, 2) + rel_t[:, None]
    torch.testing.assert_close(moved, cam[2:], atol=1e-3, rtol=1e-5)
    t, s = mv.view_pairs(2, 3)
    assert t.tolist() == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5]
    assert s.tolist() == [1, 2, 0, 2, 0, 1, 4, 5, 3, 5, 3, 4]


def test_covisible_map_is_the_mask_for_identical_views_and_shrinks_with_yaw(face):
    scene = _scene(face, [0.0, 0.0, 0.0, 25.0, 0.0, 55.0])
    frags = scene["out"].fragments
    visible = mv.vertex_visibility(frags.triangle_id, scene["tris"], scene["cam"].shape[1])
    assert torch.equal(visible, scene["out"].vertex_visibility)  # same rule as the renderer's
    t, s = mv.view_pairs(3, 2)
    covisible = mv.covisible_map(frags.triangle_id[t], scene["tris"], visible[t], visible[s])
    mask = frags.mask[t]
    assert torch.equal(covisible[0], mask[0]) and mask[0].sum() > 500
    assert not (covisible & ~mask).any()  # only face pixels
    fraction = (covisible.flatten(1).sum(1) / mask.flatten(1).sum(1)).tolist()
    assert fraction[0] == 1.0 > fraction[2] > fraction[4], fraction
    assert fraction[4] < 0.9
    # the terms report the same fraction
    np.testing.assert_allclose(_losses(scene)["covisible"].numpy()[[0, 2, 4]], np.array(fraction)[[0, 2, 4]])


def test_pixel_consistency_vanishes_for_true_poses_and_rises_with_a_wrong_one(face):
    scene = _scene(face, [0.0, 20.0, -10.0, 30.0])
    true = _losses(scene)
    assert true["pixel"].max() < 0.015, true["pixel"]
    angles = scene["p"]["angles"].clone()
    angles[1::2, 1] += 0.08  # the source views' yaw off by ~4.6 degrees
    wrong = _losses(scene, angles=angles)
    assert (wrong["pixel"] > 3 * true["pixel"] + 0.01).all(), (true["pixel"], wrong["pixel"])
    shifted = scene["p"]["translation"].clone()
    shifted[1::2, 1] += 8.0  # 8 mm off vertically
    assert (_losses(scene, translation=shifted)["pixel"] > 3 * true["pixel"] + 0.01).all()


def test_depth_consistency_vanishes_for_true_geometry_and_is_scale_rectified(face):
    scene = _scene(face, [0.0, 20.0, -10.0, 30.0])
    true = _losses(scene)
    assert true["depth"].max() < 0.5, true["depth"]  # mm, at ~1200 mm
    angles = scene["p"]["angles"].clone()
    angles[1::2, 1] += 0.08
    assert (_losses(scene, angles=angles)["depth"] > 3 * true["depth"] + 1.0).all()
    # eq. 4 directly: a global scale of the synthesized depth is rectified
    depth_t = scene["out"].depth[:2]
    weight = scene["out"].mask[:2]
    noisy = depth_t + torch.randn(depth_t.shape, generator=torch.Generator().manual_seed(0)) * weight
    base = mv.depth_consistency(depth_t, noisy, weight)
    assert (base > 0.3).all()
    torch.testing.assert_close(mv.depth_consistency(depth_t, 1.7 * noisy, weight), base, rtol=1e-4, atol=1e-4)
    assert mv.depth_consistency(depth_t, 0.6 * depth_t, weight).max() < 1e-3
    assert mv.depth_consistency(depth_t, 0.6 * depth_t, torch.zeros_like(weight)).abs().max() == 0


def test_epipolar_loss_vanishes_for_true_correspondences_and_grows_with_a_wrong_pose(face):
    scene = _scene(face, [0.0, 25.0, 0.0, -30.0], pitches=[0.0, 5.0, 10.0, 0.0])
    true = _losses(scene)
    assert true["epipolar"].max() < 0.05, true["epipolar"]  # pixels, summed over 68 points
    angles = scene["p"]["angles"].clone()
    angles[1::2, 0] += 0.1  # pitch of the source views off by ~5.7 degrees
    wrong = _losses(scene, angles=angles)
    assert (wrong["epipolar"] > 1.0).all(), wrong["epipolar"]
    # symmetric variant and pure function: same zero, and a pure translation keeps identical points
    rel_r, rel_t = mv.relative_pose(scene["rotation"][:1], scene["p"]["translation"][:1], scene["rotation"][1:2],
                                    scene["p"]["translation"][1:2])
    fundamental = mv.fundamental_matrix(scene["k"][:1], scene["k"][1:2], rel_r, rel_t)
    lm = scene["landmarks"]
    assert mv.epipolar_loss(lm[:1], lm[1:2], fundamental, symmetric=True).item() < 0.05
    assert mv.epipolar_loss(lm[:1], lm[1:2] + torch.tensor([0.0, 3.0]), fundamental).item() > 10.0
    # coinciding cameras (an untrained network): finite, zero, with finite gradients
    translation = torch.zeros(1, 3, requires_grad=True)
    value = mv.epipolar_loss(lm[:1], lm[1:2], mv.fundamental_matrix(scene["k"][:1], scene["k"][1:2],
                                                                    torch.eye(3)[None], translation))
    value.sum().backward()
    assert torch.isfinite(translation.grad).all() and value.item() == 0.0


def test_multiview_losses_give_finite_gradients(face):
    scene = _scene(face, [0.0, 30.0])
    p = scene["p"]
    angles = p["angles"].clone().requires_grad_(True)
    translation = p["translation"].clone().requires_grad_(True)
    cam = scene["cam"].clone().requires_grad_(True)
    terms = mv.multiview_losses(cam, scene["tris"], scene["out"].image, scene["landmarks"] + 1.0,
                                camera_rotation(angles), translation, scene["k"], 2, SIZE)
    weights = dict(mv.PAPER001_WEIGHTS, depth=1.0, epipolar=1.0)
    mv.combine(terms, weights).backward()
    for tensor in (angles, translation, cam):
        assert torch.isfinite(tensor.grad).all() and tensor.grad.abs().sum() > 0


def test_batch_plan_groups_views_and_is_deterministic():
    groups = ["a"] * 7 + ["b"] * 3 + ["c"] * 2 + [None] * 2 + ["d"] * 4
    n = len(groups)
    faces = FaceSet([f"k{i}" for i in range(n)], np.zeros((n, 1, 1, 3), np.uint8), np.zeros((n, 68, 2)),
                    np.zeros((n, 468, 2)), np.zeros((n, 1, 1), np.uint8), groups)
    plan = BatchPlan(faces, batch_size=6, views=3, seed=5)
    assert (plan.groups, plan.tuples, plan.unused) == (3, 4, 4)  # a: 2 tuples, b: 1, d: 1; c and None unused
    seen = []
    for step in range(2):  # one epoch: 4 tuples in 2 batches of 2
        units = plan(step)
        assert units.shape == (2, 3)
        for row in units:
            assert len({groups[i] for i in row}) == 1 and None not in {groups[i] for i in row}
        seen.extend(units.reshape(-1).tolist())
    assert len(seen) == len(set(seen)) == 12
    again = BatchPlan(faces, batch_size=6, views=3, seed=5)
    for step in (0, 1, 2, 7):
        np.testing.assert_array_equal(plan(step), again(step))  # a resumed run sees the same batches
    assert not all(np.array_equal(plan(s), plan(s + 2)) for s in range(2))  # reshuffled per epoch
    parts = [shard(plan(0), DistContext(world_size=2, rank=r)) for r in range(2)]
    assert parts[0].shape == (1, 3) and sorted(np.concatenate(parts).reshape(-1)) == sorted(plan(0).reshape(-1))
    with pytest.raises(ValueError, match="cannot be split evenly"):
        shard(plan(0), DistContext(world_size=3, rank=0))
    # validation split keeps identities whole
    train, valid = split_validation(faces, 0.5)
    assert not ({g for g in train.groups if g} & {g for g in valid.groups if g})
    assert folder_group("d.h5", "alice/x/1.png") == "d.h5:alice/x" and folder_group("d.h5", "top.png") is None
    assert folder_group("d.h5", "alice/1.png", "/data/a/alice/1.png") == "/data/a/alice"
    assert folder_group("d.h5", "top.png", "/data/a/top.png") is None


# --------------------------------------------------------------------------- config


@pytest.mark.parametrize("text, message", [
    ("[multiview]\npixle = 0.1", "unknown key multiview.pixle"),
    ("[multiview]\ndepth = -1.0", "multiview.depth must not be negative"),
    ("[multiview]\nepipolar = 'high'", "multiview.epipolar must be int or float"),
    ("[data]\ngroup_by = 'person'", "data.group_by must be one of 'none', 'folder', 'synth'"),
    ("[data]\ngroup_by = 'folder'\nviews_per_identity = 3", "optim.batch_size (8) must be a multiple of "
                                                             "data.views_per_identity (3)"),
    ("[data]\nviews_per_identity = 1", "data.views_per_identity must be at least 2"),
    ("[optim]\namp = 'fp32'", "optim.amp must be one of"),
    ("[optim]\nchannels_last = true", "optim.channels_last must be str"),
    ("[distributed]\nbackend = 'mpi'", "distributed.backend must be one of"),
    ("[distributed]\ntimeout_minutes = 0", "distributed.timeout_minutes must be positive"),
])
def test_bad_multiview_settings_fail_with_one_line(text, message):
    with pytest.raises(ConfigError) as info:
        parse_config(text + "\n[data]\nimages = ['x']\n" if "[data]" not in text else
                     text + "\nimages = ['x']\n")
    assert message in str(info.value) and "\n" not in str(info.value)


def test_defaults_are_the_papers_and_the_cli_reports_bad_keys(tmp_path):
    printed = CliRunner().invoke(main, ["train", "--print-config"])
    assert "[multiview]" in printed.output and "group_by" in printed.output and "amp" in printed.output
    config = parse_config(printed.output.replace("images = []", "images = ['x']"))
    assert config.multiview_weights == mv.PAPER001_WEIGHTS
    assert (config.group_by, config.views_per_identity, config.amp, config.channels_last) == ("none", 1, "auto",
                                                                                              "auto")
    assert resolve_amp("auto", torch.device("cpu")) is None and resolve_amp("bf16", torch.device("cpu")) == \
        torch.bfloat16
    with pytest.raises(ValueError, match="fp16"):
        resolve_amp("fp16", torch.device("cpu"))
    bad = tmp_path / "bad.toml"
    bad.write_text("[data]\nimages = ['x']\n[multiview]\nweigth = 2.0\n")
    result = CliRunner().invoke(main, ["train", "--config", str(bad)])
    assert result.exit_code == 2 and "unknown key multiview.weigth" in result.output


# --------------------------------------------------------------------------- training


@pytest.fixture(scope="module")
def grouped_data(ict_model_file, tmp_path_factory):
    from facerecon.stages.synth import SynthOptions, run_synth

    root = tmp_path_factory.mktemp("multiview")
    run_synth(root / "synth", SynthOptions(face_model=str(ict_model_file), count=12, views=3, size=SIZE, zoom=1.0,
                                           max_yaw=30, max_pitch=10))
    images = sorted((root / "synth" / "images").glob("*.png"))
    return write_synth_detections(root / "detections.h5", root / "synth", [(p.name, p) for p in images])


def test_folder_and_synth_grouping_rules(grouped_data, tmp_path):
    import shutil

    synth_images = sorted((grouped_data.parent / "synth" / "images").glob("*.png"))
    people = tmp_path / "people"
    pairs = []
    for image in synth_images[:6]:
        target = people / f"person{image.name[5]}" / image.name  # 000000_0.png -> person0/
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(image, target)
        pairs.append((target.relative_to(people).as_posix(), target))
    loose = people / synth_images[6].name  # at the top of the input folder: no identity
    shutil.copy(synth_images[6], loose)
    pairs.append((loose.name, loose))
    detections = write_synth_detections(tmp_path / "people.h5", grouped_data.parent / "synth", pairs)
    faces = load_faces([detections], "folder")
    by_key = dict(zip(faces.keys, faces.groups))
    assert by_key[f"people.h5:{loose.name}#0"] is None
    assert by_key["people.h5:person0/000000_0.png#0"] == by_key["people.h5:person0/000000_2.png#0"] == \
        str(people / "person0")
    assert len({g for g in faces.groups if g}) == 2
    assert load_faces([detections], "none").groups is None
    with pytest.raises(ValueError, match="no image is recorded in a synth.h5"):
        load_faces([detections], "synth")  # copies outside the synth folder
    synth = load_faces([grouped_data], "synth")
    assert synth.groups[0] == f"{grouped_data.parent / 'synth' / 'synth.h5'}:0" and synth.groups[3] != synth.groups[0]


def _grouped_config(data: Path, model_file, output: Path, steps: int = 4, extra: str = "") -> str:
    return f"""
[data]
detections = ["{data}"]
validation_fraction = 0.0
group_by = "synth"
views_per_identity = 3
[model]
face_model = "{model_file}"
[network]
architecture = "resnet18"
[loss]
render_size = 32
[optim]
learning_rate = 1e-3
batch_size = 6
steps = {steps}
{extra}
[output]
directory = "{output}"
checkpoint_every = 2
preview_every = 100
validate_every = 100
"""


def _records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_grouped_training_logs_multiview_terms_and_resumes_exactly(grouped_data, ict_model_file, tmp_path):
    config = parse_config(_grouped_config(grouped_data, ict_model_file, tmp_path / "run"))
    faces = load_faces([grouped_data], "synth")
    assert len({g for g in faces.groups}) == 4 and all(g is not None for g in faces.groups)
    train, valid = split_validation(faces, config.validation_fraction)
    summary = Trainer(config, torch.device("cpu")).run(train, valid, resume=False)
    assert summary.steps_done == 4 and any("4 identities" in n for n in summary.notes)
    records = _records(config.output / "metrics.jsonl")
    assert len(records) == 4
    for r in records:
        for key in ("multiview_pixel", "multiview_depth", "multiview_epipolar", "multiview_covisible"):
            assert math.isfinite(r[key]), (key, r)
        assert r["multiview_pixel"] > 0 and 0 < r["multiview_covisible"] <= 1
    # the multi-view part is in the loss: loss minus the paper-000 part equals eq. 6's
    trainer = Trainer(config, torch.device("cpu"))
    batch = train.targets(np.arange(6), torch.device("cpu"))
    loss, values = trainer.training_loss(batch)
    paper000 = trainer.batch_losses(batch)["total"].mean()
    expected = sum(w * values[f"multiview_{k}"] for k, w in (("pixel", 0.15), ("depth", 1e-4), ("epipolar", 1e-3)))
    torch.testing.assert_close(loss.detach() - paper000.detach(), expected, rtol=1e-4, atol=1e-6)
    # interrupted after 2 steps and resumed: the same loss curve
    halted = parse_config(_grouped_config(grouped_data, ict_model_file, tmp_path / "run2"))
    calls = []
    first = Trainer(halted, torch.device("cpu")).run(train, valid, resume=False,
                                                      should_stop=lambda: calls.append(1) or len(calls) > 2)
    assert first.interrupted and first.steps_done == 2
    Trainer(halted, torch.device("cpu")).run(train, valid, resume=True)
    np.testing.assert_allclose([r["loss"] for r in _records(halted.output / "metrics.jsonl")],
                               [r["loss"] for r in records], rtol=1e-5)


def test_bf16_autocast_and_channels_last_train_on_cpu(grouped_data, ict_model_file, tmp_path):
    config = parse_config(_grouped_config(grouped_data, ict_model_file, tmp_path / "amp", steps=1,
                                          extra='amp = "bf16"\nchannels_last = "on"'))
    trainer = Trainer(config, torch.device("cpu"))
    assert trainer.amp_dtype == torch.bfloat16 and trainer.channels_last
    faces = load_faces([grouped_data], "synth")
    batch = faces.targets(np.arange(6), torch.device("cpu"))
    params = trainer.predict(batch.crops)
    assert all(v.dtype == torch.float32 for v in params.values())
    assert trainer.network.backbone.fc.weight.dtype == torch.float32  # master weights stay float32
    summary = trainer.run(faces, faces.subset(np.zeros(len(faces), bool)), resume=False)
    records = _records(config.output / "metrics.jsonl")
    assert summary.steps_done == 1 and all(math.isfinite(r["loss"]) and math.isfinite(r["multiview_pixel"])
                                           for r in records)


def test_torchrun_two_processes_on_cpu(grouped_data, ict_model_file, tmp_path):
    """torchrun --nproc_per_node 2 on gloo: one metrics file, identical parameters on both ranks,
    data prepared by rank 0 only, and the first global loss equals a one-process run's."""
    cfg = tmp_path / "ddp.toml"
    cfg.write_text(_grouped_config(grouped_data, ict_model_file, tmp_path / "ddp", steps=3,
                                   extra="[augment]\nenabled = false"))
    code = f"""
import os, torch
import facerecon.training.run as T
rank, out = os.environ["RANK"], {str(tmp_path)!r}
original_prepare, original_run = T.prepare_data, T.run_training
def prepare(*args, **kwargs):
    open(os.path.join(out, "prepared_by_" + rank), "w").close()
    return original_prepare(*args, **kwargs)
def run(*args, **kwargs):
    summary, trainer = original_run(*args, **kwargs)
    torch.save(dict(trainer.network.named_parameters()), os.path.join(out, "params_" + rank + ".pt"))
    return summary, trainer
T.prepare_data, T.run_training = prepare, run
from facerecon.cli import main
main(["train", "--config", {str(cfg)!r}, "--device", "cpu", "--json"], standalone_mode=False)
"""
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                             "--no-python", sys.executable, "-c", code], env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count('"steps_done": 3') == 1  # only rank 0 reports
    assert sorted(p.name for p in tmp_path.glob("prepared_by_*")) == ["prepared_by_0"]
    records = _records(tmp_path / "ddp" / "metrics.jsonl")
    assert [r["step"] for r in records] == [1, 2, 3]  # one writer
    assert sorted(p.name for p in (tmp_path / "ddp" / "checkpoints").iterdir()) == [
        "latest.pt", "step_0000002.pt", "step_0000003.pt"]
    ranks = [torch.load(tmp_path / f"params_{r}.pt", weights_only=False) for r in "01"]
    assert ranks[0].keys() == ranks[1].keys()
    for name, value in ranks[0].items():
        assert torch.equal(value, ranks[1][name]), name
    saved = torch.load(tmp_path / "ddp" / "checkpoints" / "latest.pt", weights_only=False)
    assert saved["step"] == 3 and torch.equal(saved["network"]["backbone.fc.weight"], ranks[0]["backbone.fc.weight"])
    # step 1 (zero final layer, so batch-norm statistics do not matter yet): the mean over the two
    # shards is the one-process loss of the whole global batch
    single = parse_config(cfg.read_text().replace(str(tmp_path / "ddp"), str(tmp_path / "single"))
                          .replace("steps = 3", "steps = 1"))
    faces = load_faces([grouped_data], "synth")
    Trainer(single, torch.device("cpu")).run(*split_validation(faces, 0.0), resume=False)
    one = _records(tmp_path / "single" / "metrics.jsonl")[0]
    for key in ("loss", "photometric", "landmark", "multiview_pixel", "multiview_covisible"):
        assert one[key] == pytest.approx(records[0][key], rel=1e-4), key
    assert one["multiview_depth"] == pytest.approx(records[0]["multiview_depth"], abs=1e-4)  # ~0: equal poses


def test_multiview_terms_reuse_the_photometric_rasterization(face):
    """A grouped training step rasterizes once: passing the photometric render's fragments (same
    meshes, size and intrinsics) gives the same terms and gradients as rasterizing again."""
    scene = _scene(face, [0.0, 25.0])
    size = 32  # rendered at half the crop size, as the training loss does
    cam = scene["cam"].clone().requires_grad_(True)
    k_render = crop_intrinsics(SIZE, 2)
    rendered = MeshRenderer((size, size), backend="torch").render(
        cam, scene["tris"], scale_intrinsics(k_render, size / SIZE), torch.ones_like(cam).clamp(0, 1))
    args = (scene["tris"], scene["out"].image, scene["landmarks"], scene["rotation"], scene["p"]["translation"],
            scene["k"], 2, size)
    again = mv.multiview_losses(cam, *args)
    reused = mv.multiview_losses(cam, *args, fragments=rendered.fragments)
    for name in again:
        torch.testing.assert_close(reused[name], again[name])
    grad_again, = torch.autograd.grad(again["depth"].sum() + again["pixel"].sum(), cam, retain_graph=True)
    grad_reused, = torch.autograd.grad(reused["depth"].sum() + reused["pixel"].sum(), cam)
    torch.testing.assert_close(grad_reused, grad_again)
