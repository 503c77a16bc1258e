"""Per-row L-BFGS (facerecon.fitting.lbfgs) and its use in the fitter's landmark stage."""

from __future__ import annotations

import torch

from facerecon.facemodel.embedding import face_oval_indices
from facerecon.facemodel.tensors import FaceModelTensors
from facerecon.fitting.lbfgs import batched_lbfgs
from facerecon.fitting.optimize import FaceFitter, FaceTargets, FitSettings
from facerecon.synthetic import random_parameters, render_faces


def _quadratics(scales: torch.Tensor, centres: torch.Tensor):
    """f_b(x) = sum_i scales_bi (x_bi - centres_bi)^2 + 0.1 (x_b0 x_b1)^2, rows independent."""
    calls = []

    def evaluate(x):
        x = x.detach().requires_grad_(True)
        values = (scales * (x - centres) ** 2).sum(dim=1) + 0.1 * (x[:, 0] * x[:, 1]) ** 2
        (gradient,) = torch.autograd.grad(values.sum(), x)
        calls.append(x.shape[0])
        return values.detach(), gradient

    return evaluate, calls


def test_each_row_reaches_its_own_minimum():
    generator = torch.Generator().manual_seed(0)
    # conditioning from 1 to 1e4 per row: one shared line search would serve none of them well
    scales = torch.logspace(0, 4, 6, dtype=torch.float64)[None].repeat(4, 1)
    scales[1] = scales[1].flip(0)
    scales[2] = 1.0
    centres = torch.zeros(4, 6, dtype=torch.float64)
    centres[:, 2:] = torch.randn(4, 4, generator=generator, dtype=torch.float64)
    evaluate, _ = _quadratics(scales, centres)
    x, used = batched_lbfgs(evaluate, torch.randn(4, 6, generator=generator, dtype=torch.float64) * 3,
                            max_evaluations=200)
    assert used <= 200
    assert torch.allclose(x, centres, atol=1e-5), (x - centres).abs().max()


def test_a_row_does_not_depend_on_the_other_rows():
    generator = torch.Generator().manual_seed(1)
    scales = torch.rand(3, 5, generator=generator, dtype=torch.float64) * 100 + 0.5
    centres = torch.randn(3, 5, generator=generator, dtype=torch.float64)
    start = torch.randn(3, 5, generator=generator, dtype=torch.float64)
    evaluate, _ = _quadratics(scales, centres)
    first, _ = batched_lbfgs(evaluate, start, max_evaluations=12)  # budget ends before convergence
    # other problems in rows 1-2: row 0 must take exactly the same path
    scales2, centres2, start2 = scales.clone(), centres.clone(), start.clone()
    scales2[1:] *= 1000.0
    centres2[1:] += 5.0
    start2[1:] = -start2[1:]
    evaluate2, _ = _quadratics(scales2, centres2)
    second, _ = batched_lbfgs(evaluate2, start2, max_evaluations=12)
    assert torch.equal(first[0], second[0])
    assert not torch.allclose(first[0], centres[0], atol=1e-6)  # the budget did cut it short


def test_non_finite_trial_steps_are_backtracked():
    def evaluate(x):  # log barrier: NaN for x <= 0, minimum at x = 1
        x = x.detach().requires_grad_(True)
        values = (x - torch.log(x)).sum(dim=1)
        (gradient,) = torch.autograd.grad(values.sum(), x)
        return values.detach(), gradient

    x, _ = batched_lbfgs(evaluate, torch.tensor([[20.0], [0.05]], dtype=torch.float64), max_evaluations=100)
    assert torch.allclose(x, torch.ones(2, 1, dtype=torch.float64), atol=1e-4), x


def test_landmark_stage_of_a_face_ignores_its_batch_mates(ict_embedded_model):
    tensors = FaceModelTensors(ict_embedded_model)
    generator = torch.Generator().manual_seed(5)
    params = random_parameters(tensors, 4, generator)
    batch = render_faces(tensors, params, 224)
    landmarks = batch.landmarks68 + torch.randn(batch.landmarks68.shape, generator=generator)
    fitter = FaceFitter(tensors, ict_embedded_model.regions,
                        FitSettings(landmark_steps=40, detector_bias_steps=20, coarse_steps=0, fine_steps=0),
                        oval_indices=face_oval_indices())

    def fit(landmarks68):
        return fitter.fit(FaceTargets(batch.images, landmarks68, batch.dense, torch.ones(4, 224, 224)))

    first = fit(landmarks)
    disturbed = landmarks.clone()
    disturbed[2:] += torch.randn(disturbed[2:].shape, generator=generator) * 20.0  # two badly detected faces
    second = fit(disturbed)
    for name in ("angles", "translation", "identity", "expression"):
        assert (first.parameters[name][:2] == second.parameters[name][:2]).all(), name
    assert (first.parameters["identity"][2:] != second.parameters["identity"][2:]).any()
