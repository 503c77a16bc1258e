"""`facerecon synth`: deterministic renders with ground truth, multi-view groups, resume."""

from __future__ import annotations

import json

import h5py
import numpy as np
from click.testing import CliRunner
from PIL import Image

from facerecon.cli import main
from facerecon.facemodel.tensors import FaceModelTensors
from facerecon.render.camera import project_points
from facerecon.fitting.camera import model_to_camera
import torch


def test_synth_writes_images_and_ground_truth(ict_embedded_model_file, ict_embedded_model, tmp_path):
    args = ["synth", "--out", str(tmp_path), "--count", "4", "--views", "2", "--size", "128",
            "--face-model", str(ict_embedded_model_file), "--json", "-q"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["written"] == 4
    images = sorted((tmp_path / "images").glob("*.png"))
    assert [p.name for p in images] == ["000000_0.png", "000000_1.png", "000001_0.png", "000001_1.png"]
    with h5py.File(tmp_path / "synth.h5") as f:
        a, b = f["images"]["000000_0.png"], f["images"]["000000_1.png"]
        np.testing.assert_array_equal(a["identity"][()], b["identity"][()])  # one identity per group
        assert not np.allclose(a["angles"][()], b["angles"][()])  # different views
        assert a.attrs["identity"] == 0 and b.attrs["view"] == 1
        # the stored landmarks are the projection of the stored parameters
        tensors = FaceModelTensors(ict_embedded_model)
        p = {k: torch.as_tensor(a[k][()])[None] for k in ("identity", "expression", "angles", "translation")}
        cam = model_to_camera(tensors.shape(p["identity"], p["expression"]), p["angles"], p["translation"])
        k = torch.as_tensor(a["intrinsics"][()], dtype=torch.float32)[None]
        projected = project_points(tensors.landmark_points(cam), k)[0, :, :2].numpy()
        np.testing.assert_allclose(projected, a["landmarks68"][()], atol=1e-3)
    first = Image.open(images[0]).tobytes()
    again = CliRunner().invoke(main, args)
    assert json.loads(again.output)["skipped"] == 4 and json.loads(again.output)["written"] == 0
    (images[0]).unlink()
    redo = CliRunner().invoke(main, args)
    assert json.loads(redo.output)["written"] == 2 and Image.open(images[0]).tobytes() == first  # deterministic
