"""Multi-GPU / multi-node training with PyTorch's own launcher (``torchrun``).

``torchrun --nproc_per_node N -m facerecon train --config cfg`` starts N processes with
``WORLD_SIZE``, ``RANK``, ``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT`` in their
environment. :func:`setup` turns that into a process group (NCCL on CUDA, Gloo on CPU) and
a device per process (``cuda:LOCAL_RANK``); the trainer wraps its network in
:class:`~torch.nn.parallel.DistributedDataParallel`, takes its share of every global batch
(:func:`shard`), and leaves files to rank 0. Without ``WORLD_SIZE > 1`` everything here is a
no-op and training runs in one process as before.
"""

from __future__ import annotations

from facerecon.errors import InputError
from facerecon.stages.fit import pick_device

import datetime
import os
from dataclasses import dataclass, field
from typing import Any, Callable, TypeVar

import numpy as np
import torch
import torch.distributed as dist

T = TypeVar("T")


class RemoteError(ValueError):
    """Rank 0 failed in work the other ranks were waiting for; the message is rank 0's."""


@dataclass
class DistContext:
    """Where this process stands: ``world_size`` processes, this one ``rank`` (``local_rank``
    on its node), computing on ``device``."""

    world_size: int = 1
    rank: int = 0
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    backend: str = ""

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def env_ranks() -> tuple[int, int, int]:
    """(world size, rank, local rank) from the launcher's environment; (1, 0, 0) without one."""
    def number(name: str, default: int) -> int:
        try:
            return int(os.environ.get(name, default))
        except ValueError:
            raise InputError(f"environment variable {name} must be an integer, got {os.environ[name]!r}") from None

    return number("WORLD_SIZE", 1), number("RANK", 0), number("LOCAL_RANK", 0)


def is_main_process() -> bool:
    """True unless this process is a non-zero rank of a launcher-started group."""
    return env_ranks()[1] == 0


def _device(request: str, local_rank: int) -> torch.device:
    if request == "auto":
        kind = "cuda" if torch.cuda.is_available() else "cpu"
    else:
        try:
            kind = torch.device(request).type
        except RuntimeError:
            raise InputError(f"unknown device {request!r}: use auto, cpu, cuda or cuda:N") from None
    if kind == "cpu":
        return torch.device("cpu")
    if kind != "cuda":
        raise InputError(f"distributed training runs on cpu or cuda, not {kind!r}")
    if not torch.cuda.is_available():
        raise InputError("--device cuda requested but no CUDA GPU is available")
    if local_rank >= torch.cuda.device_count():
        raise InputError(f"LOCAL_RANK {local_rank} but only {torch.cuda.device_count()} CUDA devices on this node "
                         "(lower --nproc_per_node)")
    return torch.device("cuda", local_rank)  # one GPU per process, by local rank


def setup(device_request: str = "auto", backend: str = "auto", timeout_minutes: float = 60.0) -> DistContext:
    """Join the launcher's process group when ``WORLD_SIZE > 1``, else a one-process context.

    ``device_request`` is the CLI's ``--device`` (auto, cpu, cuda, cuda:N); under a launcher a
    CUDA request means ``cuda:LOCAL_RANK``. ``backend``: auto (nccl on CUDA, gloo on CPU),
    nccl or gloo.
    """
    world, rank, local_rank = env_ranks()
    if world <= 1:
        return DistContext(device=pick_device(device_request))
    device = _device(device_request, local_rank)
    if backend == "auto":
        backend = "nccl" if device.type == "cuda" else "gloo"
    if backend == "nccl" and device.type != "cuda":
        raise InputError("distributed.backend = 'nccl' needs CUDA devices (use 'gloo' on CPU)")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group(backend, timeout=datetime.timedelta(minutes=timeout_minutes))
    return DistContext(world, rank, local_rank, device, backend)


def teardown(ctx: DistContext) -> None:
    if ctx.enabled and dist.is_initialized():
        dist.destroy_process_group()


def barrier(ctx: DistContext) -> None:
    if not ctx.enabled:
        return
    if ctx.backend == "nccl":
        dist.barrier(device_ids=[ctx.device.index])  # this process's GPU, not a guessed one
    else:
        dist.barrier()


def on_main(ctx: DistContext, work: Callable[[], T]) -> T:
    """Run ``work`` on rank 0 only; the other ranks wait and receive its (picklable) result.

    An exception on rank 0 is re-raised there and as :class:`RemoteError` on the others, so no
    rank is left waiting.
    """
    if not ctx.enabled:
        return work()
    payload: list[Any] = [None]
    failure: BaseException | None = None
    if ctx.is_main:
        try:
            payload = [("ok", work())]
        except Exception as exc:  # noqa: BLE001 - passed on to the other ranks, then re-raised
            failure = exc
            payload = [("error", f"{type(exc).__name__}: {exc}")]
    dist.broadcast_object_list(payload, src=0)
    if failure is not None:
        raise failure
    status, value = payload[0]
    if status == "error":
        raise RemoteError(f"rank 0 failed: {value}")
    return value


def any_rank(ctx: DistContext, flag: bool) -> bool:
    """True when ``flag`` is true on at least one rank (all ranks get the same answer)."""
    if not ctx.enabled:
        return flag
    value = torch.tensor([1.0 if flag else 0.0], device=ctx.device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item() > 0)


def all_ranks(ctx: DistContext, flag: bool) -> bool:
    """True when ``flag`` is true on every rank."""
    return not any_rank(ctx, not flag)


def sum_across(ctx: DistContext, values: torch.Tensor) -> torch.Tensor:
    """Element-wise sum of a (K,) tensor over ranks (a copy; the input is left alone)."""
    values = values.detach().clone()
    if ctx.enabled:
        dist.all_reduce(values, op=dist.ReduceOp.SUM)
    return values


def shard(units: np.ndarray, ctx: DistContext) -> np.ndarray:
    """This rank's share of a global batch of ``units`` (U, ...) (DistributedSampler-style
    strided split: rank r gets units r, r + world, ...). U must be a multiple of the world size."""
    if not ctx.enabled:
        return units
    if len(units) % ctx.world_size:
        raise InputError(f"a batch of {len(units)} cannot be split evenly over {ctx.world_size} processes; make "
                         "optim.batch_size (in views per identity when grouped) a multiple of the process count")
    return units[ctx.rank::ctx.world_size]


def wrap(module: torch.nn.Module, ctx: DistContext, find_unused: bool = False) -> torch.nn.Module:
    """``module`` in DistributedDataParallel when distributed (parameters start from rank 0's).
    ``find_unused``: some parameters get no gradient in some steps (paper 004's pre-training)."""
    if not ctx.enabled:
        return module
    from torch.nn.parallel import DistributedDataParallel

    ids = [ctx.device.index] if ctx.device.type == "cuda" else None
    return DistributedDataParallel(module, device_ids=ids, output_device=ids[0] if ids else None,
                                   find_unused_parameters=find_unused)
