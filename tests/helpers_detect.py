"""Test images for the detect tests: real photo variants, group pictures, broken files."""

from __future__ import annotations

import os
import struct
import zlib
from pathlib import Path

import numpy as np

REPO_ROOT = Path(__file__).resolve().parents[1]
ASTRONAUT_PNG = REPO_ROOT / "examples" / "astronaut.png"

# Face of the astronaut in examples/astronaut.png (512x512): roughly x 170..280, y 60..180.
ASTRONAUT_FACE_CROP = (slice(10, 250), slice(110, 340))


def shared_dir() -> Path:
    """The shared data folder (FACERECON_SHARED_DIR, default ../shared beside the repo)."""
    return Path(os.environ.get("FACERECON_SHARED_DIR", REPO_ROOT.parent / "shared"))


def astronaut() -> np.ndarray:
    """(512, 512, 3) uint8 RGB astronaut photo (public domain, from scikit-image)."""
    from PIL import Image

    with Image.open(ASTRONAUT_PNG) as image:
        return np.asarray(image.convert("RGB")).copy()


def save_rgb(path: Path, rgb: np.ndarray, **kwargs) -> Path:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rgb).save(path, **kwargs)
    return path


def save_exif_rotated(path: Path, upright: np.ndarray, orientation: int) -> Path:
    """Store ``upright`` rotated in the file with an EXIF orientation (6 or 8) that makes a
    viewer show it upright again."""
    from PIL import Image

    if orientation == 6:    # viewer rotates 90 degrees clockwise
        stored = np.rot90(upright, k=1)
    elif orientation == 8:  # viewer rotates 90 degrees counter-clockwise
        stored = np.rot90(upright, k=-1)
    else:
        raise ValueError("orientation must be 6 or 8")
    image = Image.fromarray(np.ascontiguousarray(stored))
    exif = image.getexif()
    exif[0x0112] = orientation
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, exif=exif.tobytes())
    return path


def group_photo(big: int = 300, small: int = 190, gap: int = 40) -> tuple[np.ndarray, list[tuple[int, int, int]]]:
    """Two copies of the astronaut's head, pasted side by side at different sizes on a grey
    canvas. Returns the image and the (x, y, side) of each pasted square (big first, placed
    on the right so that size order differs from left-to-right order)."""
    import cv2

    head = astronaut()[ASTRONAUT_FACE_CROP]
    side_big, side_small = big, small
    height = max(side_big, side_small) + 2 * gap
    width = side_big + side_small + 3 * gap
    canvas = np.full((height, width, 3), 110, dtype=np.uint8)
    small_img = cv2.resize(head, (side_small, side_small), interpolation=cv2.INTER_AREA)
    big_img = cv2.resize(head, (side_big, side_big), interpolation=cv2.INTER_AREA)
    xs, ys = gap, gap + (side_big - side_small) // 2
    xb, yb = 2 * gap + side_small, gap
    canvas[ys:ys + side_small, xs:xs + side_small] = small_img
    canvas[yb:yb + side_big, xb:xb + side_big] = big_img
    return canvas, [(xb, yb, side_big), (xs, ys, side_small)]


def on_background(rgb: np.ndarray, width: int, height: int, x: int, y: int, seed: int = 0) -> np.ndarray:
    """``rgb`` pasted at (x, y) onto a noisy ``width`` x ``height`` background."""
    rng = np.random.default_rng(seed)
    canvas = np.clip(rng.normal(120, 15, size=(height, width, 3)), 0, 255).astype(np.uint8)
    h, w = rgb.shape[:2]
    canvas[y:y + h, x:x + w] = rgb
    return canvas


def write_flat_png(path: Path, width: int, height: int, colour=(128, 128, 128)) -> Path:
    """A uniform 8-bit RGB PNG of any size, written row by row (a 20000x20000 one takes
    ~3 s and ~1 MB on disk without ever holding the image in memory)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    row = b"\x00" + bytes(colour) * width
    compressor = zlib.compressobj(9)
    parts = [compressor.compress(row) for _ in range(height)]
    parts.append(compressor.flush())
    with open(path, "wb") as handle:
        handle.write(b"\x89PNG\r\n\x1a\n")
        handle.write(chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)))
        handle.write(chunk(b"IDAT", b"".join(parts)))
        handle.write(chunk(b"IEND", b""))
    return path


def truncated_copy(source: Path, target: Path, fraction: float = 0.5) -> Path:
    data = source.read_bytes()
    target.write_bytes(data[: int(len(data) * fraction)])
    return target


def can_make_unreadable(path: Path) -> bool:
    """chmod 000 ``path``; True when that really makes it unreadable (not root)."""
    path.chmod(0)
    try:
        with open(path, "rb"):
            pass
    except PermissionError:
        return True
    return False


def write_synth_detections(path: Path, synth_dir: Path, keys_and_images: list[tuple[str, Path]]) -> Path:
    """A detections file whose faces are the synthetic images themselves (zoom-1 synth images are
    aligned crops) with their true landmarks, so no detector runs."""
    import h5py
    from PIL import Image

    from facerecon.io.store import ResultStore

    with h5py.File(synth_dir / "synth.h5") as f:
        truth = {name: f["images"][name]["landmarks68"][()] for name in f["images"]}
    with ResultStore(path, kind="detections", items_group="images") as store:
        for key, image in keys_and_images:
            crop = np.asarray(Image.open(image).convert("RGB"))

            def write(group, crop=crop, lm=truth[image.name]):
                g = group.create_group("faces").create_group("0")
                g.attrs["index"], g.attrs["score"] = 0, 1.0
                g.create_dataset("crop", data=crop)
                g.create_dataset("crop_landmarks68", data=lm.astype(np.float32))
                g.create_dataset("crop_landmarks478", data=np.zeros((478, 3), np.float32))
                g.create_dataset("skin_attention", data=np.full(crop.shape[:2], 255, np.uint8))
                g.create_dataset("align_matrix", data=np.array([[1.0, 0, 0], [0, 1.0, 0]]))

            store.write_item(key, write, {"status": "ok", "n_faces": 1, "source_path": str(image.resolve())})
    return path
