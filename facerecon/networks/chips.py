"""Face chips for recognition networks: template similarity and a differentiable warp with an
optional dlib-style pyramid (used by the networks, the perceptual loss and aggregation)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def five_points(landmarks68: torch.Tensor) -> torch.Tensor:
    """(B, 68, 2) iBUG landmarks -> (B, 5, 2): eye centres, nose tip, mouth corners."""
    return torch.stack([landmarks68[:, 36:42].mean(1), landmarks68[:, 42:48].mean(1), landmarks68[:, 30],
                        landmarks68[:, 48], landmarks68[:, 54]], dim=1)


def similarity_to_template(points: torch.Tensor, template: torch.Tensor) -> torch.Tensor:
    """Least-squares similarity (B, 2, 3) mapping ``points`` (B, P, 2) onto ``template`` (P, 2) or (B, P, 2)."""
    template = (template if template.dim() == 3 else template[None]).expand_as(points)
    src = points - points.mean(1, keepdim=True)
    dst = template - template.mean(1, keepdim=True)
    a = (src * dst).sum((1, 2)) / (src**2).sum((1, 2))
    b = (src[..., 0] * dst[..., 1] - src[..., 1] * dst[..., 0]).sum(1) / (src**2).sum((1, 2))
    rot = torch.stack([torch.stack([a, -b], -1), torch.stack([b, a], -1)], -2)  # (B, 2, 2)
    shift = template.mean(1) - (rot @ points.mean(1)[..., None])[..., 0]
    return torch.cat([rot, shift[..., None]], dim=2)


def sampling_grid(matrix: torch.Tensor, size: int, height: int, width: int, dtype=torch.float32) -> torch.Tensor:
    """(B, size, size, 2) :func:`~torch.nn.functional.grid_sample` grid (``align_corners=True``)
    of the output pixels of pixel-space affine maps ``matrix`` (B, 2, 3) from a height x width image."""
    b = matrix.shape[0]
    last_row = torch.tensor([0.0, 0.0, 1.0], device=matrix.device, dtype=matrix.dtype).expand(b, 1, 3)
    full = torch.cat([matrix, last_row], 1)
    inverse = torch.linalg.inv(full)[:, :2]  # output pixel -> input pixel
    ys, xs = torch.meshgrid(torch.arange(size, device=matrix.device, dtype=dtype),
                            torch.arange(size, device=matrix.device, dtype=dtype), indexing="ij")
    grid = torch.stack([xs, ys, torch.ones_like(xs)], -1).reshape(1, -1, 3)
    src = grid @ inverse.transpose(1, 2).to(dtype)  # (B, size*size, 2) input pixels
    return torch.stack([src[..., 0] / (width - 1) * 2 - 1, src[..., 1] / (height - 1) * 2 - 1],
                       -1).reshape(b, size, size, 2)


def _warp(images: torch.Tensor, matrix: torch.Tensor, size: int, padding_mode: str) -> torch.Tensor:
    b, h, w, _ = images.shape
    grid = sampling_grid(matrix.to(images.device), size, h, w, images.dtype)
    return F.grid_sample(images.permute(0, 3, 1, 2), grid, align_corners=True, padding_mode=padding_mode)


def halved_matrix(matrix: torch.Tensor) -> torch.Tensor:
    """Affine maps (B, 2, 3) from a photo's pixels, re-expressed from its :func:`binomial_halve` pixels.

    dlib places a halved pixel (x', y') at photo (2 x' + 2.5, 2 y' + 1.5) (``pyramid_down<2>``'s
    ``point_up``); this matches its chips better than the filter centre (2 x' + 2, 2 y' + 2).
    """
    offset = torch.tensor([[2.5], [1.5]], device=matrix.device, dtype=matrix.dtype)
    return torch.cat([2 * matrix[:, :, :2], matrix[:, :, 2:] + matrix[:, :, :2] @ offset], dim=2)


def binomial_halve(images: torch.Tensor) -> torch.Tensor:
    """One pyramid level down: (B, C, H, W) -> (B, C, (H - 3) // 2, (W - 3) // 2).

    A separable [1, 4, 6, 4, 1] / 16 filter keeping every other sample, output pixel ``k``
    centred on input pixel ``2 k + 2`` (the filter of dlib's ``pyramid_down<2>``).
    """
    c = images.shape[1]
    kernel = torch.tensor([1.0, 4.0, 6.0, 4.0, 1.0], device=images.device, dtype=images.dtype) / 16
    rows = F.conv2d(images, kernel.view(1, 1, 1, 5).expand(c, 1, 1, 5), stride=(1, 2), groups=c)
    return F.conv2d(rows, kernel.view(1, 1, 5, 1).expand(c, 1, 5, 1), stride=(2, 1), groups=c)


def pyramid_levels(matrix: torch.Tensor) -> torch.Tensor:
    """(B,) how many :func:`binomial_halve` levels to apply before warping with ``matrix`` (B, 2, 3).

    As dlib's chip extraction: halve while a halved photo still has more than one pixel per
    output pixel.
    """
    step = torch.linalg.det(matrix[:, :, :2].double()).abs().clamp_min(1e-12).rsqrt()  # photo px per output px
    return (torch.ceil(torch.log2(step) - 1e-9) - 1).clamp_min(0).long()


def warp_to_template(images: torch.Tensor, matrix: torch.Tensor, size: int = 112,
                     padding_mode: str = "border", antialias: bool = False) -> torch.Tensor:
    """Differentiably warp (B, H, W, 3) images with pixel-space affine ``matrix`` (B, 2, 3) to (B, 3, size, size).

    Bilinear; outside the photo ``padding_mode`` of :func:`torch.nn.functional.grid_sample`
    ("border", or "zeros" as dlib's chips). With ``antialias`` a face much larger than the
    output is first brought down a binomial pyramid (:func:`pyramid_levels`), as dlib's
    ``extract_image_chips`` does, instead of being point-sampled.
    """
    if not antialias:
        return _warp(images, matrix, size, padding_mode)
    levels = pyramid_levels(matrix)
    parts, order = [], []
    for level in torch.unique(levels).tolist():
        index = torch.nonzero(levels == level)[:, 0]
        level_images, level_matrix = images[index].permute(0, 3, 1, 2), matrix[index]
        for _ in range(level):
            if min(level_images.shape[2:]) < 7:
                break
            level_images, level_matrix = binomial_halve(level_images), halved_matrix(level_matrix)
        parts.append(_warp(level_images.permute(0, 2, 3, 1), level_matrix, size, padding_mode))
        order.append(index)
    out = torch.cat(parts)
    return out[torch.argsort(torch.cat(order))]
