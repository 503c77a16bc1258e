"""Regression tests for the reliability cases of issue #17 (names, huge inputs, bad options,
outputs that must match fits.h5, one-line error messages)."""

from __future__ import annotations

import errno
import json
import shutil
import signal
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
