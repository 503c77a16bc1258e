"""Adam and a multiplicative step-size schedule for the fits, without ``torch.optim``'s start-up cost.

Every ``torch.optim.Optimizer`` imports ``torch._dynamo`` the first time one is built
(``add_param_group`` and ``zero_grad`` are wrapped by ``torch._disable_dynamo``): about 1.5 s of
a one-photo ``facerecon fit`` on a 2-core CPU, for an optimiser whose update is six tensor
operations. :class:`Adam` is that update written out, operation for operation as
``torch.optim.Adam``'s default (single-tensor, no weight decay, no AMSGrad) step does it, so fits
are bit-for-bit those of ``torch.optim.Adam`` on the CPU (``tests/test_fit.py`` compares the
two); :class:`LambdaSchedule` is ``torch.optim.lr_scheduler.LambdaLR``'s arithmetic.

The state layout is ``torch.optim``'s: ``optimizer.state[tensor]`` holds ``exp_avg`` and
``exp_avg_sq`` (the fitter zeroes rows of them when it restarts a diverged face) and
``optimizer.param_groups`` is a list of dicts with ``params`` and ``lr``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch


class Adam:
    """Adam (Kingma & Ba) over parameter groups ``[{"params": [tensor, ...], "lr": float}, ...]``.

    Args:
        groups: parameter groups, each with its own step size ``lr``.
        betas: decay rates of the first and second moment averages.
        eps: added to the second moment's root.
    """

    def __init__(self, groups: Iterable[dict], betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8):
        self.param_groups = [{**group, "params": list(group["params"]), "lr": group["lr"]} for group in groups]
        self.betas = betas
        self.eps = eps
        self.state: dict[torch.Tensor, dict] = {}

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Forget the parameters' gradients (set them to None, or zero them in place)."""
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                if set_to_none:
                    p.grad = None
                else:
                    p.grad.detach_().zero_()

    @torch.no_grad()
    def step(self) -> None:
        """One Adam update of every parameter that has a gradient."""
        beta1, beta2 = self.betas
        for group in self.param_groups:
            lr = group["lr"]
            for p in group["params"]:
                grad = p.grad
                if grad is None:
                    continue
                state = self.state.get(p)
                if state is None:
                    state = self.state[p] = {"step": 0.0,
                                             "exp_avg": torch.zeros_like(p, memory_format=torch.preserve_format),
                                             "exp_avg_sq": torch.zeros_like(p, memory_format=torch.preserve_format)}
                state["step"] += 1.0
                step = state["step"]
                exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
                exp_avg.lerp_(grad, 1 - beta1)
                exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
                bias_correction1 = 1 - beta1 ** step
                bias_correction2 = 1 - beta2 ** step
                step_size = lr / bias_correction1
                bias_correction2_sqrt = bias_correction2 ** 0.5
                denom = (exp_avg_sq.sqrt() / bias_correction2_sqrt).add_(self.eps)
                p.addcdiv_(exp_avg, denom, value=-step_size)


class LambdaSchedule:
    """Step size of each group = its initial ``lr`` times ``factor(i)`` after ``i`` calls of :meth:`step`
    (``torch.optim.lr_scheduler.LambdaLR``: a change made to a group's ``lr`` between two calls lasts
    until the next call)."""

    def __init__(self, optimizer: Adam, factor: Callable[[int], float]):
        self.optimizer = optimizer
        self.factor = factor
        self.base_lrs = [group["lr"] for group in optimizer.param_groups]
        self.last_epoch = 0
        self._apply()

    def step(self) -> None:
        self.last_epoch += 1
        self._apply()

    def _apply(self) -> None:
        for group, base in zip(self.optimizer.param_groups, self.base_lrs, strict=True):
            group["lr"] = base * self.factor(self.last_epoch)
