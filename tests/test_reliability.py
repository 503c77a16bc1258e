"""Regression tests for the reliability cases of issue #17 (names, huge inputs, bad options,
outputs that must match fits.h5, one-line error messages)."""

from __future__ import annotations

import errno
import json
import shutil
import signal
import sys
import threading
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
from click.testing import CliRunner

from facerecon.cli import main
from facerecon.fitting.optimize import FitSettings
from facerecon.stages.fit import FitOptions, output_names, run_fit
from tests.helpers_detect import astronaut, save_rgb

FAST = FitSettings(landmark_steps=3, coarse_steps=1, fine_steps=0)


def _options(model_file, **kwargs) -> FitOptions:
    kwargs.setdefault("texture_size", 64)
    kwargs.setdefault("overlays", False)
    return FitOptions(face_model=str(model_file), settings=FAST, **kwargs)


def _small_face(path: Path, size: int = 256) -> Path:
    from PIL import Image

    return save_rgb(path, np.asarray(Image.fromarray(astronaut()).resize((size, size))))


def _mesh_vertices(path: Path) -> np.ndarray:
    return np.array([line.split()[1:] for line in path.read_text().splitlines() if line.startswith("v ")], float)


# --------------------------------------------------------------------------- case 1: names


def test_names_that_clean_alike_never_share_files():
    names = output_names(["a b.jpg", "a_b.jpg", "x/a b.jpg", "A_B.png"])
    assert len({n.casefold() for k, n in names.items() if "/" not in k}) == 3
    assert names["a b.jpg"].startswith("a_b_")  # the name that needed cleaning gives way
    assert output_names(["a b.jpg", "a_b.jpg"])["a_b.jpg"] == "a_b"
    assert names == output_names(reversed(list(names)))  # order does not matter
    # a name recorded by an earlier run stays, the newcomer gets another one
    later = output_names(["a b.jpg", "a_b.jpg"], recorded={"a b.jpg": "a_b"})
    assert later["a b.jpg"] == "a_b" and later["a_b.jpg"] != "a_b"


def test_fit_and_export_keep_photos_whose_names_clean_alike_apart(ict_embedded_model_file, tmp_path):
    photos = tmp_path / "photos"
    _small_face(photos / "a_b.png")
    out = tmp_path / "out"
    first = run_fit([str(photos)], out, _options(ict_embedded_model_file))
    assert first.images == {"a_b.png": "ok"}
    before = (out / "meshes" / "a_b_face0.obj").read_bytes()
    # a second person whose name cleans to the same stem, added later (across runs)
    rgb = np.asarray(astronaut())[:, ::-1].copy()
    from PIL import Image

    save_rgb(photos / "a b.png", np.asarray(Image.fromarray(rgb).resize((256, 256))))
    second = run_fit([str(photos)], out, _options(ict_embedded_model_file))
    assert second.images == {"a b.png": "ok", "a_b.png": "skipped"}
    assert (out / "meshes" / "a_b_face0.obj").read_bytes() == before
    objs = sorted(p.name for p in (out / "meshes").glob("*.obj"))
    assert len(objs) == 2, objs
    result = CliRunner().invoke(main, ["export", str(out / "fits.h5"), "--out", str(tmp_path / "ex"),
                                       "--format", "obj", "--json"])
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in (tmp_path / "ex" / "meshes").glob("*.obj")) == objs
    assert (tmp_path / "ex" / "meshes" / "a_b_face0.obj").read_bytes() == before


# --------------------------------------------------------------------------- case 2: long names


@pytest.mark.parametrize("stem", ["x" * 236, "人" * 74])
def test_a_very_long_file_name_is_fitted(ict_embedded_model_file, tmp_path, stem):
    photos = tmp_path / "photos"
    _small_face(photos / f"{stem}.png")
    summary = run_fit([str(photos)], tmp_path / "out", _options(ict_embedded_model_file, overlays=True))
    assert summary.images == {f"{stem}.png": "ok"}, summary.image_reasons
    files = [p for p in (tmp_path / "out" / "meshes").iterdir()]
    assert files and all(len(p.name.encode()) < 200 for p in files)


# --------------------------------------------------------------------------- cases 8, 9: outputs match fits.h5


def test_output_options_apply_to_a_finished_output(ict_embedded_model_file, tmp_path):
    photos = tmp_path / "photos"
    _small_face(photos / "a.png")
    out = tmp_path / "out"
    assert run_fit([str(photos)], out, _options(ict_embedded_model_file)).images == {"a.png": "ok"}
    canonical = _mesh_vertices(out / "meshes" / "a_face0.obj")
    assert not (out / "meshes" / "a_face0.glb").exists()
    again = run_fit([str(photos)], out, _options(ict_embedded_model_file, formats=["obj", "ply", "glb"],
                                                  pose="camera"))
    assert again.images == {"a.png": "skipped"}
    assert (out / "meshes" / "a_face0.glb").is_file()
    camera = _mesh_vertices(out / "meshes" / "a_face0.obj")
    assert not np.allclose(camera, canonical)  # the pose asked for now
    mtime = (out / "meshes" / "a_face0.glb").stat().st_mtime_ns
    run_fit([str(photos)], out, _options(ict_embedded_model_file, formats=["glb"], pose="camera"))
    assert (out / "meshes" / "a_face0.glb").stat().st_mtime_ns == mtime  # nothing to redo


def test_refit_with_fewer_faces_removes_the_old_face_files(ict_embedded_model_file, tmp_path):
    photos = tmp_path / "photos"
    _small_face(photos / "a.png")
    out = tmp_path / "out"
    assert run_fit([str(photos)], out, _options(ict_embedded_model_file, overlays=True)).images == {"a.png": "ok"}
    # files of a second face written by an earlier fit that found two faces
    for name in ("meshes/a_face1.obj", "meshes/a_face1.mtl", "meshes/a_face1_texture.png", "meshes/a_face1.ply",
                 "overlays/a_face1.png"):
        (out / name).write_bytes(b"old")
    (out / "meshes" / "a_face10.obj").write_bytes(b"another face")  # not face 1's
    from facerecon.io.store import ResultStore

    with ResultStore(out / "fits.h5", kind="fits", items_group="images") as store:
        attrs = dict(store.item_attrs("a.png"))
        attrs["n_faces"] = 2
        store.write_item("a.png", None, attrs)
    summary = run_fit([str(photos)], out, _options(ict_embedded_model_file, overlays=True, largest=True,
                                                   overwrite=True))
    assert summary.images == {"a.png": "ok"}
    assert not list(out.rglob("a_face1.*")) and not list(out.rglob("a_face1_*"))
    assert (out / "meshes" / "a_face10.obj").exists() and (out / "meshes" / "a_face0.obj").exists()


def test_a_failed_face_neither_keeps_old_files_nor_rewrites_the_others(ict_embedded_model_file, tmp_path,
                                                                          monkeypatch):
    """A photo with a fitted and a failed face: the refit that fails the face removes that
    face's files of an earlier fit, and a rerun over the unchanged fits.h5 leaves the fitted
    face's files alone."""
    import os

    from facerecon.fitting.optimize import FaceFitter
    from tests.helpers_detect import group_photo

    photos = tmp_path / "photos"
    save_rgb(photos / "g.png", group_photo()[0])
    out = tmp_path / "out"
    assert run_fit([str(photos)], out, _options(ict_embedded_model_file)).images == {"g.png": "ok"}
    assert (out / "meshes" / "g_face1.obj").is_file()
    fit = FaceFitter.fit

    def second_face_fails(self, targets, **kwargs):
        result = fit(self, targets, **kwargs)
        result.failed[1], result.reasons[1] = True, "diverged (test)"
        return result

    with monkeypatch.context() as patch:
        patch.setattr(FaceFitter, "fit", second_face_fails)
        refit = run_fit([str(photos)], out, _options(ict_embedded_model_file, overwrite=True))
    assert [(f.face, f.status) for f in refit.faces] == [(0, "ok"), (1, "failed")]
    assert not list((out / "meshes").glob("g_face1*"))  # no mesh of the failed face is left over
    kept = sorted((out / "meshes").glob("g_face0*"))
    assert {p.suffix for p in kept} >= {".obj", ".ply"}
    for path in kept:
        os.utime(path, ns=(10**18, 10**18))
    rerun = run_fit([str(photos)], out, _options(ict_embedded_model_file))
    assert rerun.images == {"g.png": "skipped"}
    assert [path.stat().st_mtime_ns for path in kept] == [10**18] * len(kept)  # not written again


# --------------------------------------------------------------------------- cases 3, 4: huge photos, huge textures


def test_a_photo_wider_than_32767_px_is_detected_and_fitted(ict_embedded_model_file, tmp_path):
    from PIL import Image

    wide = np.full((1200, 33000, 3), 90, np.uint8)
    face = np.asarray(Image.fromarray(astronaut()).resize((400, 400)))
    wide[400:800, 32000:32400] = face
    photos = tmp_path / "photos"
    save_rgb(photos / "wide.png", wide, compress_level=1)
    _small_face(photos / "z_after.png")
    detected = CliRunner().invoke(main, ["detect", str(photos), "--out", str(tmp_path / "det.h5"),
                                         "--detect-max-side", "33000", "--json", "-q"])
    assert detected.exit_code == 0, detected.output

    summary = run_fit([str(tmp_path / "det.h5")], tmp_path / "out", _options(ict_embedded_model_file, overlays=True))
    assert summary.images == {"wide.png": "ok", "z_after.png": "ok"}, summary.image_reasons
    texture = np.asarray(Image.open(tmp_path / "out" / "meshes" / "wide_face0_texture.png"))
    assert texture.std() > 5  # sampled from the photo, not a blank


def test_texture_sampling_takes_more_points_than_one_remap_allows():
    from facerecon.export.texture import _sample

    image = np.arange(4 * 4 * 3, dtype=np.uint8).reshape(4, 4, 3)
    n = 1024 * 32768 + 10  # a 5793 px texture's texels: more map rows than cv2.remap takes
    xy = np.zeros((n, 2), np.float32)
    xy[-10:] = [2.0, 3.0]
    out = _sample(image, xy)
    assert np.allclose(out[-1] * 255, image[3, 2]) and np.allclose(out[0] * 255, image[0, 0])


def test_overlay_warp_of_a_huge_photo_matches_a_plain_warp():
    import cv2

    from facerecon.stages.fit import _warp_region

    rng = np.random.default_rng(0)
    photo = cv2.GaussianBlur(rng.integers(0, 255, (600, 800, 3), dtype=np.uint8), (0, 0), 3)
    m = np.array([[1.2, 0.1, -300.0], [-0.1, 1.2, -200.0]])
    plain = cv2.warpAffine(photo, m, (128, 128), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT)
    assert np.abs(_warp_region(photo, m, 128).astype(int) - plain).max() <= 1
    wide = np.zeros((50, 40000, 3), np.uint8)
    wide[:, 39000:39050] = 200
    m = np.array([[1.0, 0, -39000.0], [0, 1.0, 0]])
    assert _warp_region(wide, m, 64)[10, 20].tolist() == [200, 200, 200]


# --------------------------------------------------------------------------- case 5, 15, 16: bad options


@pytest.mark.parametrize("args", [["detect", "--min-score", "nan"], ["detect", "--skin-prior", "nan"],
                                  ["detect", "--min-score", "inf"], ["fit", "--device", "tpu"]])
def test_bad_option_values_are_usage_errors(astronaut_path, tmp_path, args):
    result = CliRunner().invoke(main, [args[0], str(astronaut_path), "--out", str(tmp_path / "o.h5"), *args[1:]])
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output and not (tmp_path / "o.h5").exists()


@pytest.mark.skipif(__import__("torch").backends.mps.is_available(), reason="this machine has MPS")
def test_unavailable_device_stops_before_detection_without_creating_the_output(ict_embedded_model_file,
                                                                               astronaut_path, tmp_path):
    out = tmp_path / "out"
    result = CliRunner().invoke(main, ["fit", str(astronaut_path), "--out", str(out), "--device", "mps",
                                       "--face-model", str(ict_embedded_model_file)])
    assert result.exit_code == 1, result.output
    assert "mps" in result.output.lower() and "Traceback" not in result.output
    assert not out.exists()


# --------------------------------------------------------------------------- case 6: --out inside the input folder


def test_output_folder_inside_the_input_folder_is_not_fitted(ict_embedded_model_file, tmp_path):
    photos = tmp_path / "photos"
    _small_face(photos / "a.png")
    out = photos / "out"
    assert run_fit([str(photos)], out, _options(ict_embedded_model_file, overlays=True)).images == {"a.png": "ok"}
    assert (out / "contact_sheet.png").is_file()
    again = run_fit([str(photos)], out, _options(ict_embedded_model_file, overlays=True))
    assert again.images == {"a.png": "skipped"}
    assert run_fit([str(photos / "*.png"), str(photos / "**")], out,
                   _options(ict_embedded_model_file)).images == {"a.png": "skipped"}


# --------------------------------------------------------------------------- cases 11, 12: write failures


def _fitted(ict_embedded_model_file, tmp_path) -> Path:
    photos = tmp_path / "photos"
    _small_face(photos / "a.png")
    out = tmp_path / "out"
    assert run_fit([str(photos)], out, _options(ict_embedded_model_file)).images == {"a.png": "ok"}
    return out


def test_export_into_an_unwritable_folder_says_so(ict_embedded_model_file, tmp_path, monkeypatch):
    out = _fitted(ict_embedded_model_file, tmp_path)
    import facerecon.stages.export as export_stage

    def denied(model, stored, params, base, *args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied", str(base) + ".obj")

    monkeypatch.setattr(export_stage, "write_face_files", denied)
    result = CliRunner().invoke(main, ["export", str(out / "fits.h5"), "--out", str(tmp_path / "ro")])
    assert result.exit_code == 1
    assert "permission denied" in result.output and "not a readable fits file" not in result.output
    assert "[Errno" not in result.output


def test_full_disk_while_writing_meshes_names_the_real_cause(ict_embedded_model_file, tmp_path, monkeypatch):
    photos = tmp_path / "photos"
    _small_face(photos / "a.png")
    import facerecon.stages.fit as fit_stage

    def full(model, stored, params, base, *args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(base) + ".obj")

    real_close = fit_stage.ResultStore.close

    def close_fails(self, pack=True):  # packing fails too, but only after the mesh write failed
        real_close(self, pack)
        if sys.exc_info()[0] is None:
            return
        raise OSError("Unable to synchronously flush file (file write failed: errno = 28, "
                      "error message = 'No space left on device')")

    monkeypatch.setattr(fit_stage, "write_face_files", full)
    monkeypatch.setattr(fit_stage.ResultStore, "close", close_fails)
    result = CliRunner().invoke(main, ["fit", str(photos), "--out", str(tmp_path / "out"), "--face-model",
                                       str(ict_embedded_model_file), "--steps", "3", "1", "0", "--texture-size",
                                       "64", "--no-overlays"])
    assert result.exit_code == 1
    lines = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "no space left on device" in lines[0] and "a_face0.obj" in lines[0], result.output
    assert "Unable to synchronously flush" not in result.output


def test_describe_os_error_reads_hdf5_texts():
    from facerecon.errors import describe_os_error

    text = describe_os_error(OSError("Unable to create file (file write failed: errno = 28, error message = 'x')"))
    assert text.startswith("no space left on device")
    assert describe_os_error(PermissionError(errno.EACCES, "Permission denied", "/x/y")) == "permission denied: /x/y"


# --------------------------------------------------------------------------- cases 13, 15: messages


def _heic_bytes() -> bytes:
    return b"\x00\x00\x00\x18ftypheic\x00\x00\x00\x00mif1heic" + b"\x00" * 64


def test_heic_and_gif_inputs_are_named_as_unsupported(tmp_path):
    from facerecon.io.images import ImageLoadError, collect_inputs, load_image

    folder = tmp_path / "phone"
    folder.mkdir()
    (folder / "IMG_1.HEIC").write_bytes(_heic_bytes())
    (folder / "anim.gif").write_bytes(b"GIF89a" + b"\x00" * 64)
    collected = collect_inputs([folder])
    assert not list(collected)
    [(argument, reason)] = collected.problems
    assert "skipped 2 files" in reason and "GIF" in reason and "HEIC" in reason and "unsupported" in reason
    for name, kind in (("IMG_1.HEIC", "HEIC"), ("anim.gif", "GIF")):
        with pytest.raises(ImageLoadError, match=f"unsupported image format {kind}"):
            load_image(folder / name)


def test_an_h5_among_images_is_named(tmp_path):
    from facerecon.io.images import ImageLoadError, load_image

    with h5py.File(tmp_path / "det.h5", "w") as f:
        f.attrs["kind"] = "detections"
    with pytest.raises(ImageLoadError, match="HDF5 file, not an image"):
        load_image(tmp_path / "det.h5")


def test_face_model_folder_is_named_a_folder(tmp_path):
    from facerecon.facemodel.model import FaceModelError
    from facerecon.facemodel.resolve import resolve_face_model_path

    with pytest.raises(FaceModelError, match="is a folder"):
        resolve_face_model_path(str(tmp_path))


def test_contact_sheet_labels_keep_names_apart():
    from facerecon.stages.fit import sheet_label

    labels = {sheet_label(n) for n in ("photo.bmp", "photo.tiff", "photo.webp", "中文.jpg", "日本.jpg")}
    assert len(labels) == 5 and all(label.isascii() and "?" not in label for label in labels)
    assert sheet_label("José.jpg") == "Jose.jpg"


# --------------------------------------------------------------------------- case 16: decompression bomb


def test_a_tiny_file_that_expands_to_hundreds_of_megapixels_is_refused(tmp_path):
    from facerecon.io.images import ImageLoadError, load_image
    from tests.helpers_detect import write_flat_png

    path = write_flat_png(tmp_path / "bomb.png", 9000, 6000)  # 54 MP from ~50 KB
    started = time.perf_counter()
    with pytest.raises(ImageLoadError, match="decompression bomb"):
        load_image(path)
    assert time.perf_counter() - started < 2.0  # refused from the header, nothing decoded
    assert load_image(write_flat_png(tmp_path / "small.png", 300, 200)).rgb.shape == (200, 300, 3)


# --------------------------------------------------------------------------- case 14: Ctrl-C during a long decode


@pytest.mark.parametrize("handler", ["graceful", "plain"])
def test_ctrl_c_is_not_held_up_by_a_long_decode(tmp_path, monkeypatch, handler, request):
    """First Ctrl-C (stop request) and a raw KeyboardInterrupt (what the second Ctrl-C raises)
    both end the batch while the loader thread is still decoding."""
    import contextlib

    import facerecon.stages.detect as detect_stage
    from facerecon.cli.common import graceful_stop

    photos = tmp_path / "photos"
    _small_face(photos / "a.png", 64)
    _small_face(photos / "b.png", 64)
    real_load = detect_stage.load_image

    def slow_load(path, **kwargs):
        time.sleep(4.0)  # a huge image being decoded
        return real_load(path, **kwargs)

    monkeypatch.setattr(detect_stage, "load_image", slow_load)

    class NoAnalyzer:
        def close(self):
            pass

    monkeypatch.setattr(detect_stage, "run_settings", lambda options, analyzer: {"test": 1})
    # a terminal's Ctrl-C reaches the main thread (signal.raise_signal from another thread would
    # signal that thread only). The plain variant repeats it until the run returns, like a user
    # pressing Ctrl-C again: in the full suite a single SIGINT sometimes went unanswered (the run
    # then decoded both photos; cause not found), which is not what this test is about.
    main_thread = threading.main_thread().ident
    finished = threading.Event()

    def press_ctrl_c():
        if finished.wait(0.3):
            return
        signal.pthread_kill(main_thread, signal.SIGINT)
        while handler == "plain" and not finished.wait(0.3):
            signal.pthread_kill(main_thread, signal.SIGINT)

    timer = threading.Thread(target=press_ctrl_c, daemon=True)
    if handler == "plain":
        # Python's own Ctrl-C behaviour, whatever an earlier test of the suite left installed or
        # blocked (in the full suite SIGINT went unanswered here; which test leaks it is not found)
        previous = signal.signal(signal.SIGINT, signal.default_int_handler)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
        request.addfinalizer(lambda: signal.signal(signal.SIGINT, previous))
    started = time.perf_counter()
    with (graceful_stop() if handler == "graceful" else contextlib.nullcontext(lambda: False)) as stop:
        timer.start()
        try:
            summary = detect_stage.run_detect([photos], tmp_path / "det.h5", analyzer=NoAnalyzer(),
                                              should_stop=stop)
        finally:
            finished.set()
        elapsed = time.perf_counter() - started
        timer.join()
    assert summary.interrupted and elapsed < 2.0, elapsed


def test_os_errors_read_as_one_plain_line(ict_embedded_model_file, astronaut_path, tmp_path):
    (tmp_path / "file.txt").write_text("x")
    result = CliRunner().invoke(main, ["fit", str(astronaut_path), "--out", str(tmp_path / "file.txt" / "out"),
                                       "--face-model", str(ict_embedded_model_file)])
    assert result.exit_code == 1
    assert "[Errno" not in result.output and "not a directory: " in result.output, result.output


def test_detect_stage_refuses_nan_settings_before_any_image(tmp_path):
    from facerecon.errors import InputError
    from facerecon.stages.detect import DetectOptions, run_detect

    for options in (DetectOptions(skin_prior=float("nan")), DetectOptions(min_score=float("nan"))):
        with pytest.raises(InputError):
            run_detect([tmp_path], tmp_path / "det.h5", options)
    assert not (tmp_path / "det.h5").exists()
