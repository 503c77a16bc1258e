"""L-BFGS over a batch of independent problems: one history and one line search per row.

``torch.optim.LBFGS`` treats its parameters as one vector: fitting B faces with it minimises
the *sum* of their losses, so every face shares the curvature history and the line search's
step length, and a face's result depends on which faces share its batch (a badly detected
face in the batch changes the others' fits). Here each row keeps its own history, direction
and step, and the rows only share the evaluations (one batched call per line-search trial), so
a face's result does not depend on its batch mates.
"""

from __future__ import annotations

from collections.abc import Callable

import torch


def batched_lbfgs(evaluate: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]], x0: torch.Tensor,
                  max_evaluations: int, history: int = 30, tolerance_grad: float = 1e-9,
                  tolerance_change: float = 1e-7, max_backtracks: int = 12, armijo: float = 1e-4
                  ) -> tuple[torch.Tensor, int]:
    """Minimise B independent smooth functions f_b(x_b) with L-BFGS and backtracking line search.

    Args:
        evaluate: x (B, D) -> (values (B,), gradients (B, D)), detached; row b of the gradient
            must depend on row b of x only. Non-finite values count as "step too long".
        x0: (B, D) starting points.
        max_evaluations: evaluations allowed per row (the first one included); a row is
            counted only in the calls where it is being evaluated, so the rows' budgets do
            not depend on each other.
        history: curvature pairs kept per row.
        tolerance_grad: a row stops when its largest gradient component is below this.
        tolerance_change: a row stops when an accepted step lowers its value by less than
            this fraction of the value (relative, so every row converges on its own scale).
        max_backtracks: step halvings per line search; a row whose search fails twice in a
            row stops where it is.
        armijo: sufficient-decrease constant.

    Returns:
        (x (B, D) the last accepted points, the most evaluations any row used).
    """
    x = x0.detach().clone()
    b, d = x.shape
    f, g = evaluate(x)
    used = torch.ones(b, dtype=torch.int64, device=x.device)  # evaluations per row
    active = torch.isfinite(f) & torch.isfinite(g).all(dim=1) & (g.abs().amax(dim=1) > tolerance_grad)
    s_hist = x.new_zeros(history, b, d)
    y_hist = x.new_zeros(history, b, d)
    rho = x.new_zeros(history, b)
    gamma = x.new_zeros(b)  # scale of the initial inverse Hessian; 0 = no curvature pair yet
    failures = torch.zeros(b, dtype=torch.int64, device=x.device)
    newest, pairs = -1, 0
    active = active & (used < max_evaluations)
    while bool(active.any()):
        # two-loop recursion, newest pair first; empty or rejected pairs have rho = 0
        q = g.clone()
        alphas = []
        for k in range(min(pairs, history)):
            i = (newest - k) % history
            alpha = rho[i] * (s_hist[i] * q).sum(dim=1)
            q -= alpha[:, None] * y_hist[i]
            alphas.append((i, alpha))
        has_curvature = gamma > 0
        r = q * torch.where(has_curvature, gamma, torch.ones_like(gamma))[:, None]
        for i, alpha in reversed(alphas):
            beta = rho[i] * (y_hist[i] * r).sum(dim=1)
            r += s_hist[i] * (alpha - beta)[:, None]
        direction = -r
        slope = (g * direction).sum(dim=1)
        not_descent = ~(slope < 0)
        if bool((not_descent & active).any()):  # a stale history: restart those rows on the gradient
            direction = torch.where(not_descent[:, None], -g, direction)
            slope = torch.where(not_descent, -(g * g).sum(dim=1), slope)
            rho[:, not_descent] = 0.0
            gamma = torch.where(not_descent, torch.zeros_like(gamma), gamma)
            has_curvature = has_curvature & ~not_descent
        # without curvature information the first step is kept short, as torch's L-BFGS does
        step = torch.where(has_curvature, torch.ones_like(f),
                           (1.0 / g.abs().sum(dim=1).clamp_min(1e-12)).clamp(max=1.0))
        pending = active.clone()
        accepted = torch.zeros_like(active)
        new_x, new_f, new_g = x, f, g
        for _ in range(max_backtracks + 1):
            pending = pending & (used < max_evaluations)
            if not bool(pending.any()):
                break
            trial = torch.where(pending[:, None], x + step[:, None] * direction, new_x)
            trial_f, trial_g = evaluate(trial)
            used = used + pending.to(used.dtype)
            ok = pending & torch.isfinite(trial_f) & torch.isfinite(trial_g).all(dim=1) & (
                trial_f <= f + armijo * step * slope)
            new_x = torch.where(ok[:, None], trial, new_x)
            new_f = torch.where(ok, trial_f, new_f)
            new_g = torch.where(ok[:, None], trial_g, new_g)
            accepted = accepted | ok
            pending = pending & ~ok
            step = torch.where(pending, step * 0.5, step)
        failed_search = active & ~accepted
        failures = torch.where(failed_search, failures + 1, torch.zeros_like(failures))
        # a failed search forgets the row's history (the model of the curvature was wrong)
        rho[:, failed_search] = 0.0
        gamma = torch.where(failed_search, torch.zeros_like(gamma), gamma)
        s = new_x - x
        y = new_g - g
        sy = (s * y).sum(dim=1)
        valid = accepted & (sy > 1e-10)
        newest, pairs = (newest + 1) % history, pairs + 1
        s_hist[newest] = torch.where(valid[:, None], s, torch.zeros_like(s))
        y_hist[newest] = torch.where(valid[:, None], y, torch.zeros_like(y))
        rho[newest] = torch.where(valid, 1.0 / sy.clamp_min(1e-10), torch.zeros_like(sy))
        gamma = torch.where(valid, sy / (y * y).sum(dim=1).clamp_min(1e-20), gamma)
        change = (f - new_f).abs()
        x, f, g = new_x, new_f, new_g
        active = active & (failures < 2) & ~(accepted & (change <= tolerance_change * f.abs()))
        active = active & (g.abs().amax(dim=1) > tolerance_grad) & (used < max_evaluations)
    return x, int(used.max())
