"""Reader of dlib's binary serialisation of DNN networks (``dlib::serialize(file) << net``).

Written from the format as dlib's headers describe it (``dlib/serialize.h``,
``dlib/float_details.h``, ``dlib/cuda/tensor.h``, ``dlib/dnn/core.h``, ``layers.h``,
``input.h``, ``loss.h``); dlib itself is not needed at run time.

The encoding, in short:

* integers: one control byte (low 4 bits: how many bytes follow, bit 0x80: negative), then
  the magnitude in that many little-endian bytes;
* floating point numbers (``float``, ``double``): two integers, a mantissa and a power of two;
* ``bool``: the character ``'0'`` or ``'1'``; strings: an integer length and the bytes;
* tensors: an integer version (2), four integer dimensions (samples, channels, rows,
  columns) and the values as raw little-endian float32; alias tensors (views of a layer's
  ``params``): version 1 and the four dimensions, no values.

A network ``loss<layer_1<layer_2<... <input>>>>`` is written outside in: the loss layer's
version and details, then a version number for each wrapping layer (2 for a computational
layer, 1 for a tag or skip layer, 3 for the layer next to the input), then the input layer,
then, from the input outwards, each computational layer's details (a name such as
``con_4`` and its fields) followed by that layer's cached state (three bools and three
tensors; the layer next to the input adds an integer). Tag and skip layers write nothing
after their version, so the reader returns the computational layers in input-to-output
order and the number of tag/skip wrappers; the graph (which ``add_prev`` adds which tag) is
the network definition's business (:mod:`facerecon.networks.dlib_resnet`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np


class DlibFormatError(ValueError):
    """The file is not a dlib network of the kind expected (one-line reason with the byte offset)."""


@dataclass
class DlibLayer:
    """One computational layer: ``kind`` (``con``, ``affine``, ``relu``, ``max_pool``,
    ``avg_pool``, ``add_prev``, ``fc``), its arrays and its integer settings."""

    kind: str
    version: str
    arrays: dict[str, np.ndarray] = field(default_factory=dict)
    settings: dict[str, float] = field(default_factory=dict)


@dataclass
class DlibNetwork:
    """A parsed network: input layer settings, layers input to output, loss settings."""

    input_kind: str
    input_settings: dict[str, float]
    layers: list[DlibLayer]
    loss_kind: str
    loss_settings: dict[str, float]
    wrapper_versions: list[int]


class _Reader:
    """Sequential reader over the bytes of a file, raising :class:`DlibFormatError` with offsets."""

    def __init__(self, data: bytes, name: str):
        self.data = data
        self.pos = 0
        self.name = name

    def fail(self, message: str) -> DlibFormatError:
        return DlibFormatError(f"{self.name}: {message} at byte {self.pos} of {len(self.data)} "
                               "(not a complete dlib network file)")

    def take(self, count: int, what: str) -> bytes:
        if count < 0 or self.pos + count > len(self.data):
            raise self.fail(f"file ends while reading {what}")
        chunk = self.data[self.pos:self.pos + count]
        self.pos += count
        return chunk

    def integer(self, what: str = "an integer") -> int:
        control = self.take(1, what)[0]
        size = control & 0x0F
        if size == 0 or size > 8 or control & 0x70:
            self.pos -= 1
            raise self.fail(f"bad integer control byte 0x{control:02x} while reading {what}")
        value = int.from_bytes(self.take(size, what), "little")
        return -value if control & 0x80 else value

    def real(self, what: str = "a number") -> float:
        mantissa = self.integer(what)
        exponent = self.integer(what)
        if exponent >= 32000:  # dlib's markers for inf, -inf, nan
            return {32000: float("inf"), 32001: float("-inf")}.get(exponent, float("nan"))
        return float(np.ldexp(float(mantissa), exponent))

    def boolean(self, what: str = "a bool") -> bool:
        char = self.take(1, what)
        if char not in (b"0", b"1"):
            self.pos -= 1
            raise self.fail(f"expected '0' or '1' for {what}, found {char!r}")
        return char == b"1"

    def string(self, what: str = "a name") -> str:
        length = self.integer(what)
        if length > 1000:
            raise self.fail(f"implausible string length {length} while reading {what}")
        raw = self.take(length, what)
        try:
            return raw.decode("ascii")
        except UnicodeDecodeError:
            raise self.fail(f"non-text bytes while reading {what}") from None

    def peek_string(self) -> str | None:
        """The string at the current position if one plausibly starts there, else None."""
        start = self.pos
        try:
            text = self.string()
        except DlibFormatError:
            text = None
        self.pos = start
        return text if text and text.replace("_", "").isalnum() else None

    def tensor(self, what: str) -> np.ndarray:
        version = self.integer(what)
        if version != 2:
            raise self.fail(f"tensor version {version} (expected 2) in {what}")
        shape = tuple(self.integer(what) for _ in range(4))
        if min(shape) < 0:
            raise self.fail(f"negative tensor size {shape} in {what}")
        count = int(np.prod(shape, dtype=np.int64))
        values = np.frombuffer(self.take(4 * count, what), dtype="<f4")
        return values.reshape(shape).astype(np.float32)

    def alias(self, what: str) -> tuple[int, ...]:
        version = self.integer(what)
        if version != 1:
            raise self.fail(f"alias tensor version {version} (expected 1) in {what}")
        return tuple(self.integer(what) for _ in range(4))


def _learning_rates(r: _Reader, what: str) -> None:
    for _ in range(4):  # learning-rate and weight-decay multipliers (training only)
        r.real(what)


def _read_con(r: _Reader, version: str) -> DlibLayer:
    params = r.tensor("con params")
    filters = r.integer("con num_filters")
    rows, cols = r.integer("con rows"), r.integer("con cols")
    stride_y, stride_x = r.integer("con stride"), r.integer("con stride")
    pad_y, pad_x = r.integer("con padding"), r.integer("con padding")
    weight_shape = r.alias("con filters")
    bias_shape = r.alias("con biases")
    _learning_rates(r, "con")
    use_bias = r.boolean("con use_bias") if version in ("con_5", "con_6") else True
    if version == "con_6" and r.boolean("con use_relu"):
        raise r.fail("convolution with a fused relu is not supported")
    flat = params.reshape(-1)
    n_weight = int(np.prod(weight_shape))
    if weight_shape[0] != filters or weight_shape[2:] != (rows, cols) or flat.size < n_weight:
        raise r.fail(f"inconsistent convolution sizes {weight_shape} for {filters} {rows}x{cols} filters")
    arrays = {"weight": flat[:n_weight].reshape(weight_shape)}
    if use_bias:
        arrays["bias"] = flat[n_weight:n_weight + int(np.prod(bias_shape))]
    return DlibLayer("con", version, arrays, {"stride": (stride_y, stride_x), "padding": (pad_y, pad_x)})


def _read_bn_as_affine(r: _Reader, version: str) -> DlibLayer:
    params = r.tensor("bn params").reshape(-1)
    gamma_shape, _ = r.alias("bn gamma"), r.alias("bn beta")
    for name in ("means", "invstds"):
        r.tensor(f"bn {name}")
    running_mean = r.tensor("bn running_means").reshape(-1)
    running_var = r.tensor("bn running_variances").reshape(-1)
    r.integer("bn num_updates")
    r.integer("bn running_stats_window_size")
    _learning_rates(r, "bn")
    eps = r.real("bn eps")
    channels = int(np.prod(gamma_shape))
    gamma, beta = params[:channels], params[channels:2 * channels]
    scale = gamma / np.sqrt(running_var.astype(np.float64) + eps)
    shift = beta - scale * running_mean
    return DlibLayer("affine", version, {"scale": scale.astype(np.float32), "shift": shift.astype(np.float32)},
                     {"eps": eps})


def _read_affine(r: _Reader, version: str) -> DlibLayer:
    params = r.tensor("affine params").reshape(-1)
    gamma_shape, _ = r.alias("affine gamma"), r.alias("affine beta")
    r.integer("affine mode")
    if version == "affine_2" and r.boolean("affine disabled"):
        raise r.fail("disabled affine layers are not supported")
    channels = int(np.prod(gamma_shape))
    return DlibLayer("affine", version, {"scale": params[:channels], "shift": params[channels:2 * channels]})


def _read_relu(r: _Reader, version: str) -> DlibLayer:
    if version == "relu_2" and r.boolean("relu disabled"):
        raise r.fail("disabled relu layers are not supported")
    return DlibLayer("relu", version)


def _read_pool(r: _Reader, version: str) -> DlibLayer:
    kind = version.rsplit("_", 1)[0]
    rows, cols = r.integer(kind), r.integer(kind)
    stride = (r.integer(kind), r.integer(kind))
    padding = (r.integer(kind), r.integer(kind))
    return DlibLayer(kind, version, settings={"size": (rows, cols), "stride": stride, "padding": padding})


def _read_fc(r: _Reader, version: str) -> DlibLayer:
    outputs, inputs = r.integer("fc num_outputs"), r.integer("fc num_inputs")
    params = r.tensor("fc params").reshape(-1)
    weight_shape = r.alias("fc weights")
    r.alias("fc biases")
    has_bias = r.integer("fc bias mode") == 0  # dlib's FC_HAS_BIAS is 0, FC_NO_BIAS 1
    _learning_rates(r, "fc")
    if version == "fc_3":
        has_bias = r.boolean("fc use_bias") and has_bias
    n_weight = int(np.prod(weight_shape))
    if n_weight != outputs * inputs or params.size < n_weight:
        raise r.fail(f"inconsistent fully connected sizes {weight_shape} for {inputs} -> {outputs}")
    # dlib multiplies row vectors by an (inputs, outputs) matrix; store as (outputs, inputs)
    arrays = {"weight": params[:n_weight].reshape(inputs, outputs).T.copy()}
    if has_bias:
        arrays["bias"] = params[n_weight:n_weight + outputs]
    return DlibLayer("fc", version, arrays)


def _read_add_prev(r: _Reader, version: str) -> DlibLayer:
    return DlibLayer("add_prev", version)


_LAYER_READERS = {
    "con_4": _read_con, "con_5": _read_con, "con_6": _read_con,
    "bn_con2": _read_bn_as_affine, "affine_": _read_affine, "affine_2": _read_affine,
    "relu_": _read_relu, "relu_2": _read_relu,
    "max_pool_2": _read_pool, "avg_pool_2": _read_pool,
    "fc_2": _read_fc, "fc_3": _read_fc, "add_prev_": _read_add_prev,
}


def _read_input(r: _Reader) -> tuple[str, dict[str, float]]:
    kind = r.string("the input layer")
    if kind not in ("input_rgb_image_sized", "input_rgb_image"):
        raise r.fail(f"unsupported input layer {kind!r}")
    settings = {"avg_red": r.real(kind), "avg_green": r.real(kind), "avg_blue": r.real(kind)}
    if kind == "input_rgb_image_sized":
        settings["rows"], settings["cols"] = r.integer(kind), r.integer(kind)
    return kind, settings


def _read_loss(r: _Reader) -> tuple[str, dict[str, float]]:
    if r.integer("the loss layer version") != 1:
        raise r.fail("unexpected loss layer version")
    kind = r.string("the loss layer")
    if kind == "loss_metric_":
        return kind, {"margin": 0.1, "distance_threshold": 0.75}
    if kind == "loss_metric_2":
        return kind, {"margin": r.real(kind), "distance_threshold": r.real(kind)}
    raise r.fail(f"unsupported loss layer {kind!r} (expected dlib's metric-learning loss)")


def read_dlib_network(path: str | Path) -> DlibNetwork:
    """Parse a dlib metric-learning network file (``loss_metric`` over an image input).

    Returns the layers from input to output with their weights as float32 arrays
    (convolution weights (out, in, rows, cols), fully connected weights (out, in), batch
    normalisation folded into per-channel ``scale``/``shift`` with its running statistics,
    as dlib does when it loads a trained net as ``affine`` layers).

    Raises:
        DlibFormatError: unreadable, truncated or different file (one line with the offset).
    """
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise DlibFormatError(f"cannot read dlib network {path}: {exc.strerror or exc}") from None
    r = _Reader(data, str(path))
    loss_kind, loss_settings = _read_loss(r)
    versions = []
    while r.peek_string() not in ("input_rgb_image_sized", "input_rgb_image"):
        version = r.integer("a layer version")
        if version not in (1, 2, 3) or len(versions) > 10000:
            raise r.fail(f"unexpected layer version {version}")
        versions.append(version)
    if not versions or versions[-1] != 3 or any(v == 3 for v in versions[:-1]):
        raise r.fail("layer versions do not describe a network over an input layer")
    input_kind, input_settings = _read_input(r)
    layers = []
    for version in reversed(versions):
        if version == 1:  # tag or skip: nothing after its version
            continue
        name = r.string("a layer name")
        reader = _LAYER_READERS.get(name)
        if reader is None:
            raise r.fail(f"unsupported layer {name!r}")
        layers.append(reader(r, name))
        for _ in range(3):
            r.boolean("layer state")
        for what in ("x_grad", "cached_output", "params_grad" if version == 2 else "grad_final"):
            r.tensor(what)
        if version == 3:
            r.integer("sample expansion factor")
    if r.pos != len(data):
        raise r.fail("unexpected bytes after the network")
    return DlibNetwork(input_kind, input_settings, layers, loss_kind, loss_settings, versions)
