"""Face-model format, ICT import, annotations, resolution and the `model` command."""

from __future__ import annotations

import json

import h5py
import numpy as np
import pytest
import torch
from click.testing import CliRunner

from facerecon.cli import main
from facerecon.facemodel.annotate import graph_laplacian, symmetric_pairs
from facerecon.facemodel.ict import import_ict
from facerecon.facemodel.model import FaceModelError, load_face_model, save_face_model
from facerecon.facemodel.resolve import FaceModelUnavailable, resolve_face_model_path
from facerecon.facemodel.tensors import FaceModelTensors
from tests.ict_fixtures import write_mini_checkout


def test_ict_import_converts_units_and_keeps_face_area(ict_model, ict_npz):
    raw = np.load(ict_npz)
    assert ict_model.n_vertices == 9409
    np.testing.assert_allclose(ict_model.mean_shape, raw["neutral"][:9409] * 10.0, rtol=1e-6)
    np.testing.assert_allclose(ict_model.identity_basis[5], raw["identity_modes"][5, :9409] * 10.0, rtol=1e-6)
    assert ict_model.n_triangles == 2 * int(np.all(raw["polygons"] < 9409, axis=1).sum())
    assert ict_model.expression_kind == "blendshape"
    assert ict_model.expression_names[:2] == ["browDown_L", "browDown_R"]
    # a face is ~14-16 cm wide between the outer jaw points, in millimetres
    width = np.linalg.norm(ict_model.mean_shape[ict_model.landmarks68[0]] - ict_model.mean_shape[ict_model.landmarks68[16]])
    assert 100 < width < 200


def test_ict_triangles_face_outwards(ict_model):
    v = ict_model.mean_shape.astype(np.float64)
    t = ict_model.triangles
    normals = np.cross(v[t[:, 1]] - v[t[:, 0]], v[t[:, 2]] - v[t[:, 0]])
    centroids = v[t].mean(axis=1)
    skin = np.zeros(len(v), bool)
    skin[ict_model.regions["skin"]] = True
    on_skin = skin[t].all(axis=1)
    # skin triangles point away from the head centre (the ICT origin); reversed winding gives ~0.07
    outward = ((centroids - v.mean(axis=0) * [1, 1, 0]) * normals).sum(axis=1) > 0
    assert outward[on_skin].mean() > 0.9


def test_ict_regions_are_anatomically_placed(ict_model):
    m, lm = ict_model.mean_shape, ict_model.landmarks68
    eyes = m[ict_model.regions["eyes"]]
    mouth = m[ict_model.regions["inner_mouth"]]
    assert len(eyes) > 50 and len(mouth) > 10
    assert abs(eyes[:, 1].mean() - m[lm[36:48], 1].mean()) < 8.0
    assert abs(mouth[:, 1].mean() - m[lm[60:68], 1].mean()) < 8.0
    skin = set(ict_model.regions["skin"].tolist())
    assert not skin & set(ict_model.regions["eyes"].tolist())
    assert not skin & set(ict_model.regions["lips"].tolist())
    photometric = set(ict_model.regions["photometric"].tolist())
    assert skin <= photometric and len(skin) > 0.5 * len(photometric)
    # the photometric region stays in front: no ears (|x| beyond the jaw) or back of the head
    front = ict_model.mean_shape[ict_model.regions["photometric"]]
    jaw_x = np.abs(m[lm[[0, 16]], 0]).max()
    assert np.abs(front[:, 0]).max() < jaw_x + 10 and front[:, 2].min() > m[:, 2].min() + 40


def test_symmetric_pairs_mirror_each_other(ict_model):
    pairs = ict_model.symmetric_pairs
    assert len(pairs) > 1000
    a, b = ict_model.mean_shape[pairs[:, 0]], ict_model.mean_shape[pairs[:, 1]]
    np.testing.assert_allclose(a * [-1, 1, 1], b, atol=1.0)
    assert (a[:, 0] > 0).all() and (b[:, 0] < 0).all()
    # a deliberately asymmetric shape loses the pairs that no longer mirror
    bent = ict_model.mean_shape.copy()
    bent[bent[:, 0] > 0, 2] += 5.0
    assert len(symmetric_pairs(bent)) < 0.1 * len(pairs)


def test_laplacian_albedo_space_is_smooth_and_skin_coloured(ict_model):
    mean, basis = ict_model.albedo_mean, ict_model.albedo_basis
    skin = ict_model.regions["skin"]
    assert np.all((mean >= 0) & (mean <= 1))
    assert mean[skin, 0].mean() > mean[skin, 2].mean()  # skin is redder than blue
    lap = graph_laplacian(ict_model.n_vertices, ict_model.triangles)
    random_field = np.random.default_rng(0).standard_normal(ict_model.n_vertices)
    first_mode = basis[1, :, 0] / np.linalg.norm(basis[1, :, 0])
    rough = random_field / np.linalg.norm(random_field)
    # low-frequency modes have far less Laplacian energy than noise
    assert first_mode @ (lap @ first_mode) < 0.01 * (rough @ (lap @ rough))
    # channel-major: the red block touches only red
    k = basis.shape[0] // 3
    assert np.abs(basis[:k, :, 1:]).max() == 0 and np.abs(basis[k:2 * k, :, 0]).max() == 0


def test_save_load_roundtrip(ict_model, tmp_path):
    path = save_face_model(ict_model, tmp_path / "m.h5")
    loaded = load_face_model(path)
    assert loaded.model_id == ict_model.model_id
    np.testing.assert_array_equal(loaded.triangles, ict_model.triangles)
    np.testing.assert_array_equal(loaded.identity_basis, ict_model.identity_basis)
    np.testing.assert_array_equal(loaded.regions["skin"], ict_model.regions["skin"])
    assert loaded.expression_names == ict_model.expression_names
    with h5py.File(path) as f:
        assert f.attrs["units"] == "mm" and f.attrs["format"] == "facerecon-face-model"


def test_load_rejects_foreign_and_damaged_files(tmp_path, ict_model_file):
    foreign = tmp_path / "foreign.h5"
    with h5py.File(foreign, "w") as f:
        f["x"] = 1
    with pytest.raises(FaceModelError, match="not a facerecon face-model"):
        load_face_model(foreign)
    damaged = tmp_path / "damaged.h5"
    damaged.write_bytes(ict_model_file.read_bytes()[:5000])
    with pytest.raises(FaceModelError, match="cannot read"):
        load_face_model(damaged)
    with pytest.raises(FaceModelError, match="not found"):
        load_face_model(tmp_path / "missing.h5")


def test_validate_catches_inconsistent_arrays(ict_model):
    import dataclasses

    broken = dataclasses.replace(ict_model, triangles=ict_model.triangles + ict_model.n_vertices)
    with pytest.raises(FaceModelError, match="triangles"):
        broken.validate()
    nan_shape = ict_model.mean_shape.copy()
    nan_shape[0, 0] = np.nan
    with pytest.raises(FaceModelError, match="NaN"):
        dataclasses.replace(ict_model, mean_shape=nan_shape).validate()


def test_checkout_import_matches_archive(ict_npz, tmp_path):
    root = write_mini_checkout(ict_npz, tmp_path / "ICT-FaceKit", n_identity=3, n_expression=2)
    from_checkout = import_ict(root, n_identity=3)
    from_npz = import_ict(ict_npz, n_identity=3)
    np.testing.assert_allclose(from_checkout.mean_shape, from_npz.mean_shape, atol=1e-3)
    np.testing.assert_allclose(from_checkout.identity_basis, from_npz.identity_basis[:3], atol=2e-3)
    np.testing.assert_allclose(from_checkout.expression_basis, from_npz.expression_basis[:2], atol=2e-3)
    np.testing.assert_array_equal(from_checkout.triangles, from_npz.triangles)
    np.testing.assert_array_equal(from_checkout.triangle_uv, from_npz.triangle_uv)
    assert from_checkout.expression_names == from_npz.expression_names[:2]


def test_import_errors_are_one_line(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(FaceModelError, match="not an ICT-FaceKit checkout"):
        import_ict(tmp_path / "empty")
    bad = tmp_path / "bad.npz"
    np.savez(bad, neutral=np.zeros((3, 3)))
    with pytest.raises(FaceModelError, match="missing"):
        import_ict(bad)


def test_tensor_model_matches_numpy(ict_model):
    tm = FaceModelTensors(ict_model)
    rng = np.random.default_rng(1)
    ident = rng.standard_normal((2, ict_model.n_identity)).astype(np.float32)
    expr = rng.uniform(0, 1, (2, ict_model.n_expression)).astype(np.float32)
    verts = tm.shape(torch.from_numpy(ident), torch.from_numpy(expr)).numpy()
    expected = (ict_model.mean_shape + np.tensordot(ident, ict_model.identity_basis, 1)
                + np.tensordot(expr, ict_model.expression_basis, 1))
    np.testing.assert_allclose(verts, expected, atol=1e-3)
    alb = tm.albedo(torch.zeros(1, tm.n_albedo)).numpy()[0]
    np.testing.assert_allclose(alb, ict_model.albedo_mean, atol=1e-6)


def test_resolution_order(ict_model_file, monkeypatch, isolated_data_dir):
    assert resolve_face_model_path(str(ict_model_file)) == ict_model_file
    monkeypatch.setenv("FACERECON_FACE_MODEL", str(ict_model_file))
    assert resolve_face_model_path(None) == ict_model_file
    monkeypatch.delenv("FACERECON_FACE_MODEL")
    with pytest.raises(FaceModelUnavailable, match="model fetch ict"):
        resolve_face_model_path(None)
    # with downloads allowed, the default model is fetched by the fetcher
    fetched = []

    def fake_fetcher():
        fetched.append(True)
        return ict_model_file

    assert resolve_face_model_path(None, allow_download=True, fetcher=fake_fetcher) == ict_model_file
    assert fetched == [True]
    with pytest.raises(FaceModelUnavailable, match="not found"):
        resolve_face_model_path("no-such-model")


def test_model_cli_import_list_info(ict_npz):
    runner = CliRunner()
    result = runner.invoke(main, ["model", "import", "ict", str(ict_npz), "--no-embed"])
    assert result.exit_code == 0, result.output
    assert "9409 vertices" in result.output
    again = runner.invoke(main, ["model", "import", "ict", str(ict_npz), "--no-embed"])
    assert again.exit_code == 1 and "--force" in again.output
    listed = runner.invoke(main, ["model", "list", "--json"])
    rows = json.loads(listed.output)
    assert [r["name"] for r in rows] == ["ict"] and rows[0]["vertices"] == 9409
    info = runner.invoke(main, ["model", "info", "ict", "--json"])
    assert json.loads(info.output)["identity_coefficients"] == 100


def test_model_cli_without_model_exits_cleanly():
    result = CliRunner().invoke(main, ["model", "info"])
    assert result.exit_code == 1
    assert "model fetch ict" in result.output and "model import" in result.output
    assert "Traceback" not in result.output


def test_laplacian_albedo_space_is_the_same_on_every_import(ict_model, tmp_path):
    """Albedo coefficients must mean the same colours from one import to the next."""
    import subprocess
    import sys

    from facerecon.facemodel.annotate import laplacian_albedo_space
    from facerecon.facemodel.model import save_face_model

    def fingerprint(basis):
        return repr(basis[:, ::97].sum(axis=(1, 2)).round(5).tolist())

    # fresh processes: a random eigen-solver start would differ between them
    code = ("import sys; from facerecon.facemodel.annotate import laplacian_albedo_space; "
            "from facerecon.facemodel.model import load_face_model; m = load_face_model(sys.argv[1]); "
            "b = laplacian_albedo_space(m.mean_shape, m.triangles, m.regions)[1]; "
            "print(repr(b[:, ::97].sum(axis=(1, 2)).round(5).tolist()))")
    path = save_face_model(ict_model, tmp_path / "m.h5")
    printed = [subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True,
                              check=True).stdout.strip() for _ in range(2)]
    here = laplacian_albedo_space(ict_model.mean_shape, ict_model.triangles, ict_model.regions)[1]
    assert printed[0] == printed[1] == fingerprint(here)
