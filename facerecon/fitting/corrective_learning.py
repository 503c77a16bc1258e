"""Learning paper 004's corrective space from a fitted photo collection, without a GPU.

Paper 004 learns the corrective bases Theta_g, Theta_r jointly with a regression network on
142k photos. Here the collection is small (the base fits of ``facerecon fit`` runs) and the
coefficients are per photo, so the space is learned by optimisation (:func:`learn_corrective_space`):

1. *free-form start*: every photo's free-form correctives
   (:class:`~facerecon.fitting.correctives.CorrectiveFitter` without a space);
2. *initial bases*: the leading right singular vectors of the stacked fields (uncentred: the
   space is linear, F = delta @ Theta, as paper 004's), geometry and reflectance separately;
3. *joint refinement*: Adam on Theta_g, Theta_r and every photo's delta_g, delta_r together on
   the corrective level's loss (skin-weighted photometric, landmarks, eqs. 12-15), over the
   collection in fixed batches;
4. *scale*: every mode is rescaled so that its coefficients over the collection have unit RMS
   (the fit's prior on them is then N(0, 1)-like).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from facerecon.errors import InputError
from facerecon.facemodel.corrective_space import CorrectiveSpace
from facerecon.fitting.adam import Adam, LambdaSchedule
from facerecon.fitting.correctives import BASE_PARAMETERS, CorrectiveFitter
from facerecon.fitting.optimize import FaceTargets


@dataclass
class LearnSettings:
    """Options of :func:`learn_corrective_space` (raises InputError when out of range)."""

    geometry_modes: int = 8
    reflectance_modes: int = 8
    steps: int = 120  # joint Adam steps (each over one batch of photos)
    batch_size: int = 8
    basis_step: float = 0.002  # Adam step of a basis entry (mm or reflectance per unit coefficient)
    coefficient_step: float = 0.02  # Adam step of a photo's coefficient
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("geometry_modes", "reflectance_modes", "batch_size"):
            if not (isinstance(getattr(self, name), int) and getattr(self, name) >= 1):
                raise InputError(f"{name} must be a whole number >= 1")
        if not (isinstance(self.steps, int) and self.steps >= 0):
            raise InputError("steps must be a whole number >= 0")
        for name in ("basis_step", "coefficient_step"):
            if not (math.isfinite(getattr(self, name)) and getattr(self, name) > 0):
                raise InputError(f"{name} must be a number > 0")


def _rows(targets: FaceTargets, index: list[int]) -> FaceTargets:
    rows = torch.as_tensor(index, dtype=torch.int64)

    def pick(x):
        return None if x is None else x[rows]

    return FaceTargets(targets.crops[rows], targets.landmarks68[rows], pick(targets.dense), targets.attention[rows],
                       pick(targets.gaze), pick(targets.inner_mouth))


def leading_modes(fields: torch.Tensor, count: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Uncentred rank-``count`` factorisation of per-photo fields (P, D): (coefficients (P, C),
    basis (C, D)) with ``coefficients @ basis`` the best rank-C approximation and unit-RMS
    coefficients per mode. C = min(count, P, D)."""
    u, sigma, vt = torch.linalg.svd(fields, full_matrices=False)
    c = min(count, sigma.numel())
    rms = math.sqrt(fields.shape[0])
    return u[:, :c] * rms, (sigma[:c, None] * vt[:c]) / rms


def learn_corrective_space(fitter: CorrectiveFitter, targets: FaceTargets, parameters: dict[str, np.ndarray],
                           trust: np.ndarray | None = None, settings: LearnSettings | None = None,
                           description: str = "", progress: Callable[[str, int, int], None] | None = None
                           ) -> tuple[CorrectiveSpace, dict[str, np.ndarray], dict[str, float]]:
    """Learn Theta_g, Theta_r and every photo's coefficients from P fitted photos (module docstring).

    Args:
        fitter: a free-form corrective fitter (its settings weight the loss).
        targets: (P, ...) the photos the base level was fitted to; parameters: their base fits
            (:data:`~facerecon.fitting.correctives.BASE_PARAMETERS`, (P, ...)); trust: (P,) their
            final landmark trust (None: 1).
        settings: :class:`LearnSettings`.
        description: stored with the space.
        progress: called as ``progress(phase, done, total)``.

    Returns:
        the space (bases (C, N, 3) over the whole mesh, zero outside the rendered region), the
        photos' coefficients ``geometry`` (P, C_g) and ``reflectance`` (P, C_r), and means over the
        photos at the base level and with their learned coefficients: ``total_base`` /
        ``total_learned`` (the corrective level's objective), ``photometric_base`` /
        ``photometric_learned`` (skin-weighted, optimised) and
        ``photometric_face_base`` / ``photometric_face_learned`` (unweighted over the rendered face).
    """
    if fitter.space is not None:
        raise InputError("learning starts from free-form correctives: give a fitter without a space")
    settings = settings or LearnSettings()
    report = progress or (lambda phase, done, total: None)
    m = fitter.model
    device, dtype = m.mean_shape.device, m.mean_shape.dtype
    count = targets.crops.shape[0]
    if count < 2:
        raise InputError("learning a corrective space needs at least 2 fitted photos")
    trust = np.ones(count) if trust is None else np.asarray(trust, np.float64)
    chunks = [list(range(i, min(i + settings.batch_size, count))) for i in range(0, count, settings.batch_size)]
    support = fitter.support_index

    # 1. free-form correctives of every photo
    geometry, reflectance = [], []
    for done, index in enumerate(chunks):
        result = fitter.fit(_rows(targets, index), {n: parameters[n][index] for n in BASE_PARAMETERS}, trust[index])
        geometry.append(torch.as_tensor(result.geometry, dtype=dtype, device=device)[:, support].flatten(1))
        reflectance.append(torch.as_tensor(result.reflectance, dtype=dtype, device=device)[:, support].flatten(1))
        report("free-form correctives", done + 1, len(chunks))
    # 2. initial bases
    coefficients_g, basis_g = leading_modes(torch.cat(geometry), settings.geometry_modes)
    coefficients_r, basis_r = leading_modes(torch.cat(reflectance), settings.reflectance_modes)
    # 3. joint refinement
    variables = {"basis_g": basis_g, "basis_r": basis_r, "coefficients_g": coefficients_g,
                 "coefficients_r": coefficients_r}
    variables = {n: t.detach().clone().requires_grad_(True) for n, t in variables.items()}
    if settings.steps > 0:
        batches = []
        with torch.no_grad():
            for index in chunks:
                p = {n: torch.as_tensor(parameters[n][index], dtype=dtype, device=device) for n in BASE_PARAMETERS}
                batches.append(fitter.prepare(p, _rows(targets, index).to(device=device, dtype=dtype),
                                              torch.as_tensor(trust[index], dtype=dtype, device=device)))
        optimizer = Adam([
            {"params": [variables["basis_g"], variables["basis_r"]], "lr": settings.basis_step},
            {"params": [variables["coefficients_g"], variables["coefficients_r"]], "lr": settings.coefficient_step}])
        schedule = LambdaSchedule(
            optimizer,
            lambda i: 0.05 + 0.95 * 0.5 * (1.0 + math.cos(math.pi * min(i, settings.steps) / settings.steps)))
        order = np.random.default_rng(settings.seed)
        sequence: list[int] = []
        for step in range(settings.steps):
            if not sequence:
                sequence = list(order.permutation(len(chunks)))
            k = sequence.pop()
            rows = torch.as_tensor(chunks[k], dtype=torch.int64, device=device)
            b = rows.numel()
            g = fitter.on_mesh((variables["coefficients_g"][rows] @ variables["basis_g"]).reshape(b, -1, 3))
            r = fitter.on_mesh((variables["coefficients_r"][rows] @ variables["basis_r"]).reshape(b, -1, 3))
            total = fitter.terms(batches[k], g, r)["total"]
            optimizer.zero_grad(set_to_none=True)
            torch.where(torch.isfinite(total), total, torch.zeros_like(total)).mean().backward()
            optimizer.step()
            schedule.step()
            report("joint refinement", step + 1, settings.steps)
    # 4. unit-RMS coefficients
    with torch.no_grad():
        if settings.steps == 0:
            batches = [fitter.prepare({n: torch.as_tensor(parameters[n][index], dtype=dtype, device=device)
                                       for n in BASE_PARAMETERS},
                                      _rows(targets, index).to(device=device, dtype=dtype),
                                      torch.as_tensor(trust[index], dtype=dtype, device=device)) for index in chunks]
        before, after = [], []
        for batch, index in zip(batches, chunks):
            rows = torch.as_tensor(index, dtype=torch.int64, device=device)
            b = rows.numel()
            g = fitter.on_mesh((variables["coefficients_g"][rows] @ variables["basis_g"]).reshape(b, -1, 3))
            r = fitter.on_mesh((variables["coefficients_r"][rows] @ variables["basis_r"]).reshape(b, -1, 3))
            before.append(fitter.terms(batch, torch.zeros_like(g), torch.zeros_like(r)))
            after.append(fitter.terms(batch, g, r))
        stats = {f"{name}_{label}": float(torch.cat([t[name] for t in terms]).mean())
                 for name in ("total", "photometric", "photometric_face") for label, terms in (("base", before),
                                                                                       ("learned", after))}
        out = {}
        for kind in ("g", "r"):
            coefficients, basis = variables[f"coefficients_{kind}"], variables[f"basis_{kind}"]
            scale = coefficients.pow(2).mean(dim=0).sqrt().clamp_min(1e-8)
            full = torch.zeros(basis.shape[0], m.n_vertices, 3, dtype=dtype, device=device)
            full[:, support] = (basis * scale[:, None]).reshape(basis.shape[0], -1, 3)
            out[kind] = (full.cpu().numpy().astype(np.float32), (coefficients / scale).cpu().numpy())
    space = CorrectiveSpace(out["g"][0], out["r"][0], photos=count, description=description)
    return space, {"geometry": out["g"][1], "reflectance": out["r"][1]}, stats
