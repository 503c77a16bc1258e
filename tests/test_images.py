"""Image loading (formats, orientation, bad files) and input collection."""

from __future__ import annotations

import hashlib
import os
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageOps

from facerecon.io.images import (ImageLoadError, apply_orientation, collect_inputs, decode_image, input_key,
                                 load_image)
from tests.helpers_detect import astronaut, can_make_unreadable, save_rgb, truncated_copy, write_flat_png


@pytest.fixture(scope="module")
def photo() -> np.ndarray:
    # non-square so that a wrong rotation or transposition cannot go unnoticed
    return astronaut()[:, 40:440]


def _close(a: np.ndarray, b: np.ndarray, tol: float) -> bool:
    return a.shape == b.shape and float(np.abs(a.astype(float) - b.astype(float)).mean()) <= tol


# --------------------------------------------------------------------------- formats


@pytest.mark.parametrize("name, kwargs, tol", [
    ("a.png", {}, 0.0), ("a.bmp", {}, 0.0), ("a.tif", {}, 0.0), ("a.webp", {"quality": 95}, 3.0),
    ("a.jpg", {"quality": 95}, 3.0),
])
def test_rgb_formats_load(tmp_path, photo, name, kwargs, tol):
    loaded = load_image(save_rgb(tmp_path / name, photo, **kwargs))
    assert loaded.rgb.dtype == np.uint8 and loaded.rgb.shape == photo.shape
    assert _close(loaded.rgb, photo, tol)
    assert (loaded.width, loaded.height) == (photo.shape[1], photo.shape[0])


def test_grayscale_becomes_three_equal_channels(tmp_path, photo):
    grey = np.asarray(Image.fromarray(photo).convert("L"))
    loaded = load_image(save_rgb(tmp_path / "g.png", grey))
    assert loaded.rgb.shape == photo.shape and loaded.source_mode == "L"
    assert np.array_equal(loaded.rgb[:, :, 0], grey) and np.array_equal(loaded.rgb[:, :, 2], grey)


def test_cmyk_jpeg_and_tiff_convert_to_rgb(tmp_path, photo):
    for name in ("c.jpg", "c.tif"):
        path = tmp_path / name
        Image.fromarray(photo).convert("CMYK").save(path, **({"quality": 95} if name.endswith("jpg") else {}))
        loaded = load_image(path)
        assert loaded.source_mode == "CMYK"
        assert _close(loaded.rgb, photo, 4.0), name


def test_16bit_grey_png_is_scaled_to_8_bits(tmp_path):
    values = np.array([[0, 257, 257 * 100], [257 * 200, 65535, 32896]], dtype=np.uint16)
    path = tmp_path / "g16.png"
    Image.fromarray(values).save(path)
    loaded = load_image(path)
    assert loaded.source_mode.startswith("I")
    assert loaded.rgb[:, :, 1].tolist() == [[0, 1, 100], [200, 255, 128]]


def test_16bit_rgb_png_and_tiff(tmp_path, photo):
    import cv2

    deep = photo[:, :, ::-1].astype(np.uint16) * 257  # BGR for OpenCV
    for name in ("d.png", "d.tif"):
        cv2.imwrite(str(tmp_path / name), deep)
        assert np.array_equal(load_image(tmp_path / name).rgb, photo), name


def test_palette_png_with_and_without_transparency(tmp_path, photo):
    pal = Image.fromarray(photo).convert("P", palette=Image.ADAPTIVE, colors=256)
    pal.save(tmp_path / "p.png")
    plain = load_image(tmp_path / "p.png")
    assert plain.source_mode == "P" and not plain.had_alpha and _close(plain.rgb, photo, 4.0)
    index = int(np.asarray(pal)[0, 0])
    pal.save(tmp_path / "pt.png", transparency=index)
    clear = load_image(tmp_path / "pt.png")
    assert clear.had_alpha
    transparent = np.asarray(pal) == index
    assert (clear.rgb[transparent] == 255).all()  # composited on white


def test_rgba_is_composited_over_white(tmp_path, photo):
    alpha = np.zeros(photo.shape[:2], dtype=np.uint8)
    alpha[:, photo.shape[1] // 2:] = 255
    alpha[:10, :10] = 128
    path = save_rgb(tmp_path / "a.png", np.dstack([photo, alpha]))
    loaded = load_image(path)
    assert loaded.had_alpha and loaded.source_mode == "RGBA"
    assert (loaded.rgb[20:, :photo.shape[1] // 2 - 1] == 255).all()
    assert np.array_equal(loaded.rgb[:, photo.shape[1] // 2:], photo[:, photo.shape[1] // 2:])
    expected = (photo[:10, :10].astype(int) * 128 + 255 * 127 + 127) // 255
    assert np.abs(loaded.rgb[:10, :10].astype(int) - expected).max() <= 1


def test_grey_with_alpha(tmp_path, photo):
    grey = np.asarray(Image.fromarray(photo).convert("L"))
    Image.fromarray(np.dstack([grey, np.full_like(grey, 255)]), mode="LA").save(tmp_path / "la.png")
    loaded = load_image(tmp_path / "la.png")
    assert np.array_equal(loaded.rgb[:, :, 0], grey)


# --------------------------------------------------------------------------- orientation


@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_matches_pillow(tmp_path, photo, orientation):
    image = Image.fromarray(photo)
    exif = image.getexif()
    exif[0x0112] = orientation
    path = tmp_path / f"o{orientation}.jpg"
    image.save(path, exif=exif.tobytes(), quality=95)
    loaded = load_image(path)
    with Image.open(path) as reference:
        expected = np.asarray(ImageOps.exif_transpose(reference).convert("RGB"))
    assert np.array_equal(loaded.rgb, expected)
    assert loaded.exif_orientation == orientation
    assert loaded.exif_rotated == (orientation != 1)
    assert (loaded.stored_width, loaded.stored_height) == (photo.shape[1], photo.shape[0])
    swapped = orientation >= 5
    assert (loaded.width, loaded.height) == ((photo.shape[0], photo.shape[1]) if swapped
                                             else (photo.shape[1], photo.shape[0]))


def test_apply_orientation_round_trip_sizes():
    a = np.arange(6 * 4).reshape(6, 4)
    assert apply_orientation(a, 6).shape == (4, 6)
    assert np.array_equal(apply_orientation(a, 6)[0], a[::-1, 0])  # 90 degrees clockwise
    assert np.array_equal(apply_orientation(a, 8)[0], a[:, -1])     # 90 degrees counter-clockwise


# --------------------------------------------------------------------------- bad files


def test_bad_files_raise_one_line_reasons(tmp_path, photo):
    empty = tmp_path / "empty.jpg"
    empty.write_bytes(b"")
    text = tmp_path / "notes.jpg"
    text.write_text("this is not a picture\n")
    jpg = save_rgb(tmp_path / "ok.jpg", photo, quality=90)
    cases = {
        empty: "empty file",
        text: "not an image",
        truncated_copy(jpg, tmp_path / "half.jpg"): "truncated",
        truncated_copy(save_rgb(tmp_path / "ok.png", photo), tmp_path / "half.png"): "truncated",
        tmp_path / "missing.png": "no such file",
        tmp_path: "directory",
    }
    for path, reason in cases.items():
        with pytest.raises(ImageLoadError) as info:
            load_image(path)
        message = str(info.value)
        assert reason in message and "\n" not in message, (path, message)


def test_unreadable_file(tmp_path, photo):
    path = save_rgb(tmp_path / "locked.png", photo)
    if not can_make_unreadable(path):
        pytest.skip("running as root: chmod 000 does not stop reading")
    with pytest.raises(ImageLoadError, match="permission denied"):
        load_image(path)


def test_permission_error_is_reported_even_as_root(tmp_path, photo, monkeypatch):
    # root reads chmod 000 files, so the OS error is simulated here
    import facerecon.io.images as images

    path = save_rgb(tmp_path / "p.png", photo)

    def refuse(*_args, **_kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(images, "open", refuse, raising=False)
    with pytest.raises(ImageLoadError, match="permission denied"):
        load_image(path)


def test_pixel_limit_is_checked_from_the_header(tmp_path):
    path = write_flat_png(tmp_path / "wide.png", 30000, 20)  # 0.6 MP, tiny file
    with pytest.raises(ImageLoadError, match="too large"):
        load_image(path, max_pixels=100_000)
    assert load_image(path).rgb.shape == (20, 30000, 3)
    # a header claiming 60000x60000 (3.6 GP) is refused at once, never decoded
    huge = tmp_path / "huge.png"
    data = bytearray(path.read_bytes())
    data[16:24] = struct.pack(">II", 60000, 60000)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])) & 0xFFFFFFFF)
    huge.write_bytes(bytes(data))
    with pytest.raises(ImageLoadError, match="too large: 60000x60000"):
        load_image(huge)


def test_pillow_bomb_guard_is_restored(tmp_path):
    path = write_flat_png(tmp_path / "w.png", 64, 64)
    limit = Image.MAX_IMAGE_PIXELS
    decode_image(path.read_bytes())
    assert Image.MAX_IMAGE_PIXELS == limit


def test_sha256_and_size(tmp_path, photo):
    path = save_rgb(tmp_path / "a.png", photo)
    loaded = load_image(path)
    assert loaded.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    assert loaded.file_size == path.stat().st_size


# --------------------------------------------------------------------------- inputs


def test_collect_inputs_files_folders_globs(tmp_path, photo, monkeypatch):
    monkeypatch.chdir(tmp_path)
    root = tmp_path / "photos"
    save_rgb(root / "a.jpg", photo)
    save_rgb(root / "sub dir" / "ünï cödé ✓.PNG", photo)
    save_rgb(root / "sub dir" / "deeper" / "c.webp", photo)
    (root / "notes.txt").write_text("x")
    (root / ".hidden.jpg").write_bytes(b"x")
    save_rgb(tmp_path / "single.bmp", photo)
    (tmp_path / "odd.dat").write_bytes(b"x")

    got = collect_inputs(["photos", "single.bmp", "odd.dat", "photos/*.jpg", "nope.jpg", "*.none"])
    keys = [key for _path, key in got]
    assert keys == ["a.jpg", "sub dir/deeper/c.webp", "sub dir/ünï cödé ✓.PNG",
                    "single.bmp", "odd.dat"]  # duplicates from the glob dropped, explicit file kept
    assert dict(got.problems) == {"nope.jpg": "no such file or directory",
                                  "*.none": "pattern matches no image files"}
    for path, _key in got:
        assert Path(path).is_file()

    # keys do not depend on the current directory, nor on how the folder is spelled
    monkeypatch.chdir(tmp_path / "photos" / "sub dir")
    again = collect_inputs([str(tmp_path / "photos"), "../../single.bmp"])
    assert [k for _p, k in again] == keys[:4]
    # a glob's keys are relative to its fixed leading folder
    assert [k for _p, k in collect_inputs([str(tmp_path / "photos" / "*.jpg")])] == ["a.jpg"]


def test_colliding_keys_fall_back_to_longer_paths(tmp_path, photo, monkeypatch):
    monkeypatch.chdir(tmp_path)
    save_rgb(tmp_path / "one" / "x.jpg", photo)
    save_rgb(tmp_path / "two" / "x.jpg", photo)
    got = collect_inputs(["one", "two"])
    assert [k for _p, k in got] == ["x.jpg", "two/x.jpg"]


def test_input_key_outside_base(tmp_path):
    key = input_key(tmp_path / "x.jpg", base=tmp_path / "elsewhere")
    assert not key.startswith("/") and key.endswith("x.jpg") and os.path.isabs("/" + key)


def test_empty_folder_is_a_problem(tmp_path):
    (tmp_path / "empty").mkdir()
    got = collect_inputs([str(tmp_path / "empty")])
    assert list(got) == [] and got.problems[0][1] == "folder contains no image files"


def test_the_output_folder_is_left_out_without_being_walked(tmp_path, photo, monkeypatch):
    root = tmp_path / "photos"
    save_rgb(root / "a.jpg", photo)
    save_rgb(root / "out" / "meshes" / "b.jpg", photo)
    (root / "out" / "c.heic").write_bytes(b"x")  # not counted as a skipped file either
    (root / "d.gif").write_bytes(b"x")
    os.symlink(root / "out" / "meshes" / "b.jpg", root / "link.jpg")  # a file that resolves into it
    walked = []
    walk = os.walk

    def counting_walk(top, *args, **kwargs):
        for entry in walk(top, *args, **kwargs):
            walked.append(Path(entry[0]).resolve())
            yield entry

    monkeypatch.setattr(os, "walk", counting_walk)
    for argument in (root, root / "*"):
        walked.clear()
        got = collect_inputs([str(argument)], exclude=[root / "out"])
        assert [key for _path, key in got] == ["a.jpg"], argument
        assert got.problems == [(str(argument), "skipped 1 file in unsupported format GIF (convert to JPEG or PNG)")]
        assert not [folder for folder in walked if folder.is_relative_to(root / "out")], argument
    walked.clear()
    inside = collect_inputs([str(root / "out" / "meshes")], exclude=[root / "out"])
    assert list(inside) == [] and inside.problems == [(str(root / "out" / "meshes"), "folder contains no image files")]
    assert walked == []
    # a file named on the command line is taken even there
    assert [key for _path, key in collect_inputs([str(root / "out" / "meshes" / "b.jpg")], exclude=[root])] == ["b.jpg"]
