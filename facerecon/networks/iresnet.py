"""IR-ResNet face-recognition backbone with the parameter names of the common ArcFace
``backbone.pth`` checkpoints (insightface's arcface_torch ``iresnet50`` layout), so weights a
user owns load with ``load_state_dict`` unchanged.

Input: (B, 3, 112, 112) RGB in [-1, 1] (``(pixel / 255 - 0.5) / 0.5``), aligned to the
ArcFace 5-point template (:data:`ARCFACE_TEMPLATE_112`). Output: (B, 512) embedding.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from facerecon.networks.weights import read_state_dict

#: Eye centres, nose tip and mouth corners of the 112x112 ArcFace alignment template (pixels).
ARCFACE_TEMPLATE_112 = torch.tensor([
    [38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366], [41.5493, 92.3655], [70.7299, 92.2041],
])

LAYERS = {"r18": (2, 2, 2, 2), "r34": (3, 4, 6, 3), "r50": (3, 4, 14, 3), "r100": (3, 13, 30, 3)}


class IRBlock(nn.Module):
    """Pre-activation residual block: BN, 3x3 conv, BN, PReLU, 3x3 conv (stride), BN, + shortcut."""

    def __init__(self, in_channels: int, channels: int, stride: int):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_channels, eps=1e-5)
        self.conv1 = nn.Conv2d(in_channels, channels, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels, eps=1e-5)
        self.prelu = nn.PReLU(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, stride, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(channels, eps=1e-5)
        self.downsample = None
        if stride != 1 or in_channels != channels:
            self.downsample = nn.Sequential(nn.Conv2d(in_channels, channels, 1, stride, bias=False),
                                            nn.BatchNorm2d(channels, eps=1e-5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.bn3(self.conv2(self.prelu(self.bn2(self.conv1(self.bn1(x))))))
        return out + (x if self.downsample is None else self.downsample(x))


class IResNet(nn.Module):
    """IR-ResNet for 112x112 faces; ``depth`` one of r18, r34, r50, r100."""

    def __init__(self, depth: str = "r50", embedding_size: int = 512):
        super().__init__()
        blocks = LAYERS[depth]
        self.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(64, eps=1e-5)
        self.prelu = nn.PReLU(64)
        channels, layers = 64, []
        for count, width in zip(blocks, (64, 128, 256, 512)):
            stage = [IRBlock(channels, width, 2)] + [IRBlock(width, width, 1) for _ in range(count - 1)]
            layers.append(nn.Sequential(*stage))
            channels = width
        self.layer1, self.layer2, self.layer3, self.layer4 = layers
        self.bn2 = nn.BatchNorm2d(512, eps=1e-5)
        self.dropout = nn.Dropout(p=0.0)
        self.fc = nn.Linear(512 * 7 * 7, embedding_size)
        self.features = nn.BatchNorm1d(embedding_size, eps=1e-5)
        nn.init.constant_(self.features.weight, 1.0)
        self.features.weight.requires_grad = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.prelu(self.bn1(self.conv1(x)))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        x = self.dropout(torch.flatten(self.bn2(x), 1))
        return self.features(self.fc(x))


def load_iresnet(path: str | Path, device="cpu") -> IResNet:
    """An evaluation-mode IResNet with weights from ``path`` (depth guessed from the keys).

    Raises:
        ValueError: the file is not an IR-ResNet state dict (one-line reason).
    """
    state = read_state_dict(path, "face-recognition weights", "an IR-ResNet (ArcFace backbone.pth)")
    counts = tuple(len({k.split(".")[1] for k in state if k.startswith(f"layer{i}.")}) for i in range(1, 5))
    depth = next((name for name, blocks in LAYERS.items() if blocks == counts), None)
    if depth is None:
        raise ValueError(f"{path}: unsupported IR-ResNet depth (blocks per stage {counts})")
    network = IResNet(depth, embedding_size=state["fc.weight"].shape[0])
    missing, unexpected = network.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.endswith("num_batches_tracked")]
    if missing or unexpected:
        raise ValueError(f"{path}: weights do not match IR-ResNet-{depth[1:]} "
                         f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
    return network.eval().to(device)
