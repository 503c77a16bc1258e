"""C-Net (paper 000 sec. 5): per-coefficient confidences for aggregating single-image
reconstructions of one person.

C-Net reads two feature maps of a trained, frozen R-Net (sec. 5.2): the shallow map after the
first residual stage (it can see corruptions such as occlusion) and the globally pooled deep
features (pose, light). Three 3x3 stride-2 convolutions with 256 channels and a global pooling
turn the shallow map into a 256-vector, which is concatenated with the pooled R-Net features;
two fully-connected layers (512, then one output per aggregated coefficient) and a sigmoid give
positive confidences ``c``. The last layer starts at zero, so every confidence starts at 0.5 and
aggregation starts as plain averaging (sec. 6, C-Net training).

The identity shape coefficients are aggregated element-wise with the confidences (eq. 7):
``alpha_agg = (sum_j c_j * alpha_j) / (sum_j c_j)``. The paper aggregates identity only
("we also bypass texture"); ``aggregated = ("identity", "albedo")`` adds the albedo
coefficients as an option.

Checkpoints written by ``facerecon train`` with ``[cnet] enabled`` (kind ``"cnet"``) hold the
C-Net and the frozen R-Net, so :class:`CNetPredictor` needs nothing else.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from facerecon.facemodel.tensors import FaceModelTensors
from facerecon.networks.resnet import ARCHITECTURES
from facerecon.networks.rnet import RNet, rnet_from_checkpoint

#: Parameters C-Net may aggregate, in the order their confidences are laid out.
AGGREGATABLE = ("identity", "albedo")
#: Value of ``kind`` in a C-Net checkpoint (R-Net checkpoints have none).
CHECKPOINT_KIND = "cnet"


def aggregate_coefficients(coefficients: torch.Tensor, confidences: torch.Tensor) -> torch.Tensor:
    """Element-wise confidence-weighted aggregation, paper 000 eq. 7.

    Args:
        coefficients: (..., N, K) the N single-image coefficient vectors of each group
            (e.g. (G, N, K) for G identities of N images).
        confidences: (..., N, K) their positive confidences (C-Net output).

    Returns:
        (..., K): ``sum_j c_j * alpha_j / sum_j c_j`` per coefficient. With equal confidences
        this is the plain average over the N images.
    """
    weight = confidences.sum(dim=-2)
    # a sigmoid can underflow to exactly 0 for every image; avoid 0/0 (gives 0, the mean face)
    return (confidences * coefficients).sum(dim=-2) / weight.clamp_min(torch.finfo(weight.dtype).tiny)


def grouped_aggregate(coefficients: torch.Tensor, confidences: torch.Tensor, group_size: int) -> torch.Tensor:
    """Eq. 7 over consecutive groups of a batch, broadcast back to every member.

    Args:
        coefficients: (G * N, K) with the N images of each identity consecutive.
        confidences: (G * N, K).
        group_size: N.

    Returns:
        (G * N, K): each image's row replaced by its group's aggregate.
    """
    b, k = coefficients.shape
    groups = aggregate_coefficients(coefficients.reshape(b // group_size, group_size, k),
                                    confidences.reshape(b // group_size, group_size, k))
    return groups.repeat_interleave(group_size, dim=0)


def aggregated_sizes(tensors: FaceModelTensors, names: tuple[str, ...] | list[str]) -> dict[str, int]:
    """Confidence-vector layout: coefficient count of each aggregated parameter, in order."""
    counts = {"identity": tensors.n_identity, "albedo": tensors.n_albedo}
    return {name: counts[name] for name in names}


def concat_coefficients(params: dict[str, torch.Tensor], sizes: dict[str, int]) -> torch.Tensor:
    """(B, K) the aggregated parameters side by side, in the layout of ``sizes``."""
    return torch.cat([params[name] for name in sizes], dim=-1)


def split_coefficients(values: torch.Tensor, sizes: dict[str, int]) -> dict[str, torch.Tensor]:
    """Inverse of :func:`concat_coefficients`: (B, K) -> {name: (B, k_name)}."""
    return dict(zip(sizes, torch.split(values, list(sizes.values()), dim=-1)))


class CNet(nn.Module):
    """(first-stage map (B, C, H, W), pooled features (B, D)) -> confidences (B, K) in (0, 1)."""

    def __init__(self, stage_channels: int, pooled_dim: int, outputs: int, width: int = 256, hidden: int = 512):
        super().__init__()
        self.layout = {"stage_channels": stage_channels, "pooled_dim": pooled_dim, "outputs": outputs,
                       "width": width, "hidden": hidden}
        layers: list[nn.Module] = []
        channels = stage_channels
        for _ in range(3):
            layers += [nn.Conv2d(channels, width, 3, stride=2, padding=1), nn.ReLU(inplace=True)]
            channels = width
        self.shallow = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc1 = nn.Linear(width + pooled_dim, hidden)
        self.fc2 = nn.Linear(hidden, outputs)
        for m in self.shallow:
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                nn.init.zeros_(m.bias)
        # zero last layer: sigmoid(0) = 0.5 everywhere, i.e. eq. 7 starts as the plain average
        nn.init.zeros_(self.fc2.weight)
        nn.init.zeros_(self.fc2.bias)

    def forward(self, first_stage: torch.Tensor, pooled: torch.Tensor) -> torch.Tensor:
        shallow = torch.flatten(self.pool(self.shallow(first_stage)), 1)
        hidden = torch.relu(self.fc1(torch.cat([shallow, pooled], dim=1)))
        return torch.sigmoid(self.fc2(hidden))


def cnet_for(rnet: RNet, outputs: int) -> CNet:
    """A C-Net matching ``rnet``'s feature sizes, with ``outputs`` confidences."""
    block, _ = ARCHITECTURES[rnet.backbone.architecture]
    return CNet(64 * block.expansion, rnet.backbone.feature_dim, outputs)


def rnet_with_features(rnet: RNet, images: torch.Tensor) -> tuple[dict[str, torch.Tensor], torch.Tensor, torch.Tensor]:
    """R-Net parameters for images (B, 3, H, W) in [0, 1], and the first-stage map (B, C, h, w)
    and pooled features (B, D) of that same forward (the inputs of C-Net)."""
    params = rnet(images)
    return params, rnet.backbone.first_stage, rnet.backbone.pooled


def read_cnet_checkpoint(path: str | Path, device="cpu") -> dict:
    """The state dict of a C-Net checkpoint; ValueError with a one-line reason otherwise."""
    try:
        state = torch.load(Path(path), map_location=device, weights_only=False)
    except Exception as exc:  # noqa: BLE001 - torch raises many kinds for a bad file
        raise ValueError(f"cannot read checkpoint {path}: {exc}") from None
    if not isinstance(state, dict) or state.get("kind") != CHECKPOINT_KIND or "cnet" not in state:
        raise ValueError(f"{path} is not a C-Net checkpoint (train one with [cnet] enabled = true)")
    return state


def networks_from_checkpoint(state: dict, tensors: FaceModelTensors) -> tuple[RNet, CNet, dict[str, int]]:
    """Frozen R-Net, C-Net and the confidence layout from a C-Net checkpoint's state."""
    device = tensors.mean_shape.device
    rnet = rnet_from_checkpoint(state, tensors)
    rnet.eval().requires_grad_(False)
    layout = state["cnet_layout"]
    cnet = CNet(layout["stage_channels"], layout["pooled_dim"], layout["outputs"], layout.get("width", 256),
                layout.get("hidden", 512)).to(device)
    cnet.load_state_dict(state["cnet"])
    sizes = aggregated_sizes(tensors, layout["aggregated"])
    if sum(sizes.values()) != layout["outputs"]:
        raise ValueError(f"C-Net checkpoint outputs {layout['outputs']} confidences; the face model has "
                         f"{sum(sizes.values())} {'+'.join(sizes)} coefficients")
    return rnet, cnet, sizes


class CNetPredictor:
    """Loads a C-Net checkpoint; ``predictor(crops)`` -> (R-Net parameters (B, ...), confidences (B, K))."""

    def __init__(self, checkpoint: str | Path, tensors: FaceModelTensors, model_id: str):
        state = read_cnet_checkpoint(checkpoint, tensors.mean_shape.device)
        if state.get("model_id") != model_id:
            raise ValueError(f"checkpoint {checkpoint} was trained with face model {state.get('model_id')!r}; "
                             f"this run uses {model_id!r} (pass --face-model)")
        self.rnet, self.cnet, self.sizes = networks_from_checkpoint(state, tensors)
        self.cnet.eval()

    @property
    def aggregated(self) -> tuple[str, ...]:
        return tuple(self.sizes)

    @torch.no_grad()
    def __call__(self, crops: torch.Tensor) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """crops (B, S, S, 3) in [0, 1] -> parameters {name: (B, ...)} and confidences (B, K)."""
        params, first, pooled = rnet_with_features(self.rnet, crops.permute(0, 3, 1, 2))
        return params, self.cnet(first, pooled)
