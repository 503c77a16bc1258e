"""Robust image loading and input collection.

Every photo becomes an upright 8-bit RGB array, whatever it was stored as:

* formats: anything Pillow decodes; folders are searched for JPEG, PNG, BMP, TIFF and WebP
  (:data:`IMAGE_EXTENSIONS`);
* EXIF orientation (tag 0x0112) is applied, so the array is what a photo viewer shows;
* 16-bit grey (``I;16``, ``I``) is scaled to 8 bits (``round(v / 257)``); 16-bit RGB is
  reduced to 8 bits by Pillow; float images in [0, 1] are scaled by 255;
* palette, grey, 1-bit, CMYK, YCbCr, LAB and HSV are converted to RGB;
* transparency (RGBA, LA, palette with a transparent colour) is composited over white,
  so transparent areas read as white, a colour the skin model treats as non-skin;
* the first frame of multi-frame files is used.

Failures raise :class:`ImageLoadError` whose message is one line for a human. Images
with more than ``max_pixels`` pixels (default :data:`DEFAULT_MAX_PIXELS`, 400 MP, which
admits 20000x20000) are refused from the header alone, before decoding. Decoding a
400 MP image needs about 3-5 GB of memory (Pillow's 4-byte pixels plus the 3-byte array).
With the default limit, an image over 50 MP that compresses more than 400x (a
decompression bomb, not a photo) is refused too; an explicit ``max_pixels`` allows it.
"""

from __future__ import annotations

import glob
import hashlib
import io
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import numpy as np

#: File name endings collected from folders and globs (compared case-insensitively).
IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".jpe", ".png", ".bmp", ".dib", ".tif", ".tiff", ".webp", ".ppm",
                              ".pgm", ".pbm", ".pnm"})
#: Image formats met in photo folders that are not read (suffix -> name for the message).
UNSUPPORTED_EXTENSIONS = {".heic": "HEIC", ".heif": "HEIF", ".hif": "HEIF", ".avif": "AVIF", ".gif": "GIF",
                          ".jxl": "JPEG XL", ".dng": "DNG raw", ".cr2": "Canon raw", ".cr3": "Canon raw",
                          ".nef": "Nikon raw", ".arw": "Sony raw", ".orf": "Olympus raw", ".rw2": "Panasonic raw",
                          ".raf": "Fujifilm raw", ".psd": "Photoshop", ".svg": "SVG"}
_CONVERT_HINT = "convert to JPEG or PNG"
_HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"

#: Largest accepted image, in pixels (width x height after decoding the header).
DEFAULT_MAX_PIXELS = 400_000_000
#: With the default ``max_pixels``, an image of more than BOMB_MIN_PIXELS whose raw RGB size
#: is over BOMB_RATIO times its file size is refused: photos compress 5-50x (deflate at most
#: ~1000x); a 431 KB PNG that expands to 400 MP (4.6 GB while decoding) is a decompression bomb.
BOMB_MIN_PIXELS = 50_000_000
BOMB_RATIO = 400

_ORIENTATION_TAG = 0x0112
_PILLOW_LIMIT_LOCK = threading.Lock()


class ImageLoadError(Exception):
    """An input could not be turned into an image; ``str(exc)`` is a one-line reason."""


@dataclass
class LoadedImage:
    """A decoded, upright photo.

    Attributes:
        rgb: (H, W, 3) uint8, full resolution, EXIF orientation applied.
        path: the file it came from.
        width, height: size of ``rgb`` (after orientation).
        stored_width, stored_height: size as stored in the file (before orientation).
        exif_orientation: EXIF orientation value 1..8 (1 when absent).
        format: Pillow's format name, e.g. ``"JPEG"``.
        source_mode: Pillow mode before conversion, e.g. ``"RGBA"``, ``"I;16"``, ``"CMYK"``.
        had_alpha: True when transparency was composited over white.
        sha256: hex SHA-256 of the file's bytes.
        file_size: size of the file in bytes.
    """

    rgb: np.ndarray
    path: Path
    width: int
    height: int
    stored_width: int
    stored_height: int
    exif_orientation: int
    format: str
    source_mode: str
    had_alpha: bool
    sha256: str
    file_size: int

    @property
    def exif_rotated(self) -> bool:
        """True when an EXIF orientation other than 1 was applied."""
        return self.exif_orientation != 1


# --------------------------------------------------------------------------- reading


def read_bytes(path: str | os.PathLike) -> bytes:
    """Read a whole file, translating OS errors into :class:`ImageLoadError`."""
    path = Path(path)
    try:
        with open(path, "rb") as handle:
            data = handle.read()
    except FileNotFoundError:
        raise ImageLoadError("no such file") from None
    except IsADirectoryError:
        raise ImageLoadError("is a directory, not a file") from None
    except PermissionError:
        raise ImageLoadError("permission denied (file is not readable)") from None
    except OSError as exc:
        raise ImageLoadError(f"cannot read file: {exc.strerror or exc}") from None
    if not data:
        raise ImageLoadError("empty file (0 bytes)")
    return data


def sha256_hex(data: bytes) -> str:
    """Hex SHA-256 digest of ``data``."""
    return hashlib.sha256(data).hexdigest()


def file_sha256(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """Hex SHA-256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def load_image(path: str | os.PathLike, *, data: bytes | None = None, sha256: str | None = None,
               max_pixels: int = DEFAULT_MAX_PIXELS) -> LoadedImage:
    """Load ``path`` as an upright RGB uint8 image (see the module notes).

    Args:
        path: the image file.
        data: the file's bytes when already read (avoids reading twice).
        sha256: their hex SHA-256 when already computed.
        max_pixels: refuse images with more pixels than this.

    Raises:
        ImageLoadError: with a one-line reason.
    """
    path = Path(path)
    if data is None:
        data = read_bytes(path)
    if not data:
        raise ImageLoadError("empty file (0 bytes)")
    rgb, info = decode_image(data, max_pixels=max_pixels)
    return LoadedImage(rgb=rgb, path=path, width=rgb.shape[1], height=rgb.shape[0], sha256=sha256 or sha256_hex(data),
                       file_size=len(data), **info)


def decode_image(data: bytes, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> tuple[np.ndarray, dict]:
    """Decode image bytes to an upright (H, W, 3) uint8 RGB array.

    Returns:
        (rgb, info) where info has stored_width, stored_height, exif_orientation, format,
        source_mode and had_alpha.

    Raises:
        ImageLoadError: with a one-line reason.
    """
    from PIL import Image, UnidentifiedImageError

    if data[:8] == _HDF5_SIGNATURE:  # Pillow may take it for a 0x0 image
        raise ImageLoadError(sniff_unsupported(data))

    with _PILLOW_LIMIT_LOCK:
        # Pillow's own decompression-bomb guard is replaced by ``max_pixels``, which is
        # checked from the header below, before any pixel is decoded.
        saved_limit = Image.MAX_IMAGE_PIXELS
        Image.MAX_IMAGE_PIXELS = None
        try:
            image = Image.open(io.BytesIO(data))
        except UnidentifiedImageError:
            raise ImageLoadError(_unidentified_reason(data)) from None
        except Exception as exc:  # noqa: BLE001 - any decoder failure is a bad input
            raise ImageLoadError(f"cannot read image header: {_short(exc)}") from None
        finally:
            Image.MAX_IMAGE_PIXELS = saved_limit

    with image:
        width, height = image.size
        if width <= 0 or height <= 0:
            raise ImageLoadError(f"invalid image size {width}x{height}")
        if width * height > max_pixels:
            raise ImageLoadError(
                f"image too large: {width}x{height} = {width * height / 1e6:.0f} MP exceeds the "
                f"{max_pixels / 1e6:.0f} MP limit (--max-pixels)")
        pixels = width * height
        if (max_pixels == DEFAULT_MAX_PIXELS and pixels > BOMB_MIN_PIXELS
                and 3 * pixels > BOMB_RATIO * len(data)):
            raise ImageLoadError(
                f"refused as a likely decompression bomb: {width}x{height} = {pixels / 1e6:.0f} MP from only "
                f"{len(data) / 1e3:.0f} KB would take about {pixels * 11 / 1e9:.1f} GB of memory "
                "(give --max-pixels to decode it anyway)")
        fmt = image.format or "unknown"
        try:
            orientation = int(image.getexif().get(_ORIENTATION_TAG, 1) or 1)
        except Exception:  # noqa: BLE001 - broken EXIF is ignored, not fatal
            orientation = 1
        if orientation not in range(1, 9):
            orientation = 1
        try:
            image.load()
        except MemoryError:
            raise ImageLoadError(f"not enough memory to decode {width}x{height} image") from None
        except Exception as exc:  # noqa: BLE001
            text = str(exc)
            if "truncated" in text.lower() or isinstance(exc, EOFError):
                raise ImageLoadError("truncated or corrupt image data (file ends early)") from None
            raise ImageLoadError(f"cannot decode {fmt} image: {_short(exc)}") from None
        mode = image.mode
        rgb, had_alpha = _to_rgb8(image)
    rgb = apply_orientation(rgb, orientation)
    return np.ascontiguousarray(rgb), {
        "stored_width": width, "stored_height": height, "exif_orientation": orientation,
        "format": fmt, "source_mode": mode, "had_alpha": had_alpha,
    }


def _short(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= 160 else text[:157] + "..."


def sniff_unsupported(data: bytes) -> str | None:
    """A one-line reason when ``data`` is a known format that is not read (HEIC, GIF, an
    HDF5 file...), else None."""
    head = data[:64]
    if head.startswith(_HDF5_SIGNATURE):
        return ("an HDF5 file, not an image (a detections .h5 must be the only input of `facerecon fit`)")
    if head.startswith((b"GIF87a", b"GIF89a")):
        return f"unsupported image format GIF ({_CONVERT_HINT})"
    if head[4:8] == b"ftyp":
        brand = head[8:12]
        names = {b"heic": "HEIC", b"heix": "HEIC", b"hevc": "HEIC", b"heim": "HEIC", b"heis": "HEIC",
                 b"mif1": "HEIF", b"msf1": "HEIF", b"avif": "AVIF", b"avis": "AVIF", b"crx ": "Canon raw (CR3)"}
        if brand in names:
            return f"unsupported image format {names[brand]} ({_CONVERT_HINT})"
    if head.startswith(b"\xff\x0a") or head.startswith(b"\x00\x00\x00\x0cJXL "):
        return f"unsupported image format JPEG XL ({_CONVERT_HINT})"
    if head.startswith(b"8BPS"):
        return f"unsupported image format Photoshop ({_CONVERT_HINT})"
    return None


def _unidentified_reason(data: bytes) -> str:
    known = sniff_unsupported(data)
    if known:
        return known
    head = data[:512]
    try:
        head.decode("utf-8")
        looks_text = all(b >= 9 for b in head)
    except UnicodeDecodeError:
        looks_text = False
    if looks_text:
        return "not an image (the file contains text)"
    return "not an image (unrecognised file format)"


def _to_rgb8(image) -> tuple[np.ndarray, bool]:
    """Convert a loaded Pillow image to (H, W, 3) uint8; returns (rgb, had_alpha)."""
    mode = image.mode
    if mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        values = np.asarray(image)
        if mode == "I" and values.size and values.max() > 65535:
            values = values.astype(np.float64) * (255.0 / float(values.max()))
        else:
            values = values.astype(np.float64) / 257.0
        grey = np.clip(np.rint(values), 0, 255).astype(np.uint8)
        return np.repeat(grey[:, :, None], 3, axis=2), False
    if mode == "F":
        values = np.nan_to_num(np.asarray(image, dtype=np.float64))
        if values.size and values.max() <= 1.0:
            values = values * 255.0
        grey = np.clip(np.rint(values), 0, 255).astype(np.uint8)
        return np.repeat(grey[:, :, None], 3, axis=2), False
    has_alpha = mode in ("RGBA", "LA", "PA", "RGBa", "La") or (mode in ("P", "L", "RGB")
                                                               and "transparency" in image.info)
    if has_alpha:
        rgba = np.asarray(image.convert("RGBA"))
        alpha = rgba[:, :, 3:4].astype(np.uint16)
        if mode in ("RGBa", "La"):  # premultiplied: colour already scaled by alpha
            rgb = rgba[:, :, :3].astype(np.uint16) + (255 - alpha)
        else:
            rgb = (rgba[:, :, :3].astype(np.uint16) * alpha + 255 * (255 - alpha) + 127) // 255
        return np.clip(rgb, 0, 255).astype(np.uint8), True
    if mode != "RGB":
        image = image.convert("RGB")
    return np.asarray(image), False


def apply_orientation(array: np.ndarray, orientation: int) -> np.ndarray:
    """Return ``array`` (H, W, ...) as displayed under EXIF ``orientation`` (1..8).

    The result may be a view; same transforms as Pillow's ``ImageOps.exif_transpose``.
    """
    if orientation == 2:
        return array[:, ::-1]
    if orientation == 3:
        return array[::-1, ::-1]
    if orientation == 4:
        return array[::-1]
    if orientation == 5:
        return np.swapaxes(array, 0, 1)
    if orientation == 6:
        return np.rot90(array, k=-1)
    if orientation == 7:
        return np.swapaxes(array, 0, 1)[::-1, ::-1]
    if orientation == 8:
        return np.rot90(array, k=1)
    return array


# --------------------------------------------------------------------------- inputs


class CollectedInputs(list):
    """A list of ``(path, key)`` pairs, plus ``problems``: ``(argument, reason)`` pairs for
    arguments that matched nothing usable."""

    def __init__(self, items: Iterable[tuple[Path, str]] = (), problems: Iterable[tuple[str, str]] = ()):
        super().__init__(items)
        self.problems: list[tuple[str, str]] = list(problems)


def input_key(path: str | os.PathLike, base: str | os.PathLike | None = None) -> str:
    """Stable key for an input file: its path relative to ``base`` (default: the current
    directory) with ``/`` separators when the file lies below ``base``, otherwise its
    absolute path without the leading root. Unicode and spaces are kept as they are."""
    base_path = Path(os.path.abspath(base if base is not None else os.getcwd()))
    absolute = Path(os.path.abspath(path))
    try:
        return absolute.relative_to(base_path).as_posix()
    except ValueError:
        return absolute.as_posix().lstrip("/").replace(":", "")


def _is_image_name(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_EXTENSIONS


def _is_below(real: str, folders: list[str]) -> bool:
    """``real`` (a real path) is one of ``folders`` (real paths) or lies below one."""
    return any(real == f or real.startswith(f.rstrip(os.sep) + os.sep) for f in folders)


def _count_unsupported(path: Path, unsupported: dict[str, int]) -> None:
    """Count ``path`` in ``unsupported`` (format name -> count) when its format is one of
    :data:`UNSUPPORTED_EXTENSIONS`."""
    kind = UNSUPPORTED_EXTENSIONS.get(path.suffix.lower())
    if kind is not None:
        unsupported[kind] = unsupported.get(kind, 0) + 1


def _walk_folder(folder: Path, unsupported: dict[str, int], excluded: list[str]) -> list[tuple[Path, str]]:
    """Image files below ``folder`` as ``(path, real path)``, sorted by path; folders in
    ``excluded`` (real paths) are not entered and files that resolve into one are left out;
    ``unsupported`` counts the skipped files of a format in :data:`UNSUPPORTED_EXTENSIONS`."""
    if excluded and _is_below(os.path.realpath(folder), excluded):
        return []
    found: list[tuple[Path, str]] = []
    for root, dirs, files in os.walk(folder, followlinks=False):
        dirs[:] = sorted(d for d in dirs if not d.startswith(".") and not (
            excluded and _is_below(os.path.realpath(os.path.join(root, d)), excluded)))
        for name in sorted(files):
            if name.startswith("."):
                continue
            path = Path(root) / name
            if not _is_image_name(path):
                _count_unsupported(path, unsupported)
                continue
            real = os.path.realpath(path)
            if not _is_below(real, excluded):
                found.append((path, real))
    return sorted(found, key=lambda item: item[0].as_posix())


def _glob_files(pattern: str, unsupported: dict[str, int], excluded: list[str]
                ) -> tuple[Path, list[tuple[Path, str]]]:
    """The fixed leading folder of a glob ``pattern`` and the image files it matches (folders
    it matches searched by :func:`_walk_folder`), as ``(path, real path)``; matches in
    ``excluded`` (real paths) are left out."""
    expanded = os.path.expanduser(pattern)
    prefix = []
    for part in Path(expanded).parts:
        if glob.has_magic(part):
            break
        prefix.append(part)
    files: list[tuple[Path, str]] = []
    for match in (Path(m) for m in sorted(glob.glob(expanded, recursive=True))):
        if match.is_dir():
            files += _walk_folder(match, unsupported, excluded)
            continue
        real = os.path.realpath(match)
        if _is_below(real, excluded):
            continue
        if _is_image_name(match):
            files.append((match, real))
        else:
            _count_unsupported(match, unsupported)
    return (Path(*prefix) if prefix else Path(".")), files


def _unsupported_note(unsupported: dict[str, int]) -> str:
    count = sum(unsupported.values())
    kinds = ", ".join(sorted(unsupported))
    files = "file" if count == 1 else "files"
    formats = "format" if len(unsupported) == 1 else "formats"
    return f"skipped {count} {files} in unsupported {formats} {kinds} ({_CONVERT_HINT})"


def collect_inputs(inputs: Iterable[str | os.PathLike], base: str | os.PathLike | None = None,
                   exclude: Iterable[str | os.PathLike] = ()) -> CollectedInputs:
    """Expand files, folders (recursively) and glob patterns into ``(path, key)`` pairs.

    * a file is taken whatever its extension (a bad one fails later with a reason);
    * folders and globs contribute only files with an image extension
      (:data:`IMAGE_EXTENSIONS`); hidden files and folders are skipped;
    * an argument that exists neither as a path nor as a matching glob is reported in
      ``problems``; a folder or glob without images likewise;
    * files below a folder of ``exclude`` (the command's own output folder) are not taken
      from folders and globs;
    * duplicates (the same file reached twice) are dropped, first occurrence wins;
    * order: arguments in the order given, files within a folder sorted by path.

    Keys are relative to the argument that named the file, so they do not depend on the
    current directory: a file argument gives its name, a folder argument the path below
    the folder, a glob the path below the pattern's fixed leading folder. When two
    arguments would give the same key to different files, the later file gets its path
    relative to ``base`` (default: current directory, see :func:`input_key`) instead.
    """
    result = CollectedInputs()
    excluded = [os.path.realpath(e) for e in exclude]
    seen: set[str] = set()
    keys: set[str] = set()

    def add(path: Path, real: str, root: Path | None) -> None:
        if real in seen:
            return
        seen.add(real)
        key = input_key(path, root) if root is not None else path.name
        if key in keys:
            key = input_key(path, base)
        keys.add(key)
        result.append((path, key))

    for raw in inputs:
        text = os.fspath(raw)
        path = Path(text).expanduser()
        unsupported: dict[str, int] = {}
        if path.is_dir():
            root, files = path, _walk_folder(path, unsupported, excluded)
            nothing = "folder contains no image files"
        elif path.exists() or path.is_symlink():
            add(path, os.path.realpath(path), None)
            continue
        elif glob.has_magic(text):
            root, files = _glob_files(text, unsupported, excluded)
            nothing = "pattern matches no image files"
        else:
            result.problems.append((text, "no such file or directory"))
            continue
        if unsupported:
            result.problems.append((text, _unsupported_note(unsupported)))
        elif not files:
            result.problems.append((text, nothing))
        for file, real in files:
            add(file, real, root)
    return result
