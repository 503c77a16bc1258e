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
