"""Perception-level loss of paper 000 eq. 4 with a face-recognition network the user owns."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from facerecon.networks.iresnet import ARCFACE_TEMPLATE_112


def five_points(landmarks68: torch.Tensor) -> torch.Tensor:
    """(B, 68, 2) iBUG landmarks -> (B, 5, 2): eye centres, nose tip, mouth corners."""
    return torch.stack([landmarks68[:, 36:42].mean(1), landmarks68[:, 42:48].mean(1), landmarks68[:, 30],
                        landmarks68[:, 48], landmarks68[:, 54]], dim=1)


def similarity_to_template(points: torch.Tensor, template: torch.Tensor) -> torch.Tensor:
    """Least-squares similarity (B, 2, 3) mapping ``points`` (B, P, 2) onto ``template`` (P, 2)."""
    src = points - points.mean(1, keepdim=True)
    dst = (template - template.mean(0))[None].expand_as(src)
    a = (src * dst).sum((1, 2)) / (src**2).sum((1, 2))
    b = (src[..., 0] * dst[..., 1] - src[..., 1] * dst[..., 0]).sum(1) / (src**2).sum((1, 2))
    rot = torch.stack([torch.stack([a, -b], -1), torch.stack([b, a], -1)], -2)  # (B, 2, 2)
    shift = template.mean(0)[None] - (rot @ points.mean(1)[..., None])[..., 0]
    return torch.cat([rot, shift[..., None]], dim=2)


def warp_to_template(images: torch.Tensor, matrix: torch.Tensor, size: int = 112) -> torch.Tensor:
    """Differentiably warp (B, H, W, 3) images with pixel-space affine ``matrix`` (B, 2, 3) to (B, 3, size, size)."""
    b, h, w, _ = images.shape
    full = torch.cat([matrix, torch.tensor([0.0, 0.0, 1.0], device=matrix.device).expand(b, 1, 3)], 1)
    inverse = torch.linalg.inv(full)[:, :2]  # output pixel -> input pixel
    ys, xs = torch.meshgrid(torch.arange(size, device=images.device, dtype=images.dtype),
                            torch.arange(size, device=images.device, dtype=images.dtype), indexing="ij")
    grid = torch.stack([xs, ys, torch.ones_like(xs)], -1).reshape(1, -1, 3)
    src = grid @ inverse.transpose(1, 2).to(images.dtype)  # (B, size*size, 2) input pixels
    norm = torch.stack([src[..., 0] / (w - 1) * 2 - 1, src[..., 1] / (h - 1) * 2 - 1], -1).reshape(b, size, size, 2)
    return F.grid_sample(images.permute(0, 3, 1, 2), norm, align_corners=True, padding_mode="border")


class PerceptualLoss(torch.nn.Module):
    """L_per = 1 - cos(f(I), f(I')) (paper 000 eq. 4) for images aligned to the ArcFace template.

    The rendered face is composited over the photo (I' = render inside the face mask, photo
    elsewhere), so only the face differs. Call with images (B, H, W, 3) in [0, 1], mask
    (B, H, W) and landmarks68 (B, 68, 2) in the images' pixels; returns (B,).
    """

    def __init__(self, network: torch.nn.Module):
        super().__init__()
        self.network = network.eval()
        for parameter in self.network.parameters():
            parameter.requires_grad_(False)

    def embed(self, images: torch.Tensor, matrix: torch.Tensor) -> torch.Tensor:
        aligned = warp_to_template(images, matrix)
        return self.network((aligned - 0.5) / 0.5)

    def forward(self, rendered: torch.Tensor, target: torch.Tensor, mask: torch.Tensor,
                landmarks68: torch.Tensor) -> torch.Tensor:
        matrix = similarity_to_template(five_points(landmarks68), ARCFACE_TEMPLATE_112.to(landmarks68))
        composite = torch.where(mask[..., None], rendered, target)
        with torch.no_grad():
            reference = self.embed(target, matrix)
        return 1.0 - F.cosine_similarity(self.embed(composite, matrix), reference, dim=1)
