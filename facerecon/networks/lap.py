"""LAP (paper 003), networks route: the networks of secs. 3-4.2.

All image-to-vector and vector-to-image networks follow Unsup3D's encoder/decoder shape
(stride-2 4x4 convolutions down to 4x4, one 4x4 valid convolution to 1x1; transposed 4x4
convolutions back up, GroupNorm + ReLU), with a configurable ``width`` (channels of the first
level; Unsup3D and the paper: 64) and input side ``S`` of 64 or 128 px. The canonical depth and
albedo are maps on the :class:`~facerecon.aggregation.lap.CanonicalGrid` of side ``R = S``
(the paper predicts ``a_c, d_c`` at the input size), so they are rendered exactly like the
optimisation route's (``grid_vertices`` / ``grid_triangles`` / ``MeshRenderer`` with the
fitting camera).

* **Aggregation networks** ``Phi^d = (delta^d, phi^d)``, ``Phi^a = (delta^a, phi^a)``
  (sec. 4.1): :class:`AggregationEncoder` turns every photo into a code ``x_i`` (c channels,
  from multi-level features, each level a 3x3 convolution and average pooling to a vector, the
  vectors concatenated and fused by a 1x1 convolution) and channel-wise weight logits ``w_i``;
  :func:`aggregate_codes` is eq. 4 (softmax over the album, per channel); :class:`Decoder`
  turns the album code into the canonical depth (mm: a fixed template plus ``depth_range *
  tanh``) or albedo (sigmoid, in [0, 1]); their last convolutions start at zero, so an
  untrained network gives the template depth and a grey (0.5) albedo.
* ``Phi^omega`` (:class:`Encoder`, 6 outputs): head rotation (pitch, yaw, roll) within
  ``+-max_rotation`` and translation offsets within ``+-max_translation`` mm around a default
  frontal pose at the fitting camera (:mod:`facerecon.fitting.camera`); starts at that pose.
* ``Phi^l`` (:class:`Encoder`, 27 outputs): the renderer's second-order spherical-harmonics
  light, per colour channel, as an offset from a default white ambient light (the paper and
  Unsup3D use one ambient + one directional light; SH is what :class:`MeshRenderer` and the
  optimisation route's :class:`LapResult` use, and it contains ambient + directional).
* ``Phi^sigma`` (:class:`ConfidenceNetwork`): the confidence maps ``sigma, sigma'`` of eq. 3
  and of the flipped render, at ``S / 4`` cells (bilinearly upsampled by the loss).
* **Attribute-refining networks** (sec. 4.2, :class:`AttributeRefiner`, one for depth, one for
  albedo): an encoder ``varphi`` of the canonical map, an attribute encoder ``delta^t`` of the
  target photo whose last three levels (8x8, 4x4, 1x1) are injected with a learned channel-wise
  selection (:class:`AttributeInjection`), and a decoder whose skip connections are filtered by
  a sigmoid spatial attention mask (:class:`FilteredConnection`); the output is a residual on
  the canonical map (zero at initialisation), giving the personalised ``d_t, a_t``.

:class:`LapNetworks` holds them all plus the fixed buffers (template depth, face mask of the
grid, canonical landmarks, default pose and light) and is what a ``kind = "lap"`` checkpoint
stores (:func:`load_lap_networks`).
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from facerecon.aggregation.lap import CanonicalGrid, LapResult, grid_triangles, grid_vertices
from facerecon.errors import InputError
from facerecon.render.shading import SH_CONSTANTS

#: ``kind`` of a LAP checkpoint
CHECKPOINT_KIND = "lap"
IMAGE_SIZES = (64, 128)


def _groups(channels: int) -> int:
    for g in (16, 8, 4, 2):
        if channels % g == 0 and channels // g >= 2:
            return g
    return 1


def _level_channels(width: int, levels: int) -> list[int]:
    """Channels of the encoder levels at S/2, S/4, ..., 4: doubling from ``width``, at most 8x."""
    return [width * min(2 ** i, 8) for i in range(levels)]


def _levels(size: int) -> int:
    """Stride-2 levels from ``size`` down to 4x4."""
    if size not in IMAGE_SIZES:
        raise ValueError(f"LAP networks take 64 or 128 px images, not {size}")
    return int(math.log2(size // 4))


class ConvTrunk(nn.Module):
    """Unsup3D's encoder body: (B, C_in, S, S) -> feature maps at S/2, S/4, ..., 4 and a (B, C, 1, 1) top.

    Channels per level from :func:`_level_channels`; the top (a 4x4 valid convolution) has the
    last level's channels. ``norm``: GroupNorm after every convolution but the first.
    """

    def __init__(self, in_channels: int, size: int, width: int, norm: bool = True):
        super().__init__()
        levels = _levels(size)
        self.channels = _level_channels(width, levels)
        blocks = []
        previous = in_channels
        for i, ch in enumerate(self.channels):
            layers: list[nn.Module] = [nn.Conv2d(previous, ch, 4, stride=2, padding=1, bias=not norm or i == 0)]
            if norm and i > 0:
                layers.append(nn.GroupNorm(_groups(ch), ch))
            layers.append(nn.LeakyReLU(0.2) if norm else nn.ReLU())
            blocks.append(nn.Sequential(*layers))
            previous = ch
        self.blocks = nn.ModuleList(blocks)
        self.top = nn.Sequential(nn.Conv2d(previous, previous, 4, stride=1, padding=0), nn.ReLU())

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Feature maps [(B, C_1, S/2, S/2), ..., (B, C_L, 4, 4), (B, C_L, 1, 1)]."""
        features = []
        for block in self.blocks:
            x = block(x)
            features.append(x)
        features.append(self.top(x))
        return features


class Encoder(nn.Module):
    """Image (B, 3, S, S) in [-1, 1] -> vector (B, outputs); the last layer starts at zero
    (Unsup3D's pose / light encoders, no normalisation)."""

    def __init__(self, size: int, width: int, outputs: int):
        super().__init__()
        self.trunk = ConvTrunk(3, size, width, norm=False)
        self.head = nn.Conv2d(self.trunk.channels[-1], outputs, 1)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.trunk(x)[-1]).flatten(1)


def _up(cin: int, cout: int) -> nn.Sequential:
    """x2 upsampling block: transposed 4x4 convolution, 3x3 convolution, GroupNorm + ReLU."""
    return nn.Sequential(nn.ConvTranspose2d(cin, cout, 4, stride=2, padding=1, bias=False),
                         nn.GroupNorm(_groups(cout), cout), nn.ReLU(),
                         nn.Conv2d(cout, cout, 3, padding=1, bias=False), nn.GroupNorm(_groups(cout), cout), nn.ReLU())


class Decoder(nn.Module):
    """Code (B, C) -> map (B, out_channels, R, R), R in 4, 8, 16, ... (Unsup3D's decoder, no final
    activation; the caller maps the raw output)."""

    def __init__(self, code: int, out_channels: int, size: int, width: int):
        super().__init__()
        ups = int(math.log2(size // 4))
        channels = list(reversed(_level_channels(width, max(ups, 1) + 1)))[-(ups + 1):]
        self.start = nn.Sequential(nn.ConvTranspose2d(code, channels[0], 4, bias=False),
                                   nn.GroupNorm(_groups(channels[0]), channels[0]), nn.ReLU())
        self.ups = nn.Sequential(*[_up(a, b) for a, b in zip(channels[:-1], channels[1:])])
        self.out = nn.Conv2d(channels[-1], out_channels, 5, padding=2)

    def forward(self, code: torch.Tensor) -> torch.Tensor:
        return self.out(self.ups(self.start(code[:, :, None, None])))


class AggregationEncoder(nn.Module):
    """``delta`` of an aggregation network (sec. 4.1): image (B, 3, S, S) -> code x_i (B, c) and
    channel-wise weight logits w_i (B, c).

    Every level of the trunk (S/2 ... 4 and the 1x1 top) goes through a 3x3 convolution and
    average pooling to a vector; the vectors are concatenated and fused by a 1x1 convolution
    (as a linear layer on [1, 1]) into the code, and by another into the weight logits.
    """

    def __init__(self, size: int, width: int, code: int):
        super().__init__()
        self.trunk = ConvTrunk(3, size, width)
        per_level = [max(8, ch // 2) for ch in self.trunk.channels + [self.trunk.channels[-1]]]
        self.level_heads = nn.ModuleList([
            nn.Sequential(nn.Conv2d(ch, out, 3, padding=1), nn.LeakyReLU(0.2))
            for ch, out in zip(self.trunk.channels + [self.trunk.channels[-1]], per_level)])
        self.fuse = nn.Sequential(nn.Conv2d(sum(per_level), code, 1), nn.LeakyReLU(0.2), nn.Conv2d(code, code, 1))
        self.weight = nn.Conv2d(sum(per_level), code, 1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        pooled = [head(f).mean((2, 3), keepdim=True) for head, f in zip(self.level_heads, self.trunk(x))]
        joined = torch.cat(pooled, 1)
        return self.fuse(joined).flatten(1), self.weight(joined).flatten(1)


def aggregate_codes(codes: torch.Tensor, logits: torch.Tensor, mask: torch.Tensor | None = None
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """Eq. 4: ``x_c = sum_i softmax_i(w_i) * x_i``, the softmax over the album, per channel.

    Args:
        codes, logits: (G, N, c) the codes x_i and weight logits w_i of G albums of N photos.
        mask: (G, N) bool, False for padding (albums with fewer than N photos); None: all real.

    Returns:
        the album codes (G, c) and the normalised weights (G, N, c) (0 at padding; summing to 1
        over N for every album and channel).
    """
    if mask is not None:
        logits = logits.masked_fill(~mask[..., None], float("-inf"))
    weights = torch.softmax(logits, dim=1)
    return (weights * codes).sum(1), weights


class ConfidenceNetwork(nn.Module):
    """``Phi^sigma``: image (B, 3, S, S) -> confidence maps (B, 2, S/4, S/4) > ``min_sigma``
    (channel 0: sigma of the render, 1: sigma' of the flipped render)."""

    def __init__(self, size: int, width: int, min_sigma: float = 0.01):
        super().__init__()
        self.trunk = ConvTrunk(3, size, width)
        self.decoder = Decoder(self.trunk.channels[-1], 2, size // 4, width)
        self.min_sigma = min_sigma
        nn.init.zeros_(self.decoder.out.weight)
        nn.init.constant_(self.decoder.out.bias, math.log(math.expm1(0.1)))  # softplus -> 0.1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.softplus(self.decoder(self.trunk(x)[-1].flatten(1))) + self.min_sigma


class FilteredConnection(nn.Module):
    """Sec. 4.2, fig. 4: a skip connection filtered by a spatial attention mask.

    ``A = sigmoid(conv3x3([enc, dec]))`` (B, 1, h, w); the output is ``[dec, A * enc]`` through a
    3x3 convolution back to the decoder's channels.

    Shapes: enc (B, C_e, h, w), dec (B, C_d, h, w) -> (B, C_d, h, w), and A (B, 1, h, w).
    """

    def __init__(self, enc_channels: int, dec_channels: int):
        super().__init__()
        self.attention = nn.Conv2d(enc_channels + dec_channels, 1, 3, padding=1)
        self.merge = nn.Sequential(nn.Conv2d(enc_channels + dec_channels, dec_channels, 3, padding=1, bias=False),
                                   nn.GroupNorm(_groups(dec_channels), dec_channels), nn.ReLU())

    def forward(self, enc: torch.Tensor, dec: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mask = torch.sigmoid(self.attention(torch.cat([enc, dec], 1)))
        return self.merge(torch.cat([dec, mask * enc], 1)), mask


class AttributeInjection(nn.Module):
    """Sec. 4.2: a target-photo feature re-weighted channel-wise by a learned selection
    ``sigmoid(s)`` (one weight per channel and level) and fused with the refiner's feature of
    the same level by a 1x1 convolution.

    Shapes: own (B, C, h, w), target (B, C_t, h, w) -> (B, C, h, w).
    """

    def __init__(self, channels: int, target_channels: int):
        super().__init__()
        self.selection = nn.Parameter(torch.zeros(target_channels))
        self.fuse = nn.Sequential(nn.Conv2d(channels + target_channels, channels, 1), nn.LeakyReLU(0.2))

    def forward(self, own: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return self.fuse(torch.cat([own, torch.sigmoid(self.selection)[None, :, None, None] * target], 1))


class AttributeRefiner(nn.Module):
    """Attribute-refining network of one factor (depth: 1 channel, albedo: 3).

    ``forward(canonical (B, C, R, R), photo (B, 3, R, R))`` -> residual (B, C, R, R): the encoder
    ``varphi`` reads the canonical map, the attribute encoder ``delta^t`` the target photo; the
    last three levels (8x8, 4x4 and the 1x1 top) get the photo's features through
    :class:`AttributeInjection`; the decoder climbs back from 1x1 with a
    :class:`FilteredConnection` to ``varphi``'s feature at every level from 4x4 to R/2, then to
    R. The last convolution starts at zero (no change at initialisation).
    """

    def __init__(self, channels: int, size: int, width: int):
        super().__init__()
        self.encoder = ConvTrunk(channels, size, width)
        self.attribute_encoder = ConvTrunk(3, size, width)
        ch = self.encoder.channels
        self.injected = [len(ch) - 2, len(ch) - 1, len(ch)]  # indices of the 8x8, 4x4 and 1x1 features
        every = ch + [ch[-1]]
        self.inject = nn.ModuleList([AttributeInjection(every[i], every[i]) for i in self.injected])
        self.start = nn.Sequential(nn.ConvTranspose2d(ch[-1], ch[-1], 4, bias=False),
                                   nn.GroupNorm(_groups(ch[-1]), ch[-1]), nn.ReLU())
        # decoder levels 4x4 ... R/2: filtered skip from the encoder level of the same size, then up
        self.filters = nn.ModuleList([FilteredConnection(c, c) for c in reversed(ch)])
        outs = list(reversed(ch))[1:] + [width]
        self.ups = nn.ModuleList([_up(a, b) for a, b in zip(reversed(ch), outs)])
        self.out = nn.Conv2d(width, channels, 5, padding=2)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, canonical: torch.Tensor, photo: torch.Tensor, return_masks: bool = False):
        own = self.encoder(canonical)
        target = self.attribute_encoder(photo)
        for module, i in zip(self.inject, self.injected):
            own[i] = module(own[i], target[i])
        x = self.start(own[-1])
        masks = []
        for skip, filt, up in zip(reversed(own[:-1]), self.filters, self.ups):
            x, mask = filt(skip, x)
            masks.append(mask)
            x = up(x)
        out = self.out(x)
        return (out, masks) if return_masks else out


class LapNetworks(nn.Module):
    """All LAP networks and the fixed buffers of the canonical face.

    Args:
        image_size: S (64 or 128): network input side and canonical grid side R.
        width: channels of the first level of every encoder (paper: 64).
        code: channels c of the codes x_i (eq. 4).
        template_depth: (R, R) model z (mm) the depth decoder's output is added to (the face
            model's mean face, or a constant); valid: (R, R) bool, the face on the grid;
        landmarks: (68, 2) canonical (x, y) of the iBUG points (for the weak landmark anchor).
        default_translation: (3,) mm, the frontal pose's translation at the fitting camera.
        depth_range: mm, the depth decoder's tanh range around the template.
        personal_depth_range: mm, the refiner's tanh range around the canonical depth.
        max_rotation: degrees; max_translation: (3,) mm, around the default pose.
    """

    def __init__(self, image_size: int, width: int, code: int, template_depth: torch.Tensor, valid: torch.Tensor,
                 landmarks: torch.Tensor, default_translation: torch.Tensor, depth_range: float = 30.0,
                 personal_depth_range: float = 10.0, max_rotation: float = 60.0,
                 max_translation: tuple[float, float, float] = (40.0, 40.0, 300.0)):
        super().__init__()
        self.layout = {"image_size": int(image_size), "width": int(width), "code": int(code),
                       "depth_range": float(depth_range), "personal_depth_range": float(personal_depth_range),
                       "max_rotation": float(max_rotation), "max_translation": [float(v) for v in max_translation]}
        S = image_size
        self.grid = CanonicalGrid(S)
        self.depth_encoder = AggregationEncoder(S, width, code)
        self.depth_decoder = Decoder(code, 1, S, width)
        self.albedo_encoder = AggregationEncoder(S, width, code)
        self.albedo_decoder = Decoder(code, 3, S, width)
        for decoder in (self.depth_decoder, self.albedo_decoder):  # start: the template depth, grey albedo
            nn.init.zeros_(decoder.out.weight)
            nn.init.zeros_(decoder.out.bias)
        self.pose_network = Encoder(S, width, 6)
        self.light_network = Encoder(S, width, 27)
        self.confidence_network = ConfidenceNetwork(S, width)
        self.depth_refiner = AttributeRefiner(1, S, width)
        self.albedo_refiner = AttributeRefiner(3, S, width)
        self.register_buffer("template_depth", template_depth.float().clone())
        self.register_buffer("valid", valid.bool().clone())
        self.register_buffer("landmarks", landmarks.float().clone())
        self.register_buffer("default_translation", default_translation.float().clone())
        self.register_buffer("max_translation", torch.tensor(max_translation, dtype=torch.float32))
        sh = torch.zeros(27)
        sh[[0, 9, 18]] = 1.0 / SH_CONSTANTS[0]  # unit white ambient irradiance, as the fit starts
        self.register_buffer("default_sh", sh)
        self.register_buffer("triangles", grid_triangles(valid.bool()))

    # ------------------------------------------------------------------ parts
    @property
    def image_size(self) -> int:
        return self.layout["image_size"]

    @staticmethod
    def normalise(images: torch.Tensor) -> torch.Tensor:
        """(B, S, S, 3) in [0, 1] -> (B, 3, S, S) in [-1, 1]."""
        return images.permute(0, 3, 1, 2) * 2 - 1

    def aggregate(self, images: torch.Tensor, mask: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Canonical faces of G albums.

        Args:
            images: (G, N, 3, S, S) in [-1, 1]; mask: (G, N) bool (False: padding) or None.

        Returns:
            ``depth`` (G, R, R) mm (0 off the face), ``albedo`` (G, R, R, 3) in [0, 1],
            ``depth_weights``, ``albedo_weights`` (G, N, c) eq. 4's normalised weights.
        """
        G, N = images.shape[:2]
        flat = images.reshape(G * N, *images.shape[2:])
        real = torch.ones(G * N, dtype=torch.bool, device=images.device) if mask is None else mask.reshape(-1)
        out = {}
        for name, encoder, decoder in (("depth", self.depth_encoder, self.depth_decoder),
                                       ("albedo", self.albedo_encoder, self.albedo_decoder)):
            # padding images are not encoded (their rows stay zero; eq. 4 gives them weight 0)
            real_codes, real_logits = encoder(flat[real])
            codes = real_codes.new_zeros(G * N, real_codes.shape[1])
            logits = real_logits.new_zeros(G * N, real_logits.shape[1])
            codes[real], logits[real] = real_codes, real_logits
            code, weights = aggregate_codes(codes.reshape(G, N, -1), logits.reshape(G, N, -1), mask)
            raw = decoder(code)
            out[f"{name}_weights"] = weights
            if name == "depth":
                out["depth"] = self.depth_from_raw(raw[:, 0])
            else:
                out["albedo"] = torch.sigmoid(raw).permute(0, 2, 3, 1) * self.valid[None, ..., None]
        return out

    def depth_from_raw(self, raw: torch.Tensor) -> torch.Tensor:
        return (self.template_depth + self.layout["depth_range"] * torch.tanh(raw)) * self.valid

    def scene(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """Per photo (B, 3, S, S) in [-1, 1]: ``angles`` (B, 3) rad, ``translation`` (B, 3) mm,
        ``sh`` (B, 27), ``sigma`` (B, 2, S/4, S/4)."""
        pose = self.pose_network(images)
        angles = torch.tanh(pose[:, :3]) * math.radians(self.layout["max_rotation"])
        translation = self.default_translation + torch.tanh(pose[:, 3:]) * self.max_translation
        return {"angles": angles, "translation": translation, "sh": self.default_sh + self.light_network(images),
                "sigma": self.confidence_network(images)}

    def personalise(self, depth: torch.Tensor, albedo: torch.Tensor, images: torch.Tensor
                    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Personalised faces: canonical depth (B, R, R) and albedo (B, R, R, 3) refined towards
        the target photos (B, 3, S, S) -> depth (B, R, R), albedo (B, R, R, 3)."""
        scale = self.layout["depth_range"]
        d_in = ((depth - self.template_depth) / scale * self.valid)[:, None]
        a_in = albedo.permute(0, 3, 1, 2) * 2 - 1
        dd = self.depth_refiner(d_in, images)[:, 0]
        da = self.albedo_refiner(a_in, images).permute(0, 2, 3, 1)
        personal_depth = (depth + self.layout["personal_depth_range"] * torch.tanh(dd)) * self.valid
        personal_albedo = (albedo + da).clamp(0, 1) * self.valid[None, ..., None]
        return personal_depth, personal_albedo

    @torch.no_grad()
    def predict_album(self, crops: torch.Tensor):
        """The networks' :class:`~facerecon.aggregation.lap.LapResult` of one album (inference):
        crops (P, C, C, 3) in [0, 1] at any size (resized to S) -> the canonical face of all P
        photos (eq. 4), each photo's pose, light, confidence maps and personalised face.
        ``losses`` holds each photo's mean eq. 4 weight (``aggregation_weight_depth`` /
        ``_albedo``, P,), 1 / P for a plain average."""
        S = self.image_size
        images = F.interpolate(crops.permute(0, 3, 1, 2), size=(S, S), mode="bilinear", antialias=True,
                               align_corners=False).clamp(0, 1) * 2 - 1
        P = images.shape[0]
        canonical = self.aggregate(images[None])
        scene = self.scene(images)
        depth, albedo = canonical["depth"][0], canonical["albedo"][0]
        personal_depth, personal_albedo = self.personalise(depth.expand(P, -1, -1), albedo.expand(P, -1, -1, -1),
                                                           images)
        result = LapResult(self.grid, depth, albedo, self.valid.clone(), scene["angles"], scene["translation"],
                           scene["sh"], scene["sigma"][:, 0], scene["sigma"][:, 1], personal_depth, personal_albedo,
                           self.landmarks.clone())
        result.losses = {f"aggregation_weight_{n}": canonical[f"{n}_weights"][0].mean(-1).cpu().numpy()
                         for n in ("depth", "albedo")}
        return result

    def vertices(self, depth: torch.Tensor) -> torch.Tensor:
        """(B, R*R, 3) model-frame vertices of depth maps (B, R, R)."""
        return grid_vertices(self.grid, depth)


def build_lap_networks(layout: dict, template_depth, valid, landmarks, default_translation) -> LapNetworks:
    return LapNetworks(layout["image_size"], layout["width"], layout["code"], template_depth, valid, landmarks,
                       default_translation, depth_range=layout["depth_range"],
                       personal_depth_range=layout["personal_depth_range"], max_rotation=layout["max_rotation"],
                       max_translation=tuple(layout["max_translation"]))


def load_lap_networks(path: str | Path, device="cpu") -> tuple[LapNetworks, dict]:
    """The networks of a ``facerecon train`` checkpoint with ``[lap] enabled`` (and the whole
    checkpoint dict); InputError with one line for anything else."""
    try:
        state = torch.load(Path(path), map_location=device, weights_only=False)
    except Exception as exc:  # noqa: BLE001 - torch raises many kinds for a bad file
        raise InputError(f"cannot read LAP checkpoint {path}: {exc}") from None
    if not isinstance(state, dict) or state.get("kind") != CHECKPOINT_KIND or "lap_layout" not in state:
        kind = state.get("kind", "rnet") if isinstance(state, dict) else "unknown"
        raise InputError(f"{path} is not a LAP checkpoint (kind {kind!r}; train one with [lap] enabled = true)")
    weights = state["networks"]
    networks = build_lap_networks(state["lap_layout"], weights["template_depth"], weights["valid"],
                                  weights["landmarks"], weights["default_translation"])
    networks.load_state_dict(weights)
    return networks.to(device).eval(), state
