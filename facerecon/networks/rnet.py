"""R-Net (paper 000): a ResNet regressing face-model coefficients, SH light and pose.

The final layer is sized to the face model's coefficients + 27 SH + 6 pose and starts at zero,
so an untrained network predicts the mean face, neutral, frontal, centred in the aligned crop,
under unit white light; training moves it from there. With ``correctives`` (paper 004) it also
predicts the corrective coefficients delta_g, delta_r of its corrective level
(:class:`~facerecon.networks.corrective_head.CorrectiveLevel`, heads on the pooled features).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from facerecon.facemodel.tensors import FaceModelTensors
from facerecon.fitting.camera import FLIP
from facerecon.fitting.optimize import INITIAL_LIGHT_DIRECTION, INITIAL_SHININESS
from facerecon.networks.corrective_head import CorrectiveLevel
from facerecon.networks.resnet import IMAGENET_MEAN, IMAGENET_STD, ResNet
from facerecon.render.shading import SH_CONSTANTS

#: Fitting-camera distance (mm) at which the mean face fills the aligned 224 crop like the
#: detector's alignment template.
DEFAULT_DISTANCE_MM = 1200.0
TRANSLATION_SCALE_MM = torch.tensor([50.0, 50.0, 300.0])


class RNet(nn.Module):
    """Image (B, 3, H, W) in [0, 1] -> dict of (B, ...) parameters for :class:`FaceFitter` losses.

    ``correctives``: {"geometry_modes": C_g, "reflectance_modes": C_r, "support": (S,) vertex indices
    or "support_size": S} adds paper 004's corrective level (:attr:`correctives`); the output then
    also has ``corrective_geometry`` (B, C_g) and ``corrective_reflectance`` (B, C_r), unless
    ``forward(images, final=False)`` asks for the base level only; ``forward(images, fields=True)``
    adds their per-vertex fields ``corrective_geometry_field`` and ``corrective_reflectance_field``
    (B, N, 3) (inside the forward, so DistributedDataParallel sees the bases used).

    ``specular=True`` (paper 002) adds the Blinn-Phong unknowns of ``fit --shading blinn-phong``:
    ``specular`` (B, K_spec) specular-albedo coefficients, ``light_direction`` (B, 3) towards the
    light (camera frame), ``light_color`` (B, 3) and ``log_shininess`` (B, 1); a zero final layer
    predicts the fit's starting light (mean specular albedo, white, a little above the camera,
    shininess 16).
    """

    def __init__(self, model: FaceModelTensors, architecture: str = "resnet50", correctives: dict | None = None,
                 specular: bool = False):
        super().__init__()
        self.sizes = {"identity": model.n_identity, "expression": model.n_expression, "albedo": model.n_albedo,
                      "sh": 27, "angles": 3, "translation": 3}
        if specular:  # after the base layout, so the first outputs keep their meaning
            self.sizes |= {"specular": model.n_specular, "light_direction": 3, "light_color": 3, "log_shininess": 1}
        self.blendshapes = model.expression_kind == "blendshape"
        self.backbone = ResNet(architecture, num_classes=sum(self.sizes.values()))
        nn.init.zeros_(self.backbone.fc.weight)
        nn.init.zeros_(self.backbone.fc.bias)
        centre = model.landmark_points(model.mean_shape[None])[0].mean(dim=0)
        self.register_buffer("base_translation", torch.tensor([0.0, 0.0, DEFAULT_DISTANCE_MM]) - FLIP @ centre)
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1))
        self.correctives: CorrectiveLevel | None = None
        if correctives is not None:
            support = correctives.get("support")
            if support is None:  # rebuilt for a checkpoint, whose state fills the indices
                support = torch.zeros(int(correctives["support_size"]), dtype=torch.int64)
            self.correctives = CorrectiveLevel(self.backbone.fc.in_features, model.n_vertices,
                                               torch.as_tensor(support, dtype=torch.int64),
                                               int(correctives["geometry_modes"]),
                                               int(correctives["reflectance_modes"]))

    def forward(self, images: torch.Tensor, final: bool = True, fields: bool = False) -> dict[str, torch.Tensor]:
        raw = self.backbone((images - self.mean) / self.std)
        out, start = {}, 0
        for name, size in self.sizes.items():
            out[name] = raw[:, start:start + size]
            start += size
        if self.blendshapes:  # weights in [0, 1]; zero output -> small weights
            out["expression"] = torch.sigmoid(out["expression"] - 4.0)
        sh = out["sh"].clone()
        sh[:, [0, 9, 18]] = sh[:, [0, 9, 18]] + 1.0 / SH_CONSTANTS[0]
        out["sh"] = sh
        out["translation"] = out["translation"] * TRANSLATION_SCALE_MM.to(raw) + self.base_translation
        if "light_direction" in out:
            out["light_direction"] = out["light_direction"] + torch.tensor(INITIAL_LIGHT_DIRECTION).to(raw)
            out["light_color"] = out["light_color"] + 1.0
            out["log_shininess"] = out["log_shininess"] + math.log(INITIAL_SHININESS)
        if final and self.correctives is not None:
            out.update(self.correctives(self.backbone.pooled))
            if fields:
                out["corrective_geometry_field"], out["corrective_reflectance_field"] = self.correctives.fields(out)
        return out

    @property
    def specular(self) -> bool:
        """True when the network predicts paper 002's Blinn-Phong unknowns."""
        return "specular" in self.sizes

    @property
    def first_stage(self) -> torch.Tensor | None:
        """Feature map after the first residual stage of the last forward (for C-Net)."""
        return self.backbone.first_stage


def rnet_from_checkpoint(state: dict, model: FaceModelTensors) -> RNet:
    """The R-Net of a ``facerecon train`` checkpoint (``architecture``, ``network`` and, for a
    paper-004 network, ``correctives``: its corrective layout), with its weights, on the model's device."""
    network = RNet(model, state["architecture"], correctives=state.get("correctives"),
                   specular="specular" in state.get("sizes", {}))
    network.load_state_dict(state["network"])
    return network.to(model.mean_shape.device)
