"""Overlay images (reconstruction blended over the photo) and contact sheets."""

from __future__ import annotations

import math

import cv2
import numpy as np


def draw_landmarks(image: np.ndarray, detected: np.ndarray, projected: np.ndarray) -> np.ndarray:
    """Draw detected (green) and projected (red) landmarks (L, 2) on an RGB uint8 image."""
    out = image.copy()
    radius = max(1, round(image.shape[0] / 256))
    for (x, y) in detected:
        cv2.circle(out, (int(round(x)), int(round(y))), radius + 1, (40, 220, 60), -1, cv2.LINE_AA)
    for (x, y) in projected:
        cv2.circle(out, (int(round(x)), int(round(y))), radius, (235, 40, 40), -1, cv2.LINE_AA)
    return out


def blend(photo: np.ndarray, render: np.ndarray, mask: np.ndarray, alpha: float = 0.7) -> np.ndarray:
    """Render (H, W, 3) float [0, 1] blended over photo (H, W, 3) uint8 where mask (H, W)."""
    base = photo.astype(np.float32) / 255.0
    mixed = np.where(mask[..., None], alpha * np.clip(render, 0, 1) + (1 - alpha) * base, base)
    return np.clip(mixed * 255.0 + 0.5, 0, 255).astype(np.uint8)


def contact_sheet(tiles: list[tuple[np.ndarray, str]], tile_size: int = 256, columns: int | None = None
                  ) -> np.ndarray:
    """Grid of RGB tiles with a caption under each, as one RGB uint8 image."""
    if not tiles:
        return np.full((tile_size, tile_size, 3), 255, np.uint8)
    columns = columns or min(len(tiles), max(1, math.ceil(math.sqrt(len(tiles)))))
    rows = math.ceil(len(tiles) / columns)
    caption = 22
    sheet = np.full((rows * (tile_size + caption), columns * tile_size, 3), 255, np.uint8)
    for i, (tile, text) in enumerate(tiles):
        r, c = divmod(i, columns)
        y, x = r * (tile_size + caption), c * tile_size
        sheet[y:y + tile_size, x:x + tile_size] = cv2.resize(tile, (tile_size, tile_size),
                                                             interpolation=cv2.INTER_AREA)
        if len(text) > 34:  # keep the end too: extension and face number tell tiles apart
            text = text[:15] + ".." + text[-17:]
        cv2.putText(sheet, text, (x + 4, y + tile_size + 16), cv2.FONT_HERSHEY_SIMPLEX, 0.42, (20, 20, 20), 1,
                    cv2.LINE_AA)
    return sheet


DECOMPOSITION_LABELS = ("photo", "diffuse", "specular", "final")


def _label(panel: np.ndarray, text: str) -> None:
    """Small white caption with a dark outline in the panel's top-left corner (in place)."""
    scale = max(0.3, panel.shape[0] / 500.0)
    thickness = max(1, round(scale * 2))
    (_, height), _ = cv2.getTextSize(text, cv2.FONT_HERSHEY_SIMPLEX, scale, thickness)
    pad = max(3, round(6 * scale))
    origin = (pad, pad + height)
    cv2.putText(panel, text, origin, cv2.FONT_HERSHEY_SIMPLEX, scale, (0, 0, 0), thickness + 2, cv2.LINE_AA)
    cv2.putText(panel, text, origin, cv2.FONT_HERSHEY_SIMPLEX, scale, (255, 255, 255), thickness, cv2.LINE_AA)


def render_strip(photo_crop: np.ndarray, panels: list[tuple[str, np.ndarray, np.ndarray]]) -> np.ndarray:
    """The photo crop and captioned renders side by side.

    Args:
        photo_crop: (H, W, 3) uint8 RGB, captioned "photo".
        panels: (caption, render (H, W, 3) float [0, 1], mask (H, W) bool) each; a render is
            drawn over black where its mask is False.

    Returns:
        (H, (1 + len(panels)) W, 3) uint8.
    """
    h, w = photo_crop.shape[:2]
    if photo_crop.shape != (h, w, 3):
        raise ValueError(f"photo_crop must be (H, W, 3), not {photo_crop.shape}")
    out = [np.ascontiguousarray(photo_crop, dtype=np.uint8).copy()]
    for name, render, mask in panels:
        if np.shape(render) != (h, w, 3) or np.shape(mask) != (h, w):
            raise ValueError(f"{name} must be {(h, w, 3)} with a {(h, w)} mask, not {np.shape(render)}, "
                             f"{np.shape(mask)}")
        values = np.nan_to_num(np.asarray(render, np.float32))
        u8 = np.clip(values * 255.0 + 0.5, 0, 255).astype(np.uint8)
        out.append(np.where(np.asarray(mask, bool)[..., None], u8, np.uint8(0)))
    for panel, text in zip(out, ["photo"] + [name for name, _, _ in panels]):
        _label(panel, text)
    return np.concatenate(out, axis=1)


def decomposition_strip(photo_crop: np.ndarray, lit_diffuse: np.ndarray, lit_specular: np.ndarray,
                        final: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Paper 002's decomposition panel: photo | lit diffuse | lit specular | final.

    Args:
        photo_crop: (H, W, 3) uint8 RGB.
        lit_diffuse: (H, W, 3) float [0, 1], diffuse albedo times SH irradiance.
        lit_specular: (H, W, 3) float [0, 1], specular albedo times the Blinn-Phong term.
        final: (H, W, 3) float [0, 1], their sum.
        mask: (H, W) bool, where the renders cover the image.

    Returns:
        (H, 4W, 3) uint8: the four panels side by side, each render over black where
        ``mask`` is False, each captioned in its top-left corner.
    """
    h, w = photo_crop.shape[:2]
    if photo_crop.shape != (h, w, 3) or np.shape(mask) != (h, w):
        raise ValueError(f"photo_crop must be (H, W, 3) and mask (H, W), not {photo_crop.shape}, {np.shape(mask)}")
    mask = np.asarray(mask, bool)
    panels = [np.ascontiguousarray(photo_crop, dtype=np.uint8).copy()]
    for name, render in (("lit_diffuse", lit_diffuse), ("lit_specular", lit_specular), ("final", final)):
        if np.shape(render) != (h, w, 3):
            raise ValueError(f"{name} must be {(h, w, 3)}, not {np.shape(render)}")
        values = np.nan_to_num(np.asarray(render, np.float32))
        u8 = np.clip(values * 255.0 + 0.5, 0, 255).astype(np.uint8)
        panels.append(np.where(mask[..., None], u8, np.uint8(0)))
    for panel, text in zip(panels, DECOMPOSITION_LABELS):
        _label(panel, text)
    return np.concatenate(panels, axis=1)
