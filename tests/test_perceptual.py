"""Perceptual loss: ArcFace IR-ResNet layout, template alignment, cosine distance."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from facerecon.losses.perceptual import PerceptualLoss
from facerecon.networks.chips import similarity_to_template, warp_to_template
from facerecon.networks.iresnet import ARCFACE_TEMPLATE_112, IResNet, load_iresnet


@pytest.fixture(scope="module")
def r18_weights(tmp_path_factory):
    torch.manual_seed(0)
    network = IResNet("r18")
    path = tmp_path_factory.mktemp("w") / "backbone.pth"
    torch.save(network.state_dict(), path)
    return path, network


def test_parameter_names_follow_the_arcface_layout():
    names = set(IResNet("r50").state_dict())
    for expected in ("conv1.weight", "bn1.running_mean", "prelu.weight", "layer1.0.bn1.weight",
                     "layer1.0.downsample.0.weight", "layer3.13.conv2.weight", "bn2.weight", "fc.weight",
                     "features.running_var"):
        assert expected in names
    assert not any(k.startswith("layer3.14.") for k in names)  # r50: 3, 4, 14, 3 blocks


def test_load_checks_the_file(r18_weights, tmp_path):
    path, network = r18_weights
    loaded = load_iresnet(path)
    x = torch.rand(2, 3, 112, 112)
    torch.testing.assert_close(loaded(x), network.eval()(x))
    (tmp_path / "junk.pth").write_bytes(b"junk")
    with pytest.raises(ValueError, match="cannot read"):
        load_iresnet(tmp_path / "junk.pth")
    torch.save({"something": torch.zeros(1)}, tmp_path / "other.pth")
    with pytest.raises(ValueError, match="not an IR-ResNet"):
        load_iresnet(tmp_path / "other.pth")


def test_alignment_maps_points_onto_the_template():
    template = ARCFACE_TEMPLATE_112
    points = (template * 1.7 + torch.tensor([20.0, 35.0]))[None]
    matrix = similarity_to_template(points, template)
    mapped = points[0] @ matrix[0, :, :2].T + matrix[0, :, 2]
    torch.testing.assert_close(mapped, template, atol=1e-4, rtol=0)
    image = torch.zeros(1, 224, 224, 3)
    x, y = points[0, 2].round().long().tolist()
    image[0, y - 2:y + 3, x - 2:x + 3] = 1.0  # a bright dot on the nose tip
    warped = warp_to_template(image, matrix)[0, 0]
    peak = np.unravel_index(int(warped.argmax()), warped.shape)
    assert abs(peak[1] - template[2, 0].item()) <= 2 and abs(peak[0] - template[2, 1].item()) <= 2


def _photos(seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Two random 224 px photos, their (shared) 68 landmarks and a face mask in the middle."""
    torch.manual_seed(seed)
    photo = torch.rand(2, 224, 224, 3)
    landmarks = torch.rand(1, 68, 2).expand(2, -1, -1) * 80 + 70
    mask = torch.zeros(2, 224, 224, dtype=torch.bool)
    mask[:, 60:170, 60:170] = True
    return photo, landmarks, mask


def test_loss_is_zero_for_the_photo_and_grows_with_difference(r18_weights):
    _, network = r18_weights
    loss = PerceptualLoss(network)
    photo, landmarks, mask = _photos(1)
    same = loss(photo, photo, mask, landmarks)
    assert same.abs().max() < 1e-5
    rendered = photo.clone().requires_grad_(True)
    different = loss(rendered.clamp(0, 1) * 0.2, photo, mask, landmarks)
    assert (different > 1e-3).all()
    different.sum().backward()
    assert rendered.grad[:, 60:170, 60:170].abs().sum() > 0 and rendered.grad[:, :50, :50].abs().sum() == 0


def test_the_photo_embedding_is_computed_once_per_photo_batch(r18_weights, monkeypatch):
    _, network = r18_weights
    loss = PerceptualLoss(network)
    photo, landmarks, mask = _photos(2)
    rendered = photo * 0.5
    first = loss(rendered, photo, mask, landmarks)
    calls = []
    original = loss.embed
    monkeypatch.setattr(loss, "embed", lambda images, matrix: calls.append(images) or original(images, matrix))
    again = loss(rendered, photo, mask, landmarks.clone())  # same photo tensor, equal landmarks: reused
    assert torch.equal(first, again) and len(calls) == 1  # only the render was embedded
    photo[0, 100, 100] = 0.0  # changed in place: recomputed
    loss(rendered, photo, mask, landmarks)
    assert len(calls) == 3
    other = photo.clone()  # another tensor: recomputed, and the same value as without the cache
    fresh = PerceptualLoss(network)(rendered, other, mask, landmarks + 1.0)
    assert torch.allclose(loss(rendered, other, mask, landmarks + 1.0), fresh)
    assert len(calls) == 5
