"""The blendshape prior, gaze from the irises, and what they do to a fit of a neutral face."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from facerecon.facemodel.blendshape_pairs import expression_report
from facerecon.fitting.gaze import GAZE_NAMES, EYES, gaze_columns, gaze_weights, iris_offsets
from facerecon.losses.expression import blendshape_prior, observed_weight_prior


def test_blendshape_prior_terms():
    weights = torch.tensor([[0.5, 0.5, 0.0], [1.0, 0.0, 0.0]])
    pairs = torch.tensor([[0, 1]])
    assert torch.allclose(blendshape_prior(weights, pairs, 1.0, 0.0, 0.0), torch.tensor([1.0, 1.0]))
    assert torch.allclose(blendshape_prior(weights, pairs, 0.0, 1.0, 0.0), torch.tensor([0.5, 1.0]))
    # the pair term is zero as soon as one side is off, and grows with both
    assert torch.allclose(blendshape_prior(weights, pairs, 0.0, 0.0, 1.0), torch.tensor([0.25, 0.0]))
    assert torch.allclose(blendshape_prior(weights, torch.zeros(0, 2, dtype=torch.long), 0.0, 0.0, 1.0),
                          torch.zeros(2))
    x = weights.clone().requires_grad_(True)
    blendshape_prior(x, pairs, 0.0, 0.0, 1.0).sum().backward()
    assert torch.allclose(x.grad[0, :2], torch.tensor([0.5, 0.5])) and x.grad[1, 1] == 1.0  # pushes the pair apart


def test_observed_weight_prior_ignores_unobserved_entries():
    weights = torch.tensor([[0.2, 0.9, 0.4]])
    observed = torch.tensor([[0.0, float("nan")]])
    value = observed_weight_prior(weights, torch.tensor([0, 1]), observed, 2.0)
    assert torch.allclose(value, torch.tensor([2.0 * 0.04]))
    assert observed_weight_prior(weights, torch.zeros(0, dtype=torch.long), observed[:, :0], 2.0).item() == 0.0


def _eyes(iris_shift: tuple[float, float]) -> torch.Tensor:
    """(1, 478, 2) points: two level eyes 30 px wide, irises shifted by ``iris_shift`` eye widths
    (image x, y) from their rest position (0.1 eye widths above the corner line)."""
    points = torch.zeros(1, 478, 2)
    (r_out, r_in, r_iris), (l_out, l_in, l_iris) = EYES["_R"], EYES["_L"]
    points[0, r_out], points[0, r_in] = torch.tensor([40.0, 50.0]), torch.tensor([70.0, 50.0])
    points[0, l_in], points[0, l_out] = torch.tensor([90.0, 50.0]), torch.tensor([120.0, 50.0])
    shift = torch.tensor(iris_shift) * 30.0
    points[0, r_iris] = torch.tensor([55.0, 47.0]) + shift
    points[0, l_iris] = torch.tensor([105.0, 47.0]) + shift
    return points


def test_gaze_from_irises():
    ahead = gaze_weights(_eyes((0.0, 0.0)))
    assert torch.allclose(ahead, torch.zeros(1, 8), atol=1e-6)
    offsets = iris_offsets(_eyes((0.2, 0.0)))  # both irises towards image +x: the subject looks to their left
    assert offsets[0, 0, 0] < -0.19 and offsets[0, 1, 0] > 0.19  # right eye: towards its inner corner
    looking_left = dict(zip(GAZE_NAMES, gaze_weights(_eyes((0.2, 0.0)))[0].tolist()))
    assert looking_left["eyeLookIn_R"] == pytest.approx(1.0) and looking_left["eyeLookOut_L"] == pytest.approx(1.0)
    assert looking_left["eyeLookOut_R"] == 0.0 and looking_left["eyeLookIn_L"] == 0.0
    down = dict(zip(GAZE_NAMES, gaze_weights(_eyes((0.0, 0.1)))[0].tolist()))
    assert 0.4 < down["eyeLookDown_L"] < 0.6 and down["eyeLookUp_L"] == 0.0 and down["eyeLookDown_R"] == down["eyeLookDown_L"]
    assert gaze_columns(["jawOpen"]).size == 0 and gaze_columns(list(GAZE_NAMES)).tolist() == list(range(8))


def test_prior_keeps_a_neutral_face_neutral(ict_embedded_model):
    """Landmarks of neutral faces with detector-like noise: without the blendshape prior the fit
    turns blendshapes on to chase the noise; with the default prior much less, and the faces pass
    the neutral-face test."""
    from facerecon.facemodel.tensors import FaceModelTensors
    from facerecon.fitting.optimize import NO_EXPRESSION_PRIOR, FaceFitter, FaceTargets, FitSettings
    from facerecon.synthetic import random_parameters, render_faces

    tensors = FaceModelTensors(ict_embedded_model)
    generator = torch.Generator().manual_seed(5)
    params = random_parameters(tensors, 2, generator, expression_scale=0.0)
    params["identity"] *= 0.5
    batch = render_faces(tensors, params, 224)
    noise = torch.randn(batch.dense.shape, generator=generator) * 4.0
    targets_kwargs = dict(crops=batch.images, landmarks68=batch.landmarks68, dense=batch.dense + noise,
                          attention=batch.mask.float())

    reports = {}
    for name, settings in {"off": FitSettings(coarse_steps=0, fine_steps=0, landmark_steps=60, **NO_EXPRESSION_PRIOR),
                           "on": FitSettings(coarse_steps=0, fine_steps=0, landmark_steps=60)}.items():  # default
        fitter = FaceFitter(tensors, ict_embedded_model.regions, settings)
        result = fitter.fit(FaceTargets(**targets_kwargs))
        reports[name] = [expression_report(w, ict_embedded_model.expression_names) for w in result.parameters["expression"]]
    off = [r["sum_weights"] for r in reports["off"]]
    on = [r["sum_weights"] for r in reports["on"]]
    assert all(a < b for a, b in zip(on, off)) and sum(on) < 0.75 * sum(off)
    assert all(r["neutral_ok"] for r in reports["on"])
