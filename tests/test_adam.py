"""The fits' own Adam: torch.optim.Adam's results, without torch.optim's import of torch._dynamo."""

from __future__ import annotations

import math
import os
import subprocess
import sys

import pytest
import torch

from facerecon.fitting.adam import Adam, LambdaSchedule
from tests.conftest import REPO_ROOT, _ict_npz_path, require_file


def _factor(i: int) -> float:  # the fitter's warm-up and cosine decay
    return min(1.0, (i + 1) / 11) * (0.05 + 0.95 * 0.5 * (1.0 + math.cos(math.pi * min(i, 30) / 30)))


def _run(kind: str, start: list[torch.Tensor]) -> list[torch.Tensor]:
    xs = [x.clone().requires_grad_(True) for x in start]
    groups = [{"params": [xs[0]], "lr": 1.5}, {"params": [xs[1], xs[2]], "lr": 0.09}]
    if kind == "torch":
        optimizer = torch.optim.Adam(groups)
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, _factor)
    else:
        optimizer = Adam(groups)
        schedule = LambdaSchedule(optimizer, _factor)
    for step in range(30):
        loss = (xs[0].sin() ** 2).sum() + (xs[1] * xs[0][:1, :3]).cos().sum()
        if step != 4:  # one step where a parameter has no gradient
            loss = loss + (xs[2] ** 3).sum()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if step == 7:  # what FaceFitter._reset_faces does to a diverged face
            optimizer.state[xs[0]]["exp_avg"][1] = 0.0
            optimizer.state[xs[0]]["exp_avg_sq"][1] = 0.0
            for group in optimizer.param_groups:
                group["lr"] *= 0.5
        schedule.step()
    return [x.detach() for x in xs]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_adam_and_its_schedule_reproduce_torch_optim_bit_for_bit(dtype):
    generator = torch.Generator().manual_seed(0)
    start = [torch.randn(4, 7, generator=generator, dtype=dtype), torch.randn(1, 3, generator=generator, dtype=dtype),
             torch.randn(2, 2, generator=generator, dtype=dtype)]
    for ours, reference in zip(_run("ours", start), _run("torch", start)):
        assert torch.equal(ours, reference)


def test_zero_grad_without_set_to_none_zeroes_in_place():
    x = torch.ones(3, requires_grad=True)
    (x * 2).sum().backward()
    optimizer = Adam([{"params": [x], "lr": 0.1}])
    optimizer.zero_grad(set_to_none=False)
    assert torch.equal(x.grad, torch.zeros(3))
    optimizer.zero_grad()
    assert x.grad is None


def test_a_fit_does_not_import_torch_dynamo():
    """torch.optim's optimisers import torch._dynamo (seconds) when first built; the fits do not."""
    script = (
        "import sys, torch\n"
        "from facerecon.facemodel.ict import import_ict\n"
        "from facerecon.facemodel.tensors import FaceModelTensors\n"
        "from facerecon.fitting.optimize import FaceFitter, FaceTargets, FitSettings\n"
        "from facerecon.synthetic import random_parameters, render_faces\n"
        "model = import_ict(sys.argv[1])\n"
        "tensors = FaceModelTensors(model)\n"
        "params = random_parameters(tensors, 1, torch.Generator().manual_seed(0))\n"
        "batch = render_faces(tensors, params, 112)\n"
        "targets = FaceTargets(batch.images, batch.landmarks68, None, torch.ones(1, 112, 112))\n"
        "settings = FitSettings(landmark_steps=3, coarse_steps=2, fine_steps=2, use_dense_landmarks=False,\n"
        "                       detector_bias_iterations=0)\n"
        "FaceFitter(tensors, model.regions, settings).fit(targets)\n"
        "print('dynamo' if 'torch._dynamo' in sys.modules else 'no dynamo')\n"
    )
    npz = require_file(_ict_npz_path(), "ICT-FaceKit archive")
    result = subprocess.run([sys.executable, "-c", script, str(npz)], cwd=REPO_ROOT, capture_output=True, text=True,
                            check=False, env={**os.environ, "PYTHONPATH": str(REPO_ROOT)})
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip().splitlines()[-1] == "no dynamo"
