"""torchvision-compatible ResNets (R-Net backbone)."""

from __future__ import annotations

import pytest
import torch

from facerecon.networks.resnet import ResNet, load_backbone_weights

# A few of torchvision's resnet50 parameter names and shapes (public facts of that model).
TORCHVISION_RESNET50 = {
    "conv1.weight": (64, 3, 7, 7),
    "layer1.0.conv1.weight": (64, 64, 1, 1),
    "layer1.0.downsample.0.weight": (256, 64, 1, 1),
    "layer2.0.conv2.weight": (128, 128, 3, 3),
    "layer3.5.bn3.running_var": (1024,),
    "layer4.2.conv3.weight": (2048, 512, 1, 1),
    "fc.weight": (1000, 2048),
}


def test_resnet50_matches_torchvision_names_and_sizes():
    state = ResNet("resnet50").state_dict()
    for name, shape in TORCHVISION_RESNET50.items():
        assert tuple(state[name].shape) == shape
    assert sum(p.numel() for p in ResNet("resnet50").parameters()) == 25_557_032  # torchvision's count


def test_resnet18_forward_shapes():
    net = ResNet("resnet18", num_classes=10).eval()
    out = net(torch.rand(2, 3, 224, 224))
    assert out.shape == (2, 10) and net.first_stage.shape == (2, 64, 56, 56)
    assert sum(p.numel() for p in ResNet("resnet18").parameters()) == 11_689_512


def test_backbone_weights_load_without_fc(tmp_path):
    source = ResNet("resnet18")
    torch.save(source.state_dict(), tmp_path / "r18.pth")
    target = ResNet("resnet18", num_classes=7)
    assert load_backbone_weights(target, tmp_path / "r18.pth") == []
    torch.testing.assert_close(target.layer3[1].conv2.weight, source.layer3[1].conv2.weight)
    with pytest.raises(ValueError, match="does not match"):
        load_backbone_weights(ResNet("resnet50"), tmp_path / "r18.pth")
    (tmp_path / "bad.pth").write_bytes(b"nope")
    with pytest.raises(ValueError, match="cannot read"):
        load_backbone_weights(target, tmp_path / "bad.pth")
