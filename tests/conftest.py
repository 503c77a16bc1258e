"""Shared fixtures.

The ICT-FaceKit archive used by many tests is found through ``FACERECON_TEST_ICT_NPZ``
(default: ``../shared/facemodels/ict_face_light.npz`` beside the repository). When it is
missing the tests that need it are skipped, unless ``FACERECON_REQUIRE_TEST_DATA=1``
(set by CI), in which case they fail.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_ICT_NPZ = REPO_ROOT.parent / "shared" / "facemodels" / "ict_face_light.npz"


def _ict_npz_path() -> Path:
    return Path(os.environ.get("FACERECON_TEST_ICT_NPZ", DEFAULT_ICT_NPZ))


def require_file(path: Path, what: str) -> Path:
    if path.is_file():
        return path
    message = f"{what} not found at {path} (set FACERECON_TEST_ICT_NPZ / FACERECON_SHARED_DIR)"
    if os.environ.get("FACERECON_REQUIRE_TEST_DATA") == "1":
        pytest.fail(message)
    pytest.skip(message)


#: every device a device-parametrised test runs on; an absent device is skipped, not failed
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(),
                                                                 reason="CUDA is not available"))]


@pytest.fixture(params=DEVICES)
def device(request) -> torch.device:
    """A torch device: the test runs once on the CPU and once on CUDA (skipped without a GPU)."""
    return torch.device(request.param)


@pytest.fixture(autouse=True)
def isolated_data_dir(tmp_path_factory, monkeypatch):
    """Every test gets its own empty data directory and never downloads."""
    home = tmp_path_factory.mktemp("facerecon_home")
    monkeypatch.setenv("FACERECON_HOME", str(home))
    monkeypatch.setenv("FACERECON_NO_DOWNLOAD", "1")
    monkeypatch.delenv("FACERECON_FACE_MODEL", raising=False)
    return home


@pytest.fixture(scope="session")
def ict_npz() -> Path:
    return require_file(_ict_npz_path(), "ICT-FaceKit archive")


@pytest.fixture(scope="session")
def ict_model(ict_npz):
    """The ICT face model converted from the shared archive (no dense embedding)."""
    from facerecon.facemodel.ict import import_ict

    return import_ict(ict_npz)


@pytest.fixture(scope="session")
def ict_model_file(ict_model, tmp_path_factory) -> Path:
    """The converted ICT model saved as a facerecon .h5 file."""
    from facerecon.facemodel.model import save_face_model

    return save_face_model(ict_model, tmp_path_factory.mktemp("models") / "ict.h5")


@pytest.fixture(scope="session")
def ict_embedded_model(ict_model):
    """The ICT model with its dense landmark embedding (detector on rendered mean faces)."""
    from facerecon.facemodel.embedding import embed_dense_landmarks

    return embed_dense_landmarks(ict_model)


@pytest.fixture(scope="session")
def ict_embedded_model_file(ict_embedded_model, tmp_path_factory) -> Path:
    from facerecon.facemodel.model import save_face_model

    return save_face_model(ict_embedded_model, tmp_path_factory.mktemp("models") / "ict_dense.h5")


@pytest.fixture(scope="session")
def realdata() -> Path:
    """``../shared/realdata`` (or ``$FACERECON_SHARED_DIR/realdata``): real photos with 68-point
    ground truth, identity albums and a head scan. Skipped when missing, failed in CI."""
    shared = Path(os.environ.get("FACERECON_SHARED_DIR", REPO_ROOT.parent / "shared"))
    folder = shared / "realdata"
    require_file(folder / "README.md", "real-data folder")
    return folder


@pytest.fixture(scope="session")
def astronaut_path() -> Path:
    return REPO_ROOT / "examples" / "astronaut.png"
