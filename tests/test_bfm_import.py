"""Basel Face Model 2009 import from synthetic files with the real layouts (tests/bfm_fixtures.py)."""

from __future__ import annotations

import h5py
import numpy as np
import pytest
import scipy.io
from click.testing import CliRunner

from facerecon.cli import main

from facerecon.facemodel.bfm import import_bfm
from facerecon.facemodel.model import FaceModelError, load_face_model, save_face_model
from tests.bfm_fixtures import (
    K_DIFFUSE,
    K_EXP,
    K_ID,
    K_SPECULAR,
    K_TEX,
    OFFSET_MM,
    albedomm_index,
    write_albedomm,
    write_bfm_sources,
    write_exp_pca,
    write_mat73,
)


@pytest.fixture(scope="module")
def bfm(tmp_path_factory):
    return write_bfm_sources(tmp_path_factory.mktemp("bfm_v5"))


@pytest.fixture(scope="module")
def bfm73(tmp_path_factory):
    return write_bfm_sources(tmp_path_factory.mktemp("bfm_v73"), v73=True)


def _full_files(fx, *extra):
    p = fx["paths"]
    return [p["full"], p["exp_pca"], p["exp_std"], p["exp_idx"], *(p[k] for k in extra)]


def _translation(model) -> np.ndarray:
    return np.array([float(v) for v in model.attributes["translation_mm"].split()])


def _evaluate(model, a, b, c):
    shape = model.mean_shape + np.einsum("k,knd->nd", a, model.identity_basis) + np.einsum(
        "k,knd->nd", b, model.expression_basis)
    colour = model.albedo_mean + np.einsum("k,knd->nd", c, model.albedo_basis)
    return shape, colour


def _assert_outward(model):
    v = model.mean_shape.astype(np.float64)
    t = model.triangles
    normals = np.cross(v[t[:, 1]] - v[t[:, 0]], v[t[:, 2]] - v[t[:, 0]])
    nose = np.isin(t, model.landmarks68[27:36]).any(axis=1)
    assert normals[nose, 2].sum() > 0
    # every triangle of the (convex-ish) synthetic head points away from its centre
    outward = ((v[t].mean(axis=1) - v.mean(axis=0)) * normals).sum(axis=1) > 0
    assert outward.mean() > 0.95


def test_front_mat_converts_units_bases_and_indices(bfm):
    raw = bfm["front"]
    model = import_bfm([bfm["paths"]["front"]])
    n = raw["meanshape"].size // 3
    assert model.model_id == "bfm2009-front" and model.n_vertices == n
    assert (model.n_identity, model.n_expression, model.n_albedo) == (K_ID, K_EXP, K_TEX)
    assert model.expression_kind == "pca" and model.albedo_kind == "pca"
    assert model.expression_names == [f"exp_{i:03d}" for i in range(K_EXP)]
    # decimetres -> mm: vertex 5 is raw * 100 shifted by the recorded translation
    t = _translation(model)
    np.testing.assert_allclose(model.mean_shape[5], raw["meanshape"][0, 15:18] * 100.0 + t, atol=1e-3)
    # the file's head centre (OFFSET_MM) lands near the origin
    np.testing.assert_allclose(-t[0], OFFSET_MM[0], atol=1e-3)
    # mean + basis @ coefficients agrees with the raw column layout
    rng = np.random.default_rng(0)
    a, b, c = rng.standard_normal(K_ID), rng.standard_normal(K_EXP), rng.standard_normal(K_TEX)
    shape, colour = _evaluate(model, a, b, c)
    raw_shape = (raw["meanshape"].ravel() + raw["idBase"] @ a + raw["exBase"] @ b).reshape(-1, 3) * 100.0 + t
    raw_colour = (raw["meantex"].ravel() + raw["texBase"] @ c).reshape(-1, 3) / 255.0
    np.testing.assert_allclose(shape, raw_shape, atol=1e-3)
    np.testing.assert_allclose(colour, raw_colour, atol=1e-5)
    # 1-based -> 0-based; BFM's clockwise triangles reversed
    np.testing.assert_array_equal(model.landmarks68, raw["keypoints"].ravel().astype(int) - 1)
    np.testing.assert_array_equal(model.triangles, (raw["tri"].astype(int) - 1)[:, ::-1])
    np.testing.assert_array_equal(model.regions["face"], raw["frontmask2_idx"].ravel().astype(int) - 1)
    assert model.attributes["winding_flipped"] == "1"
    # albedo in [0, 1]
    assert model.albedo_mean.min() >= 0.0 and model.albedo_mean.max() <= 1.0
    assert 0.3 < model.albedo_mean.mean() < 0.9
    _assert_outward(model)


def test_front_mat_v73_reads_like_v5(bfm, bfm73):
    v5 = import_bfm([bfm["paths"]["front"]])
    v73 = import_bfm([bfm73["paths"]["front"]])
    with open(bfm73["paths"]["front"], "rb") as fh:
        assert fh.read(10) == b"MATLAB 7.3"
    np.testing.assert_array_equal(v73.mean_shape, v5.mean_shape)
    np.testing.assert_array_equal(v73.identity_basis, v5.identity_basis)
    np.testing.assert_array_equal(v73.expression_basis, v5.expression_basis)
    np.testing.assert_array_equal(v73.albedo_basis, v5.albedo_basis)
    np.testing.assert_array_equal(v73.triangles, v5.triangles)
    np.testing.assert_array_equal(v73.landmarks68, v5.landmarks68)


@pytest.mark.parametrize("variant", ["bfm", "bfm73"])
def test_full_model_with_expression_and_landmark_files(variant, request):
    fx = request.getfixturevalue(variant)
    raw = fx["full"]
    model = import_bfm(_full_files(fx, "landmarks"))
    trim = fx["trim"]
    assert model.model_id == "bfm2009" and model.n_vertices == len(trim)
    t = _translation(model)
    # micrometres -> mm on the trimmed vertex subset
    np.testing.assert_allclose(model.mean_shape, raw["shapeMU"].reshape(-1, 3)[trim] / 1000.0 + t, atol=1e-3)
    rng = np.random.default_rng(1)
    a, b, c = rng.standard_normal(K_ID), rng.standard_normal(K_EXP), rng.standard_normal(K_TEX)
    shape, colour = _evaluate(model, a, b, c)
    identity = (raw["shapePC"] @ (raw["shapeEV"].ravel() * a)).reshape(-1, 3)[trim]
    expression = (fx["exp_pc"].T @ (fx["exp_std"] * b)).reshape(-1, 3)  # already on the trimmed set
    expected = raw["shapeMU"].reshape(-1, 3)[trim] + identity + expression
    np.testing.assert_allclose(shape, expected / 1000.0 + t, atol=1e-3)
    tex = (raw["texMU"].ravel() + raw["texPC"] @ (raw["texEV"].ravel() * c)).reshape(-1, 3)[trim] / 255.0
    np.testing.assert_allclose(colour, tex, atol=1e-5)
    # landmarks: 1-based full-model indices -> positions in the kept subset
    np.testing.assert_array_equal(trim[model.landmarks68], fx["head"]["landmarks"])
    # triangles: only those inside the subset, mapped and reversed to counter-clockwise
    tl = raw["tl"].astype(int) - 1
    inside = np.isin(tl, trim).all(axis=1)
    np.testing.assert_array_equal(trim[model.triangles], tl[inside][:, ::-1])
    assert model.regions["face"].size < model.n_vertices  # whole head: face area picked automatically
    _assert_outward(model)


def test_full_model_front_crop_matches_front_file(bfm):
    p = bfm["paths"]
    from_full = import_bfm(_full_files(bfm, "front_idx", "info"))
    from_front = import_bfm([p["front"]])
    assert from_full.model_id == "bfm2009-front" and from_full.n_vertices == from_front.n_vertices
    np.testing.assert_allclose(from_full.mean_shape, from_front.mean_shape, atol=1e-4)
    np.testing.assert_allclose(from_full.identity_basis, from_front.identity_basis, atol=1e-4)
    np.testing.assert_allclose(from_full.expression_basis, from_front.expression_basis, atol=1e-4)
    np.testing.assert_allclose(from_full.albedo_mean, from_front.albedo_mean, atol=1e-6)
    np.testing.assert_array_equal(from_full.landmarks68, from_front.landmarks68)
    np.testing.assert_array_equal(from_full.triangles, from_front.triangles)
    # a folder holding BFM_model_front.mat stands for that file
    np.testing.assert_array_equal(import_bfm([p["front"].parent]).mean_shape, from_front.mean_shape)


def test_mode_counts_can_be_reduced(bfm):
    model = import_bfm([bfm["paths"]["front"]], n_identity=3, n_expression=2, n_albedo=1)
    assert (model.n_identity, model.n_expression, model.n_albedo) == (3, 2, 1)
    np.testing.assert_allclose(model.identity_basis[2].ravel(), bfm["front"]["idBase"][:, 2] * 100.0, atol=1e-4)
    with pytest.raises(FaceModelError, match="cannot keep 99"):
        import_bfm([bfm["paths"]["front"]], n_identity=99)


def test_derived_annotations(bfm):
    model = import_bfm(_full_files(bfm, "landmarks"))
    lm = model.mean_shape[model.landmarks68]
    eyes = model.mean_shape[model.regions["eyes"]]
    assert set(model.landmarks68[36:48].tolist()) <= set(model.regions["eyes"].tolist())
    assert abs(eyes[:, 1].mean() - lm[36:48, 1].mean()) < 5.0
    assert not set(model.regions["skin"].tolist()) & set(model.regions["eyes"].tolist())
    # the synthetic head is mirror-symmetric: pairs mirror each other across x = 0
    pairs = model.symmetric_pairs
    assert len(pairs) > 0.3 * model.n_vertices
    np.testing.assert_allclose(model.mean_shape[pairs[:, 0]] * [-1, 1, 1], model.mean_shape[pairs[:, 1]], atol=1e-3)
    # canonical frame: right eye at -x, eyes above the mouth, nose tip in front, origin near the head centre
    assert lm[36:42, 0].mean() < 0 < lm[42:48, 0].mean()
    assert abs(lm[36:48, 1].mean()) < 1e-3 and lm[48:68, 1].mean() < -40
    assert lm[30, 2] > lm[36:48, 2].mean() > 50
    assert model.uv.shape == (model.n_vertices, 2) and model.uv.min() >= 0 and model.uv.max() <= 1
    np.testing.assert_array_equal(model.triangle_uv, model.triangles)


def test_save_load_roundtrip(bfm, tmp_path):
    model = import_bfm([bfm["paths"]["front"]])
    loaded = load_face_model(save_face_model(model, tmp_path / "bfm.h5"))
    assert loaded.model_id == "bfm2009-front" and loaded.expression_kind == "pca" and loaded.albedo_kind == "pca"
    for name in ("mean_shape", "identity_basis", "expression_basis", "albedo_mean", "albedo_basis", "triangles",
                 "uv", "landmarks68", "symmetric_pairs"):
        np.testing.assert_array_equal(getattr(loaded, name), getattr(model, name))
    assert loaded.regions.keys() == model.regions.keys()
    assert loaded.attributes == model.attributes and loaded.provenance == model.provenance


def _one_line(exc_info, *words):
    message = str(exc_info.value)
    assert "\n" not in message
    for word in words:
        assert word in message, message


def test_missing_key_and_wrong_shape(bfm, tmp_path):
    front = dict(bfm["front"])
    del front["idBase"]
    scipy.io.savemat(tmp_path / "BFM_model_front.mat", front)
    with pytest.raises(FaceModelError) as exc:
        import_bfm([tmp_path / "BFM_model_front.mat"])
    _one_line(exc, "BFM_model_front.mat", "idBase")

    front = dict(bfm["front"], exBase=bfm["front"]["exBase"][:-3])
    write_mat73(tmp_path / "short.mat", front)
    with pytest.raises(FaceModelError) as exc:
        import_bfm([tmp_path / "short.mat"])
    _one_line(exc, "short.mat", "exBase", "shape")

    front = dict(bfm["front"], tri=bfm["front"]["tri"] - 1)  # 0-based by mistake
    scipy.io.savemat(tmp_path / "zero.mat", front)
    with pytest.raises(FaceModelError) as exc:
        import_bfm([tmp_path / "zero.mat"])
    _one_line(exc, "zero.mat", "tri", "1-based")

    full = dict(bfm["full"])
    del full["tl"]
    scipy.io.savemat(tmp_path / "01_MorphableModel.mat", full)
    p = bfm["paths"]
    with pytest.raises(FaceModelError) as exc:
        import_bfm([tmp_path / "01_MorphableModel.mat", p["exp_pca"], p["exp_std"], p["exp_idx"], p["landmarks"]])
    _one_line(exc, "01_MorphableModel.mat", "tl")


def test_unreadable_and_foreign_files(bfm, tmp_path):
    fake = tmp_path / "BFM_model_front.mat"
    fake.write_text("this is not a MATLAB file\n")
    with pytest.raises(FaceModelError) as exc:
        import_bfm([fake])
    _one_line(exc, "BFM_model_front.mat", "cannot read")

    scipy.io.savemat(tmp_path / "other.mat", {"something": np.zeros(3)})
    with pytest.raises(FaceModelError) as exc:
        import_bfm([tmp_path / "other.mat"])
    _one_line(exc, "other.mat", "not a recognised")

    with pytest.raises(FaceModelError, match="does not exist"):
        import_bfm([tmp_path / "nowhere.mat"])

    (tmp_path / "Exp_Pca.bin").write_bytes(bfm["paths"]["exp_pca"].read_bytes()[:-6])
    p = bfm["paths"]
    with pytest.raises(FaceModelError) as exc:
        import_bfm([p["full"], tmp_path / "Exp_Pca.bin", p["exp_std"], p["exp_idx"], p["landmarks"]])
    _one_line(exc, "Exp_Pca.bin", "layout")


def test_full_model_needs_its_companion_files(bfm, tmp_path):
    p = bfm["paths"]
    with pytest.raises(FaceModelError) as exc:
        import_bfm([p["full"], p["landmarks"]])
    _one_line(exc, "Exp_Pca.bin")
    with pytest.raises(FaceModelError) as exc:
        import_bfm([p["full"], p["exp_pca"], p["landmarks"]])
    _one_line(exc, "std_exp.txt")
    with pytest.raises(FaceModelError) as exc:
        import_bfm([p["full"], p["exp_pca"], p["exp_std"], p["landmarks"]])
    _one_line(exc, "BFM_exp_idx.mat")
    with pytest.raises(FaceModelError) as exc:
        import_bfm(_full_files(bfm))
    _one_line(exc, "Landmarks68_BFM.anl", "facemodel_info.mat")
    with pytest.raises(FaceModelError) as exc:
        import_bfm(_full_files(bfm, "info"))
    _one_line(exc, "facemodel_info.mat", "BFM_front_idx.mat")
    with pytest.raises(FaceModelError) as exc:
        import_bfm([p["front"], p["full"]])
    _one_line(exc, "not both")
    # an expression model with the wrong number of standard deviations
    np.savetxt(tmp_path / "std_exp.txt", bfm["exp_std"][:-1])
    with pytest.raises(FaceModelError) as exc:
        import_bfm([p["full"], p["exp_pca"], tmp_path / "std_exp.txt", p["exp_idx"], p["landmarks"]])
    _one_line(exc, "std_exp.txt", "components")
    # an expression model over a different vertex count than trimIndex lists
    write_exp_pca(tmp_path / "Exp_Pca.bin", bfm["exp_mean"][:-1], bfm["exp_pc"].reshape(K_EXP, -1, 3)[:, :-1])
    with pytest.raises(FaceModelError) as exc:
        import_bfm([p["full"], tmp_path / "Exp_Pca.bin", p["exp_std"], p["exp_idx"], p["landmarks"]])
    _one_line(exc, "BFM_exp_idx.mat", "Exp_Pca.bin")


def test_mirrored_landmarks_are_rejected(bfm, tmp_path):
    lms = bfm["head"]["landmarks"]
    mirrored = np.concatenate([lms[16::-1], lms[26:16:-1], lms[27:31], lms[35:30:-1], lms[[45, 44, 43, 42, 47, 46]],
                               lms[[39, 38, 37, 36, 41, 40]], lms[54:47:-1], lms[59:54:-1], lms[64:59:-1],
                               lms[67:64:-1]])
    anl = tmp_path / "Landmarks68_BFM.anl"
    anl.write_text("\n".join(str(i + 1) for i in mirrored))
    p = bfm["paths"]
    with pytest.raises(FaceModelError) as exc:
        import_bfm([p["full"], p["exp_pca"], p["exp_std"], p["exp_idx"], anl])
    _one_line(exc, "mirrored")


# ------------------------------------------------------------------------------- AlbedoMM
def _n_full(fx) -> int:
    return fx["full"]["shapeMU"].size // 3


def _expected_space(raw, which: str, take: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """mean (N, 3) and basis (k, N, 3) of a written AlbedoMM part on the vertices ``take``."""
    rows = (3 * take[:, None] + np.arange(3)).ravel()
    basis = raw[f"{which}_u"][rows, :k] * np.sqrt(raw[f"{which}_var"][:k].astype(np.float64))[None, :]
    return raw[f"{which}_mean"][take], basis.T.reshape(k, -1, 3)


def _assert_albedomm(model, raw, take: np.ndarray, k_diffuse=K_DIFFUSE, k_specular=K_SPECULAR):
    assert model.albedo_kind == "pca" and model.specular_kind == "measured"
    assert (model.n_albedo, model.specular_basis.shape[0]) == (k_diffuse, k_specular)
    mean, basis = _expected_space(raw, "diffuse", take, k_diffuse)
    np.testing.assert_allclose(model.albedo_mean, mean, atol=1e-6)
    np.testing.assert_allclose(model.albedo_basis, basis, atol=1e-6)
    mean, basis = _expected_space(raw, "specular", take, k_specular)
    np.testing.assert_allclose(model.specular_mean, mean, atol=1e-6)
    np.testing.assert_allclose(model.specular_basis, basis, atol=1e-6)
    # the diffuse mean encodes the AlbedoMM vertex index: each imported vertex got its own colour
    np.testing.assert_array_equal(albedomm_index(model.albedo_mean[:, 0], raw["n"]), take)
    # one N(0, 1) coefficient moves the colour by one standard deviation: sqrt(variance)
    norms = np.linalg.norm(model.albedo_basis.reshape(k_diffuse, -1), axis=1)
    full = np.linalg.norm(raw["diffuse_u"][(3 * take[:, None] + np.arange(3)).ravel(), :k_diffuse], axis=0)
    np.testing.assert_allclose(norms, np.sqrt(raw["diffuse_var"][:k_diffuse]) * full, rtol=1e-5)
    assert model.attributes["albedo_source"] == "AlbedoMM"
    assert raw["path"].name in model.attributes["source_files"] and "AlbedoMM" in model.provenance


def test_albedomm_on_the_full_topology_lands_on_the_kept_vertices(bfm, tmp_path):
    raw = write_albedomm(tmp_path / "albedoModel2020_bfm_albedoPart.h5", _n_full(bfm))
    plain = import_bfm(_full_files(bfm, "landmarks"))
    model = import_bfm(_full_files(bfm, "landmarks") + [raw["path"]])
    assert model.model_id == "bfm2009-albedomm" and model.n_vertices == len(bfm["trim"])
    _assert_albedomm(model, raw, bfm["trim"])
    # the shape side is untouched
    np.testing.assert_array_equal(model.mean_shape, plain.mean_shape)
    np.testing.assert_array_equal(model.identity_basis, plain.identity_basis)
    np.testing.assert_array_equal(model.triangles, plain.triangles)
    # without AlbedoMM nothing changes: no stored specular space, the default one when used
    assert plain.specular_mean is None and plain.specular_kind == "none" and plain.n_albedo == K_TEX
    assert plain.specular_space()[2] == "default" and "albedo_source" not in plain.attributes

    # the front crop of the full route takes the front vertices of the full-topology file
    front = import_bfm(_full_files(bfm, "front_idx", "info") + [raw["path"]])
    assert front.model_id == "bfm2009-front-albedomm"
    _assert_albedomm(front, raw, bfm["front_full"])


def test_albedomm_on_the_imported_vertices(bfm, tmp_path):
    n_front = len(bfm["front_full"])
    raw = write_albedomm(tmp_path / "albedo_front.h5", n_front, seed=3)
    model = import_bfm([bfm["paths"]["front"], raw["path"]])
    assert model.model_id == "bfm2009-front-albedomm" and model.n_vertices == n_front
    _assert_albedomm(model, raw, np.arange(n_front))
    # also on the trimmed vertex set of the full route
    raw = write_albedomm(tmp_path / "albedo_trim.h5", len(bfm["trim"]), seed=4)
    _assert_albedomm(import_bfm(_full_files(bfm, "landmarks") + [raw["path"]]), raw, np.arange(len(bfm["trim"])))


def test_albedomm_mode_count_and_old_statismo_layout(bfm, tmp_path):
    raw = write_albedomm(tmp_path / "albedo.h5", _n_full(bfm))
    model = import_bfm(_full_files(bfm, "landmarks") + [raw["path"]], n_albedo=3)
    _assert_albedomm(model, raw, bfm["trim"], k_diffuse=3, k_specular=3)
    with pytest.raises(FaceModelError) as exc:
        import_bfm(_full_files(bfm, "landmarks") + [raw["path"]], n_albedo=K_SPECULAR + 1)
    _one_line(exc, "albedo.h5", "specularAlbedo", f"cannot keep {K_SPECULAR + 1}")
    # n_albedo beyond BFM's own texture modes is fine: BFM's colour model is not used
    assert import_bfm(_full_files(bfm, "landmarks") + [raw["path"]], n_albedo=K_TEX + 1).n_albedo == K_TEX + 1
    # Statismo 0.8 (or no version) stores U * sqrt(variance): the same spaces come out
    for version in ((0, 8), None):
        old = write_albedomm(tmp_path / f"old_{version}.h5", _n_full(bfm), version=version)
        _assert_albedomm(import_bfm(_full_files(bfm, "landmarks") + [old["path"]]), old, bfm["trim"])


def test_albedomm_save_load_roundtrip(bfm, tmp_path):
    raw = write_albedomm(tmp_path / "albedo.h5", len(bfm["front_full"]))
    model = import_bfm([bfm["paths"]["front"], raw["path"]])
    loaded = load_face_model(save_face_model(model, tmp_path / "bfm_albedomm.h5"))
    assert loaded.model_id == model.model_id and loaded.specular_kind == "measured"
    for name in ("albedo_mean", "albedo_basis", "specular_mean", "specular_basis"):
        np.testing.assert_array_equal(getattr(loaded, name), getattr(model, name))
    mean, basis, kind = loaded.specular_space()
    assert kind == "measured" and basis.shape == (K_SPECULAR, model.n_vertices, 3)
    assert loaded.attributes == model.attributes and loaded.provenance == model.provenance


def test_albedomm_vertex_count_and_layout_errors(bfm, tmp_path):
    n_full, n_kept = _n_full(bfm), len(bfm["trim"])
    raw = write_albedomm(tmp_path / "albedo.h5", n_full - 1)
    with pytest.raises(FaceModelError) as exc:
        import_bfm(_full_files(bfm, "landmarks") + [raw["path"]])
    _one_line(exc, "albedo.h5", str(n_full - 1), str(n_kept), str(n_full))
    # BFM_model_front.mat does not say which full-model vertices it keeps: only its own count fits
    raw = write_albedomm(tmp_path / "full.h5", n_full)
    with pytest.raises(FaceModelError) as exc:
        import_bfm([bfm["paths"]["front"], raw["path"]])
    _one_line(exc, "full.h5", str(n_full), str(len(bfm["front_full"])))

    # a part without its variances
    with h5py.File(raw["path"], "a") as f:
        del f["specularAlbedo/model/pcaVariance"]
    with pytest.raises(FaceModelError) as exc:
        import_bfm([bfm["paths"]["front"], raw["path"]])
    _one_line(exc, "full.h5", "specularAlbedo/model/pcaVariance")
    # a Basel Face Model 2017 file is not an AlbedoMM file
    with h5py.File(tmp_path / "model2017-1_bfm_nomouth.h5", "w") as f:
        f.create_dataset("shape/model/mean", data=np.zeros(9, np.float32))
        f.create_dataset("color/model/mean", data=np.zeros(9, np.float32))
    with pytest.raises(FaceModelError) as exc:
        import_bfm([bfm["paths"]["front"], tmp_path / "model2017-1_bfm_nomouth.h5"])
    _one_line(exc, "model2017-1_bfm_nomouth.h5", "not an AlbedoMM file", "2017")
    (tmp_path / "broken.h5").write_text("not HDF5\n")
    with pytest.raises(FaceModelError) as exc:
        import_bfm([bfm["paths"]["front"], tmp_path / "broken.h5"])
    _one_line(exc, "broken.h5", "cannot read")
    # two AlbedoMM files, or AlbedoMM alone
    a = write_albedomm(tmp_path / "a.h5", n_full)["path"]
    b = write_albedomm(tmp_path / "b.h5", n_full)["path"]
    with pytest.raises(FaceModelError) as exc:
        import_bfm(_full_files(bfm, "landmarks") + [a, b])
    _one_line(exc, "a.h5", "b.h5")
    with pytest.raises(FaceModelError) as exc:
        import_bfm([a])
    _one_line(exc, "no BFM model")


def test_albedomm_through_the_cli(bfm, tmp_path):
    raw = write_albedomm(tmp_path / "albedoModel2020_face_albedoPart.h5", len(bfm["front_full"]))
    out = tmp_path / "bfm_albedomm.h5"
    result = CliRunner().invoke(main, ["model", "import", "bfm", str(bfm["paths"]["front"]), str(raw["path"]),
                                       "--no-embed", "--no-calibrate", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "bfm2009-front-albedomm" in result.output
    model = load_face_model(out)
    _assert_albedomm(model, raw, np.arange(len(bfm["front_full"])))
