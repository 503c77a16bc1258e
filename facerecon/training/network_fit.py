"""Method ``network``: parameters predicted by a trained R-Net checkpoint."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import torch

from facerecon.errors import InputError
from facerecon.facemodel.corrective_space import CorrectiveSpace
from facerecon.facemodel.tensors import FaceModelTensors
from facerecon.fitting.optimize import FaceTargets
from facerecon.networks.rnet import rnet_from_checkpoint


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
        self.network = rnet_from_checkpoint(state, tensors)
        self.network.eval()
        self.digest = hashlib.sha256(Path(checkpoint).read_bytes()).hexdigest()[:16]

    @property
    def has_correctives(self) -> bool:
        """True when the network predicts paper 004's corrective coefficients (a final level)."""
        return self.network.correctives is not None

    def corrective_space(self) -> CorrectiveSpace:
        """The network's corrective space: geometry (C_g, N, 3), reflectance (C_r, N, 3)."""
        geometry, reflectance = self.network.correctives.space_arrays()
        return CorrectiveSpace(geometry, reflectance, description="R-Net checkpoint")

    @torch.no_grad()
    def __call__(self, targets: FaceTargets) -> dict[str, torch.Tensor]:
        """Parameters (B, ...): the base level's, and with :attr:`has_correctives` also
        ``corrective_geometry`` (B, C_g) and ``corrective_reflectance`` (B, C_r)."""
        return self.network(targets.crops.permute(0, 3, 1, 2))


def corrective_start(prediction: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
    """A network's corrective coefficients as :meth:`CorrectiveFitter.fit`'s ``start``
    (``geometry`` (B, C_g), ``reflectance`` (B, C_r))."""
    return {"geometry": prediction["corrective_geometry"].detach().cpu().numpy(),
            "reflectance": prediction["corrective_reflectance"].detach().cpu().numpy()}
