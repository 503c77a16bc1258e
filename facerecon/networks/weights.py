"""Reading user-supplied network weights (PyTorch state dicts) with one-line errors."""

from __future__ import annotations

from pathlib import Path

import torch


def read_state_dict(path: str | Path, what: str, kind: str) -> dict[str, torch.Tensor]:
    """The state dict in ``path`` (a plain one, or under ``state_dict``; ``module.`` prefixes of
    DataParallel checkpoints removed).

    Args:
        what: what the file is for, for the messages ("backbone weights").
        kind: the expected network with its article, for the messages ("a torchvision ResNet").

    Raises:
        ValueError: unreadable file, or not a state dict of a network with a ``conv1``.
    """
    try:
        state = torch.load(Path(path), map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - torch raises many kinds for a bad file
        raise ValueError(f"cannot read {what} {path}: {exc}") from None
    if isinstance(state, dict) and "state_dict" in state:
        state = state["state_dict"]
    if not isinstance(state, dict) or not any(k.removeprefix("module.") == "conv1.weight" for k in state):
        raise ValueError(f"{path} is not {kind} state dict")
    return {k.removeprefix("module."): v for k, v in state.items()}
