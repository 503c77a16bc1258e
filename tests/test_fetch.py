"""Model download: resume, checksum, extraction and install, with a local byte source."""

from __future__ import annotations

import hashlib
import zipfile

import numpy as np
import pytest

from facerecon.facemodel import fetch
from facerecon.stages.model_install import fetch_and_install_ict
from facerecon.facemodel.model import load_face_model
from tests.ict_fixtures import write_mini_checkout


class LocalServer:
    """Stands in for the network: serves bytes with Range support, can cut off mid-way."""

    def __init__(self, payload: bytes, cut_after: int | None = None, honour_range: bool = True):
        self.payload = payload
        self.cut_after = cut_after
        self.honour_range = honour_range
        self.requests: list[int] = []

    def __call__(self, url: str, start: int):
        self.requests.append(start)
        begin = start if self.honour_range else 0
        body = self.payload[begin:]
        cut = self.cut_after

        def chunks():
            sent = 0
            for i in range(0, len(body), 1000):
                block = body[i:i + 1000]
                if cut is not None and sent + len(block) > cut:
                    raise fetch.DownloadError("connection reset")
                sent += len(block)
                yield block

        self.cut_after = None  # only the first request breaks
        return len(self.payload), self.honour_range and start > 0, chunks()


def test_download_resumes_after_interruption(tmp_path):
    payload = np.random.default_rng(0).bytes(25_000)
    server = LocalServer(payload, cut_after=12_000)
    target = tmp_path / "file.bin"
    with pytest.raises(fetch.DownloadError):
        fetch.download("https://example.invalid/f", target, opener=server)
    assert not target.exists() and (tmp_path / "file.bin.part").stat().st_size == 12_000
    seen = []
    digest = fetch.download("https://example.invalid/f", target, opener=server,
                            progress=lambda done, total: seen.append((done, total)))
    assert server.requests == [0, 12_000]
    assert target.read_bytes() == payload
    assert digest == hashlib.sha256(payload).hexdigest()
    assert seen[0] == (12_000, 25_000) and seen[-1] == (25_000, 25_000)


def test_download_restarts_when_server_ignores_range(tmp_path):
    payload = b"x" * 5000 + b"y" * 5000
    (tmp_path / "f.part").write_bytes(b"garbage")
    server = LocalServer(payload, honour_range=False)
    fetch.download("https://example.invalid/f", tmp_path / "f", opener=server)
    assert (tmp_path / "f").read_bytes() == payload


def test_checksum_mismatch_rejects_file(tmp_path):
    server = LocalServer(b"abc" * 100)
    with pytest.raises(fetch.DownloadError, match="checksum mismatch"):
        fetch.download("https://example.invalid/f", tmp_path / "f", expected_sha256="0" * 64, opener=server)
    assert not (tmp_path / "f").exists() and not (tmp_path / "f.part").exists()


def test_damaged_archive_is_reported(tmp_path):
    bad = tmp_path / "a.zip"
    bad.write_bytes(b"not a zip")
    with pytest.raises(fetch.DownloadError, match="not a valid zip"):
        fetch.extract_facex_model(bad, tmp_path / "out")


def test_fetch_and_install_from_archive_bytes(ict_npz, tmp_path):
    checkout = write_mini_checkout(ict_npz, tmp_path / "src" / "ICT-FaceKit-master", n_identity=2, n_expression=2)
    archive = tmp_path / "ict.zip"
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED) as zf:
        for file in sorted(checkout.rglob("*")):
            zf.write(file, file.relative_to(checkout.parent).as_posix())
    payload = archive.read_bytes()
    server = LocalServer(payload, cut_after=len(payload) // 2)
    with pytest.raises(fetch.DownloadError):
        fetch_and_install_ict(progress=lambda *_: None, embed=False, opener=server)
    path = fetch_and_install_ict(progress=lambda *_: None, embed=False, opener=server,
                                 sha256=hashlib.sha256(payload).hexdigest())
    model = load_face_model(path)
    assert path.name == "ict.h5" and model.n_identity == 2 and model.n_vertices == 9409
    assert hashlib.sha256(payload).hexdigest() in model.provenance
    assert server.requests[-1] == len(payload) // 2 // 1000 * 1000  # resumed, not restarted
