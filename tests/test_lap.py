"""Paper 003 (LAP), optimisation route: canonical grid, losses, metrics, the optimiser and the
``aggregate --method lap`` / ``evaluate lap`` commands."""

from __future__ import annotations

import json
import math
import shutil

import h5py
import numpy as np
import torch

from facerecon.aggregation.lap import (CanonicalGrid, LapOptimiser, LapPhotos, LapSettings, grid_triangles,
                                       grid_vertices, harmonic_fill, rasterise_heightfield, relaxed_nll, thin_plate)
from facerecon.aggregation.lap_export import depth_from_png, depth_png, lap_mesh
from facerecon.evaluation.lap_metrics import mad, side, ssim
from facerecon.fitting.camera import crop_intrinsics, model_to_camera
from facerecon.render.renderer import MeshRenderer


def test_heightfield_of_a_tilted_plane_is_the_plane():
    grid = CanonicalGrid(33, x_half=50.0, y_top=50.0)
    # a plane z = 10 + 0.2 x - 0.1 y as two big triangles (counter-clockwise seen from +z)
    corners = torch.tensor([[-60.0, -60.0], [60.0, -60.0], [60.0, 60.0], [-60.0, 60.0]])
    z = 10 + 0.2 * corners[:, 0] - 0.1 * corners[:, 1]
    verts = torch.cat([corners, z[:, None]], 1)
    tris = torch.tensor([[0, 1, 2], [0, 2, 3]])
    depth, covered, attrs = rasterise_heightfield(verts, tris, verts[:, :1], grid)
    xy = grid.xy()
    assert covered.all()
    np.testing.assert_allclose(depth, 10 + 0.2 * xy[..., 0] - 0.1 * xy[..., 1], atol=0.05)
    np.testing.assert_allclose(attrs[..., 0], xy[..., 0], atol=0.2)  # attributes follow the grid's x
    # the same plane seen from behind is culled
    _, covered_back, _ = rasterise_heightfield(verts, tris[:, [0, 2, 1]], verts[:, :1], grid)
    assert not covered_back.any()


def test_grid_mesh_faces_the_front_and_mirrors_about_x0():
    grid = CanonicalGrid(17, x_half=40.0, y_top=40.0)
    valid = torch.ones(17, 17, dtype=torch.bool)
    depth = torch.full((1, 17, 17), 80.0)
    cam = model_to_camera(grid_vertices(grid, depth), torch.zeros(1, 3), torch.tensor([[0.0, 0.0, 900.0]]))
    out = MeshRenderer((64, 64), backend="torch").render(cam, grid_triangles(valid), crop_intrinsics(64, 1),
                                                         torch.ones(1, 17 * 17, 3))
    assert out.mask.sum() > 100  # front faces survive back-face culling
    np.testing.assert_allclose(out.depth[out.mask], 820.0, atol=1e-2)  # camera z = 900 - model z
    xy = grid.xy()
    np.testing.assert_allclose(xy.flip(1)[..., 0], -xy[..., 0], atol=1e-5)  # flip(-1) of a map mirrors x


def test_harmonic_fill_is_linear_between_known_edges():
    values = torch.zeros(9, 9)
    values[:, 0], values[:, -1] = 0.0, 8.0
    known = torch.zeros(9, 9, dtype=torch.bool)
    known[:, 0] = known[:, -1] = True
    filled = harmonic_fill(values, known, torch.ones(9, 9, dtype=torch.bool), iterations=2000)
    np.testing.assert_allclose(filled[4], torch.arange(9.0), atol=0.05)


def test_relaxed_nll_is_minimal_at_sigma_sqrt2_residual_and_weighted():
    photo = torch.zeros(1, 4, 4, 3)
    rendered = torch.full((1, 4, 4, 3), 0.1)
    weight = torch.ones(1, 4, 4)
    sigmas = torch.linspace(0.05, 0.3, 51)
    values = torch.stack([relaxed_nll(rendered, photo, torch.full((1, 4, 4), float(s)), weight)[0] for s in sigmas])
    assert abs(float(sigmas[values.argmin()]) - math.sqrt(2) * 0.1) < 0.006
    # a pixel of weight 0 does not count; a relaxed (0.3) pixel counts less than a full one
    bad = rendered.clone()
    bad[0, 0, 0] = 1.0
    sigma = torch.full((1, 4, 4), 0.1)
    off = weight.clone()
    off[0, 0, 0] = 0.0
    relaxed = weight.clone()
    relaxed[0, 0, 0] = 0.3
    assert torch.isclose(relaxed_nll(bad, photo, sigma, off), relaxed_nll(rendered, photo, sigma, off))
    assert relaxed_nll(bad, photo, sigma, off) < relaxed_nll(bad, photo, sigma, relaxed) < \
        relaxed_nll(bad, photo, sigma, weight)


def test_thin_plate_is_zero_on_planes_and_positive_on_bumps():
    valid = torch.ones(8, 8, dtype=torch.bool)
    r = torch.arange(8.0)
    plane = (2 * r[None, :] + 3 * r[:, None])[None]
    assert float(thin_plate(plane, valid)) < 1e-9
    bump = plane.clone()
    bump[0, 4, 4] += 1.0
    assert float(thin_plate(bump, valid)) > 0.05


def test_side_mad_ssim():
    true = torch.rand(1, 16, 16) + 1.0
    mask = torch.ones(1, 16, 16, dtype=torch.bool)
    assert float(side(true * 3.0, true, mask)) < 1e-6  # scale-invariant
    assert float(side(true + torch.rand(1, 16, 16), true, mask)) > 0.01
    n = torch.zeros(1, 16, 16, 3)
    n[..., 2] = 1
    m = torch.zeros(1, 16, 16, 3)
    m[..., 0] = 1
    assert abs(float(mad(n, n, mask))) < 1e-3 and abs(float(mad(m, n, mask)) - 90.0) < 1e-3
    image = torch.rand(2, 32, 32, 3)
    assert torch.allclose(ssim(image, image), torch.ones(2), atol=1e-5)
    noisy = (image + 0.3 * torch.randn_like(image)).clamp(0, 1)
    assert (ssim(noisy, image) < 0.9).all()


def test_depth_png_round_trip_and_mesh_frame():
    grid = CanonicalGrid(16, x_half=30.0, y_top=30.0)
    depth = np.linspace(40, 120, 256).reshape(16, 16)
    valid = np.ones((16, 16), bool)
    valid[0] = False
    back, back_valid = depth_from_png(depth_png(depth, valid))
    assert (back_valid == valid).all()
    np.testing.assert_allclose(back[valid], depth[valid], atol=0.006)
    mesh = lap_mesh(grid, depth, np.full((16, 16, 3), 0.5), valid, texture_size=32)
    assert len(mesh.vertices) == 15 * 16 and mesh.texture.shape == (32, 32, 3)
    np.testing.assert_allclose(mesh.vertices[:, 0].min(), -30.0, atol=1e-4)


def _synthetic_album(model, tensors, bump_mm: float, poses, size=64):
    """Renders of a grid face (the model's neutral face with a bump on the left cheek) at
    ``poses`` (yaw degrees), and the true depth."""
    opt = LapOptimiser(tensors, model.regions, LapSettings(grid_size=48, render_size=size))
    depth, albedo, valid, _ = opt.initial_face(torch.zeros(tensors.identity_basis.shape[0]),
                                               torch.zeros(tensors.albedo_basis.shape[0]))
    xy = opt.grid.xy()
    bump = bump_mm * torch.exp(-((xy[..., 0] - 35) ** 2 + (xy[..., 1] - 0) ** 2) / (2 * 12.0 ** 2))
    true_depth = (depth + bump) * valid
    texture = albedo * (1 + 0.15 * torch.sin(xy[..., :1] / 6.0))  # texture for correspondence
    P = len(poses)
    angles = torch.zeros(P, 3)
    angles[:, 1] = torch.deg2rad(torch.tensor(poses, dtype=torch.float32))
    translation = torch.tensor([0.0, 0.0, 1150.0]).expand(P, 3).clone()
    translation[:, 2] -= 80
    sh = torch.zeros(P, 27)
    sh[:, [0, 9, 18]] = 0.9
    sh[:, [3, 12, 21]] = -0.25
    sh[:, [1, 10, 19]] = 0.2
    cam = model_to_camera(grid_vertices(opt.grid, true_depth[None].expand(P, -1, -1)), angles, translation)
    with torch.no_grad():
        out = MeshRenderer((size, size), backend="torch").render(
            cam, grid_triangles(valid), crop_intrinsics(size, P), texture.reshape(1, -1, 3).expand(P, -1, -1), sh,
            background=torch.full((P, size, size, 3), 0.3))
    from facerecon.render.camera import project_points

    landmarks = project_points(model_to_camera(tensors.landmark_points(tensors.mean_shape[None]).expand(P, -1, -1),
                                               angles, translation), crop_intrinsics(size, P))[..., :2]
    photos = LapPhotos(out.image.clamp(0, 1), out.mask.float(), landmarks, angles, translation, sh * 0.9)
    return opt, photos, true_depth, valid, bump


def test_lap_recovers_a_bump_the_3dmm_start_lacks(ict_embedded_model):
    from facerecon.facemodel.tensors import FaceModelTensors

    tensors = FaceModelTensors(ict_embedded_model)
    opt, photos, true_depth, valid, bump = _synthetic_album(ict_embedded_model, tensors, 6.0, [-30.0, 0.0, 30.0])
    opt.settings.aggregate_steps, opt.settings.personal_steps = 60, 8
    result = opt.run(photos, torch.zeros(tensors.identity_basis.shape[0]), torch.zeros(tensors.albedo_basis.shape[0]))
    region = (bump > 3.0) & result.valid & valid
    start_error = float(bump[region].abs().mean())
    error = float((result.depth - true_depth)[region].abs().mean())
    assert error < 0.6 * start_error, (error, start_error)
    # the canonical face reproduces the photos better than a flat grey start, personalisation better still
    assert (result.losses["photometric_personal"] <= result.losses["photometric_canonical"] + 1e-4).all()
    assert result.losses["photometric_canonical"].mean() < 0.05
    assert result.personal_depth.shape == (3, 48, 48) and result.personal_albedo.shape == (3, 48, 48, 3)


def test_fewer_photos_give_a_smoother_face(ict_embedded_model):
    """The priors are set for an album of ``prior_photos``: one photo's face gets the stronger
    smoothing (its evidence is one photo, not the mean of many)."""
    from facerecon.facemodel.tensors import FaceModelTensors

    tensors = FaceModelTensors(ict_embedded_model)
    energies = {}
    for prior_photos in (0.0, 8.0):
        torch.manual_seed(0)
        opt, photos, _, valid, _ = _synthetic_album(ict_embedded_model, tensors, 6.0, [20.0])
        opt.settings.aggregate_steps, opt.settings.personal_steps, opt.settings.prior_photos = 40, 0, prior_photos
        result = opt.run(photos, torch.zeros(tensors.identity_basis.shape[0]),
                         torch.zeros(tensors.albedo_basis.shape[0]))
        energies[prior_photos] = float(thin_plate(result.depth[None], result.valid & valid))
    assert energies[8.0] < 0.9 * energies[0.0], energies


def _album(realdata, tmp_path, count=2):
    source = sorted((realdata / "albums" / "id03").glob("*.jpg"))[:count]
    album = tmp_path / "people" / "id03"
    album.mkdir(parents=True)
    for path in source:
        shutil.copy(path, album / path.name)
    return tmp_path / "people"


def test_aggregate_lap_command_writes_the_canonical_and_personalised_faces(ict_embedded_model_file, realdata,
                                                                           tmp_path):
    import trimesh
    from click.testing import CliRunner

    from facerecon.cli import main

    people = _album(realdata, tmp_path)
    args = ["aggregate", str(people), "--out", str(tmp_path / "out"), "--face-model", str(ict_embedded_model_file),
            "--method", "lap", "--lap-steps", "15", "5", "--steps", "30", "4", "0", "--texture-size", "128",
            "--format", "obj", "-q", "--json", "--no-download"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["method"] == "lap" and data["albums_ok"] == 1
    folder = tmp_path / "out" / "id03"
    mesh = trimesh.load(folder / "id03_lap.obj", force="mesh")
    assert len(mesh.vertices) > 3000 and np.isfinite(mesh.vertices).all()
    extent = mesh.vertices.max(0) - mesh.vertices.min(0)
    assert 100 < extent[0] < 200 and 100 < extent[1] < 220  # a face, in mm
    import cv2

    depth_image = cv2.imread(str(folder / "id03_lap_depth.png"), cv2.IMREAD_UNCHANGED)
    assert depth_image.dtype == np.uint16 and depth_image.shape == (128, 128)
    depth, valid = depth_from_png(depth_image)
    assert valid.sum() > 3000 and 60 < depth[valid].max() < 160  # the nose tip sits ~100+ mm out
    assert len(list((folder / "lap_personalised").glob("*.obj"))) == 2
    assert (folder / "lap_sheet.png").is_file() and (folder / "id03_lap_normal.png").is_file()
    with h5py.File(tmp_path / "out" / "aggregate.h5") as f:
        lap = f["identities"]["id03"]["lap"]
        assert lap["personal_depth"].shape == (2, 128, 128) and lap["angles"].shape == (2, 3)
        for key in ("ssim_fit", "ssim_canonical", "ssim_personal", "photometric_canonical"):
            assert np.isfinite(lap[key][()]).all() and lap[key].shape == (2,)
        assert (lap["photometric_personal"][()] < lap["photometric_canonical"][()]).all()
    # resumable: a second run skips the album
    again = json.loads(CliRunner().invoke(main, args).stdout)
    assert again["albums_skipped"] == 1


def test_evaluate_lap_scores_depth_on_scan_renders(ict_embedded_model_file, realdata, tmp_path):
    from click.testing import CliRunner

    from facerecon.cli import main

    scans = realdata / "scans"
    args = ["evaluate", "lap", "--scan", str(scans / "flame_scan.obj"), "--scan-landmarks",
            str(scans / "flame_scan_lmks.npy"), "--sizes", "1,2", "--lap-steps", "10", "3", "--steps", "30", "4", "0", "--out", str(tmp_path / "e"),
            "--face-model", str(ict_embedded_model_file), "--json", "-q"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    # two album sizes in one fresh folder (the second album is copied after the first is scored)
    table = {(r["size"], r["prediction"]): r for r in data["depth_summary"]}
    assert set(table) == {(n, p) for n in (1, 2) for p in ("joint", "canonical", "personal")}
    assert table[(1, "joint")]["views"] == 8 and table[(1, "personal")]["views"] == 1
    assert table[(2, "personal")]["views"] == 2
    for row in table.values():
        assert 0 < row["side_x100"] < 5 and 0 < row["mad_deg"] < 45 and 0 < row["mesh_mm"] < 10
    assert (tmp_path / "e" / "lap_results.csv").is_file() and (tmp_path / "e" / "lap_depth_by_size.png").is_file()
