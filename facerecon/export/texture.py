"""UV texture and vertex colours unwrapped from the photo, filled from the fitted model.

Texels whose surface point the fitting camera sees (z-buffer test, facing the camera)
take the photo's colour, sampled from the full-resolution image through the alignment
transform; the rest take the fitted shaded albedo, blended across a soft border so no
seam shows.

For paper 002's specular material, :func:`bake_vertex_values` rasterises per-vertex
quantities (irradiance, specular shading, albedos) into the same UV space and
:func:`delight_texture` divides the lighting out of the photo texture.
"""

from __future__ import annotations

import threading

import cv2
import numpy as np
import torch

from facerecon.render.camera import project_points
from facerecon.render.rasterize import rasterize
from facerecon.render.shading import facing_cosine, vertex_normals

DEPTH_TOLERANCE_MM = 3.0
MIN_FACING = 0.15
#: delight_texture divides by the irradiance clamped to at least this: a photo quantisation
#: step (1/255) then moves the albedo by at most 0.08, and unlit texels do not blow up.
MIN_IRRADIANCE = 0.05


def _inside(image: np.ndarray, xy: np.ndarray) -> np.ndarray:
    """(P,) True where pixel coordinates (P, 2) fall inside the image."""
    h, w = image.shape[:2]
    return (xy[:, 0] >= 0) & (xy[:, 0] <= w - 1) & (xy[:, 1] >= 0) & (xy[:, 1] <= h - 1)


#: cv2.remap refuses source images and maps with a side of SHRT_MAX (32767) or more.
REMAP_MAX_SIDE = 32767
_SAMPLE_WIDTH = 1024  # map rows of this many points...
_SAMPLE_CHUNK = _SAMPLE_WIDTH * 16384  # ...and at most this many points per remap call


def _sample(image: np.ndarray, xy: np.ndarray) -> np.ndarray:
    """Bilinear samples (P, 3) float [0, 1] of an RGB uint8 image at pixel coords (P, 2)
    (coordinates outside the image take the nearest edge pixel).

    Works for any number of points and any image size: points go to cv2.remap in chunks,
    each against the part of the image its points fall in; a part still wider or taller
    than remap allows is sampled with NumPy instead.
    """
    h, w = image.shape[:2]
    xy = np.asarray(xy, np.float32).reshape(-1, 2)
    out = np.empty((len(xy), 3), np.float32)
    for start in range(0, len(xy), _SAMPLE_CHUNK):
        chunk = xy[start:start + _SAMPLE_CHUNK].copy()
        finite = np.isfinite(chunk)
        chunk[~finite] = 0.0
        chunk[:, 0] = np.clip(chunk[:, 0], 0, w - 1)
        chunk[:, 1] = np.clip(chunk[:, 1], 0, h - 1)
        x0, y0 = int(np.floor(chunk[:, 0].min())), int(np.floor(chunk[:, 1].min()))
        x1, y1 = min(w - 1, int(np.floor(chunk[:, 0].max())) + 1), min(h - 1, int(np.floor(chunk[:, 1].max())) + 1)
        part = image[y0:y1 + 1, x0:x1 + 1]
        local = chunk - np.array([x0, y0], np.float32)
        if max(part.shape[:2]) < REMAP_MAX_SIDE:
            n = len(local)
            padded = np.zeros((-(-n // _SAMPLE_WIDTH) * _SAMPLE_WIDTH, 2), np.float32)
            padded[:n] = local
            maps = padded.reshape(-1, _SAMPLE_WIDTH, 2)
            values = cv2.remap(np.ascontiguousarray(part), maps[..., 0], maps[..., 1],
                               interpolation=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
            out[start:start + n] = values.reshape(-1, 3)[:n].astype(np.float32) / 255.0
        else:
            out[start:start + len(local)] = _bilinear(part, local)
    return out


def _bilinear(image: np.ndarray, xy: np.ndarray) -> np.ndarray:
    """NumPy bilinear samples (P, 3) float [0, 1] at in-range pixel coords (P, 2)."""
    h, w = image.shape[:2]
    x0 = np.clip(np.floor(xy[:, 0]).astype(np.int64), 0, w - 1)
    y0 = np.clip(np.floor(xy[:, 1]).astype(np.int64), 0, h - 1)
    x1, y1 = np.minimum(x0 + 1, w - 1), np.minimum(y0 + 1, h - 1)
    fx, fy = (xy[:, 0] - x0)[:, None], (xy[:, 1] - y0)[:, None]
    top = image[y0, x0] * (1 - fx) + image[y0, x1] * fx
    bottom = image[y1, x0] * (1 - fx) + image[y1, x1] * fx
    return ((top * (1 - fy) + bottom * fy) / 255.0).astype(np.float32)


def _to_photo(points_crop: np.ndarray, crop_to_photo: np.ndarray) -> np.ndarray:
    return points_crop @ crop_to_photo[:, :2].T + crop_to_photo[:, 2]


def _visible(points_cam: torch.Tensor, normals_cam: torch.Tensor, pixels: torch.Tensor, depth: torch.Tensor,
             mask: torch.Tensor) -> torch.Tensor:
    """(P,) visibility of camera-frame points given the crop's z-buffer (S, S)."""
    s = depth.shape[0]
    col = pixels[:, 0].round().long().clamp(0, s - 1)
    row = pixels[:, 1].round().long().clamp(0, s - 1)
    inside = (pixels[:, 0] >= 0) & (pixels[:, 0] <= s - 1) & (pixels[:, 1] >= 0) & (pixels[:, 1] <= s - 1)
    zbuf = depth[row, col]
    covered = mask[row, col]
    return inside & covered & (points_cam[:, 2] <= zbuf + DEPTH_TOLERANCE_MM) & (
        facing_cosine(points_cam, normals_cam) > MIN_FACING)


def unwrap_texture(
    vertices_cam: torch.Tensor,
    triangles: torch.Tensor,
    uv: torch.Tensor,
    triangle_uv: torch.Tensor,
    intrinsics: torch.Tensor,
    crop_depth: torch.Tensor,
    crop_mask: torch.Tensor,
    photo: np.ndarray,
    crop_to_photo: np.ndarray,
    fill_colors: torch.Tensor,
    texture_size: int = 1024,
    return_quality: bool = False,
):
    """Texture (T, T, 3) uint8, vertex colours (N, 3) uint8 and vertex visibility (N,) bool.

    Args:
        vertices_cam: (N, 3) fitted vertices in the fitting camera frame (mm).
        triangles: (F, 3); uv: (U, 2) origin bottom-left; triangle_uv: (F, 3).
        intrinsics: (3, 3) crop camera; crop_depth / crop_mask: (S, S) z-buffer of the fit.
        photo: (H, W, 3) uint8 RGB image the crop came from.
        crop_to_photo: (2, 3) affine mapping crop pixels to photo pixels.
        fill_colors: (N, 3) float [0, 1] colours where the photo does not see the surface.
        return_quality: also return a (T, T) float map, the photo's weight per texel times
            how squarely the surface faces the camera (for merging several photos).
    """
    t = texture_size
    device = vertices_cam.device
    normals = vertex_normals(vertices_cam[None], triangles)[0]
    # -- per-vertex colours
    vpix = project_points(vertices_cam[None], intrinsics[None])[0][:, :2]
    vvis = _visible(vertices_cam, normals, vpix, crop_depth, crop_mask)
    vphoto = _to_photo(vpix.cpu().numpy(), crop_to_photo)
    vvis = vvis & torch.as_tensor(_inside(photo, vphoto), device=vvis.device)  # faces cut by the photo edge
    photo_v = _sample(photo, vphoto)
    fill_v = fill_colors.clamp(0, 1).cpu().numpy()
    vcol = np.where(vvis.cpu().numpy()[:, None], photo_v, fill_v)
    # -- UV raster: texel -> triangle, barycentrics
    frags = _uv_fragments(uv.to(device=device, dtype=vertices_cam.dtype), triangle_uv.to(device), t)
    tid = frags.triangle_id[0]
    covered = tid >= 0
    texel_tri = triangles[tid[covered]]  # (P, 3)
    bary = frags.barycentric[0][covered].detach()  # (P, 3)
    pos = (vertices_cam[texel_tri] * bary[..., None]).sum(1)
    nrm = torch.nn.functional.normalize((normals[texel_tri] * bary[..., None]).sum(1), dim=-1)
    fill = (fill_colors.clamp(0, 1)[texel_tri] * bary[..., None]).sum(1)
    pix = project_points(pos[None], intrinsics[None])[0][:, :2]
    tphoto = _to_photo(pix.cpu().numpy(), crop_to_photo)
    vis = _visible(pos, nrm, pix, crop_depth, crop_mask).cpu().numpy() & _inside(photo, tphoto)
    photo_t = _sample(photo, tphoto)
    cov = covered.cpu().numpy()
    photo_img = np.zeros((t, t, 3), np.float32)
    fill_img = np.zeros((t, t, 3), np.float32)
    weight = np.zeros((t, t), np.float32)
    photo_img[cov] = photo_t
    fill_img[cov] = fill.cpu().numpy()
    weight[cov] = vis.astype(np.float32)
    # soft border between photo and fill, confined to what the photo saw
    radius = max(3, t // 128) | 1
    weight = cv2.GaussianBlur(weight, (2 * radius + 1, 2 * radius + 1), 0) * weight
    texture = weight[..., None] * photo_img + (1.0 - weight[..., None]) * fill_img
    texture = fill_holes(texture, cov)
    texture_u8 = np.clip(texture * 255.0 + 0.5, 0, 255).astype(np.uint8)
    vertex_u8 = np.clip(vcol * 255.0 + 0.5, 0, 255).astype(np.uint8)
    if not return_quality:
        return texture_u8, vertex_u8, vvis.cpu().numpy()
    facing = np.zeros((t, t), np.float32)
    facing[cov] = facing_cosine(pos, nrm).clamp_min(0).cpu().numpy()
    return texture_u8, vertex_u8, vvis.cpu().numpy(), weight * facing


def fill_holes(image: np.ndarray, known: np.ndarray) -> np.ndarray:
    """Fill pixels outside ``known`` (H, W) with averages of growing neighbourhoods.

    Bleeds colours past the UV islands so texture filtering shows no dark seams.
    """
    image = image.copy()
    known = known.astype(np.float32)
    size = 3
    while known.min() == 0 and size < 2 * max(image.shape[:2]):
        weight = cv2.boxFilter(known, -1, (size, size), normalize=False)
        total = cv2.boxFilter(image * known[..., None], -1, (size, size), normalize=False).reshape(image.shape)
        fillable = (known == 0) & (weight > 0)
        image[fillable] = total[fillable] / weight[fillable][:, None]
        known = np.maximum(known, fillable.astype(np.float32))
        size = size * 3
    return image


#: the last UV layout rasterised by :func:`_uv_fragments` (every face of a model shares it)
_UV_CACHE: dict[str, object] = {}
#: held while a layout is rasterised, so a caller waits for a background rasterisation
#: (:func:`rasterize_uv_layout_in_background`) of the same layout instead of repeating it
_UV_LOCK = threading.Lock()


def _uv_fragments(uv: torch.Tensor, triangle_uv: torch.Tensor, size: int):
    """Rasterise the UV layout into a (size, size) texture: per-texel triangle id and
    barycentrics. Texel (row i, col j) is at u = (j + 0.5) / size, v = 1 - (i + 0.5) / size.
    The last layout's result is kept (the same model's faces share it)."""
    key = (size, uv.dtype, str(uv.device), tuple(uv.shape), str(triangle_uv.device), tuple(triangle_uv.shape))
    with _UV_LOCK:
        cached = _UV_CACHE.get("entry")
        if cached is not None and cached[0] == key and torch.equal(cached[1], uv) and torch.equal(cached[2],
                                                                                                  triangle_uv):
            return cached[3]
        screen = torch.stack([uv[:, 0] * size - 0.5, (1.0 - uv[:, 1]) * size - 0.5, torch.ones_like(uv[:, 0])],
                             dim=-1)
        frags = rasterize(screen[None], triangle_uv, (size, size), cull_backfaces=False)
        _UV_CACHE["entry"] = (key, uv.clone(), triangle_uv.clone(), frags)
        return frags


def rasterize_uv_layout_in_background(uv: torch.Tensor, triangle_uv: torch.Tensor, size: int,
                                      dtype: torch.dtype) -> threading.Thread:
    """Start rasterising the UV layout :func:`unwrap_texture` will need for vertices of ``dtype``
    (the model's) on a thread, so the first face's texture finds it done: the fit stage starts it
    before detection, which leaves a core free. The same computation as on first use, so the
    textures are unchanged. Join the returned thread before the process ends."""
    uv = uv.to(dtype=dtype)
    thread = threading.Thread(target=_uv_fragments, args=(uv, triangle_uv, int(size)),
                              name="facerecon-uv-layout", daemon=True)
    thread.start()
    return thread


def bake_vertex_values(triangles, uv, triangle_uv, values, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-vertex values rasterised into UV space, interpolated across each triangle.

    Args:
        triangles: (F, 3) vertex indices.
        uv: (U, 2) texture coordinates in [0, 1], origin bottom-left.
        triangle_uv: (F, 3) indices into ``uv`` (the UV corners of each triangle).
        values: (N, C) one value per vertex (NumPy or torch).
        size: texture side T.

    Returns:
        image: (T, T, C) float32; texel (row i, col j) at u = (j + 0.5) / T,
            v = 1 - (i + 0.5) / T holds the barycentric blend of its triangle's three
            vertex values; texels no triangle covers are filled from their neighbours
            (:func:`fill_holes`) so texture filtering shows no seams.
        covered: (T, T) bool, True where a triangle covers the texel centre.
    """
    values = torch.as_tensor(np.asarray(values) if not torch.is_tensor(values) else values).detach().cpu()
    if values.ndim != 2:
        raise ValueError(f"values must be (N, C), not {tuple(values.shape)}")
    triangles = torch.as_tensor(np.asarray(triangles), dtype=torch.long)
    triangle_uv = torch.as_tensor(np.asarray(triangle_uv), dtype=torch.long)
    if triangles.shape != triangle_uv.shape:
        raise ValueError(f"triangles {tuple(triangles.shape)} and triangle_uv {tuple(triangle_uv.shape)} differ")
    uv = torch.as_tensor(np.asarray(uv), dtype=torch.float64)
    frags = _uv_fragments(uv, triangle_uv, int(size))
    tid = frags.triangle_id[0]
    covered = tid >= 0
    corners = triangles[tid[covered]]  # (P, 3) vertex indices of each covered texel's triangle
    bary = frags.barycentric[0][covered]  # (P, 3)
    texels = torch.einsum("pkc,pk->pc", values.to(torch.float32)[corners], bary.to(torch.float32))  # (P, C)
    cov = covered.numpy()
    image = np.zeros((size, size, values.shape[1]), np.float32)
    image[cov] = texels.numpy().astype(np.float32)
    return fill_holes(image, cov), cov


def delight_texture(photo_texture: np.ndarray, irradiance: np.ndarray, specular: np.ndarray,
                    fallback: np.ndarray, seen: np.ndarray) -> np.ndarray:
    """De-lit diffuse albedo texture from the lit photo texture (paper 002's shading model).

    The photo is ``albedo * irradiance + specular``, so where the photo saw the surface the
    albedo is ``(photo / 255 - specular) / max(irradiance, MIN_IRRADIANCE)``; elsewhere
    (and across the soft border) it is blended with ``fallback`` by the weight ``seen``.

    Args:
        photo_texture: (T, T, 3) uint8 lit photo texture.
        irradiance: (T, T, 3) float diffuse shading (SH irradiance) per texel.
        specular: (T, T, 3) float specular shading (specular albedo times Blinn-Phong) per texel.
        fallback: (T, T, 3) float in [0, 1], e.g. the fitted model albedo.
        seen: (T, T) float weight in [0, 1] of the photo (1 = photo, 0 = fallback).

    Returns:
        (T, T, 3) uint8 diffuse albedo, each channel clamped to [0, 1] before rounding.
    """
    photo = np.asarray(photo_texture, np.float64) / 255.0
    shape = photo.shape
    if len(shape) != 3 or shape[2] != 3:
        raise ValueError(f"photo_texture must be (T, T, 3), not {shape}")
    for name, array in (("irradiance", irradiance), ("specular", specular), ("fallback", fallback)):
        if np.shape(array) != shape:
            raise ValueError(f"{name} must have the photo texture's shape {shape}, not {np.shape(array)}")
    if np.shape(seen) != shape[:2]:
        raise ValueError(f"seen must be {shape[:2]}, not {np.shape(seen)}")
    irradiance = np.maximum(np.asarray(irradiance, np.float64), MIN_IRRADIANCE)
    fallback = np.clip(np.nan_to_num(np.asarray(fallback, np.float64)), 0.0, 1.0)
    with np.errstate(invalid="ignore"):
        albedo = np.clip((photo - np.asarray(specular, np.float64)) / irradiance, 0.0, 1.0)
    albedo = np.where(np.isfinite(albedo), albedo, fallback)  # a NaN shading value takes the fallback
    weight = np.clip(np.nan_to_num(np.asarray(seen, np.float64)), 0.0, 1.0)[..., None]
    out = weight * albedo + (1.0 - weight) * fallback
    return np.clip(out * 255.0 + 0.5, 0, 255).astype(np.uint8)
