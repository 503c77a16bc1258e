"""Method ``network``: parameters predicted by a trained R-Net checkpoint."""

from __future__ import annotations

from pathlib import Path

import torch

from facerecon.errors import InputError
from facerecon.facemodel.tensors import FaceModelTensors
from facerecon.fitting.optimize import FaceTargets
from facerecon.networks.rnet import RNet


class NetworkPredictor:
    """Loads a ``facerecon train`` checkpoint; ``predictor(targets)`` -> parameter dict (B, ...)."""

    def __init__(self, checkpoint: str | Path, tensors: FaceModelTensors, model_id: str):
        try:
            state = torch.load(Path(checkpoint), map_location=tensors.mean_shape.device, weights_only=False)
        except Exception as exc:  # noqa: BLE001 - torch raises many kinds for a bad file
            raise InputError(f"cannot read checkpoint {checkpoint}: {exc}") from None
        if not isinstance(state, dict) or "network" not in state or "architecture" not in state:
            raise InputError(f"{checkpoint} is not a facerecon training checkpoint")
        if state.get("model_id") != model_id:
            raise InputError(f"checkpoint {checkpoint} was trained with face model {state.get('model_id')!r}; "
                             f"this run uses {model_id!r} (pass --face-model)")
        self.network = RNet(tensors, state["architecture"]).to(tensors.mean_shape.device)
        self.network.load_state_dict(state["network"])
        self.network.eval()

    @torch.no_grad()
    def __call__(self, targets: FaceTargets) -> dict[str, torch.Tensor]:
        return self.network(targets.crops.permute(0, 3, 1, 2))
