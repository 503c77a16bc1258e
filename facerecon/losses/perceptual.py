"""Perception-level loss of paper 000 eq. 4 with a face-recognition network."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from facerecon.networks.chips import warp_to_template
from facerecon.networks.recognition import ArcFaceRecognizer


class PerceptualLoss(torch.nn.Module):
    """L_per = 1 - cos(f(I), f(I')) (paper 000 eq. 4) with a face-recognition network ``f``.

    ``network`` is one of :func:`facerecon.networks.recognition.load_recognition_network`'s
    (dlib's ResNet, or an ArcFace IR-ResNet wrapped with its template); a bare IR-ResNet is
    wrapped here. Each face is cut to the network's chip by its own alignment (dlib's 150x150
    chip from the 68 landmarks, or the ArcFace 112x112 five-point template).

    The rendered face is composited over the photo (I' = render inside the face mask, photo
    elsewhere), so only the face differs. Call with images (B, H, W, 3) in [0, 1], mask
    (B, H, W) and landmarks68 (B, 68, 2) in the images' pixels; returns (B,), differentiable
    with respect to ``rendered``.

    The photo's embedding does not change while a fit runs, so it is computed once per photo
    batch and landmarks (the last one is kept: the same ``target`` tensor with the same landmarks
    reuses it) instead of at every optimisation step.
    """

    def __init__(self, network: torch.nn.Module):
        super().__init__()
        #: (target tensor, its version, landmarks, reference embedding) of the last call
        self._reference: tuple[torch.Tensor, int, torch.Tensor, torch.Tensor] | None = None
        if not hasattr(network, "chip_matrix"):
            network = ArcFaceRecognizer(network)
        self.network = network.eval()
        for parameter in self.network.parameters():
            parameter.requires_grad_(False)

    def chip_matrix(self, landmarks68: torch.Tensor) -> torch.Tensor:
        """(B, 68, 2) landmarks -> (B, 2, 3) image-to-chip maps of the network's alignment."""
        return self.network.chip_matrix(landmarks68)

    def chips(self, images: torch.Tensor, matrix: torch.Tensor) -> torch.Tensor:
        """(B, H, W, 3) images in [0, 1] -> (B, 3, S, S) chips of the network's input size."""
        return warp_to_template(images, matrix, self.network.chip_size, self.network.chip_padding_mode,
                                self.network.chip_antialias)

    def embed(self, images: torch.Tensor, matrix: torch.Tensor) -> torch.Tensor:
        """(B, D) embeddings of (B, H, W, 3) images in [0, 1] cut by ``matrix`` (B, 2, 3)."""
        return self.network(self.chips(images, matrix))

    def forward(self, rendered: torch.Tensor, target: torch.Tensor, mask: torch.Tensor,
                landmarks68: torch.Tensor) -> torch.Tensor:
        landmarks68 = landmarks68.detach()
        matrix = self.chip_matrix(landmarks68)
        composite = torch.where(mask[..., None], rendered, target)
        return 1.0 - F.cosine_similarity(self.embed(composite, matrix), self.reference(target, landmarks68, matrix),
                                         dim=1)

    def reference(self, target: torch.Tensor, landmarks68: torch.Tensor, matrix: torch.Tensor) -> torch.Tensor:
        """(B, D) embedding of the photos ``target`` (no gradient), reused while the same target
        tensor (unchanged in place) comes with the same landmarks."""
        cached = self._reference
        if cached is not None and cached[0] is target and cached[1] == target._version \
                and cached[2].shape == landmarks68.shape and torch.equal(cached[2], landmarks68):
            return cached[3]
        with torch.no_grad():
            embedding = self.embed(target, matrix)
        self._reference = (target, target._version, landmarks68.clone(), embedding)
        return embedding
