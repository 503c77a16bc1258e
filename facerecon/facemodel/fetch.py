"""Downloading the public ICT-FaceKit archive and turning it into a face model.

The network is touched in exactly one function, :func:`open_url_range`; everything
after the bytes arrive (resume, checksum, extraction, import) works on local files and
is tested without a network.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import urllib.error
import urllib.request
import zipfile
from pathlib import Path
from typing import Callable, Iterator

from facerecon.facemodel.model import FaceModelError
from facerecon.paths import cache_dir

#: The public ICT-FaceKit repository archive (MIT licence).
ICT_ARCHIVE_URL = "https://github.com/ICT-VGL/ICT-FaceKit/archive/refs/heads/master.zip"
#: The upstream publishes no checksum and branch archives can change; pass
#: ``--sha256`` (or ``FACERECON_ICT_SHA256``) to pin one. The computed digest is always
#: recorded in the model's provenance.
ICT_ARCHIVE_SHA256: str | None = os.environ.get("FACERECON_ICT_SHA256") or None
CHUNK = 1 << 20


class DownloadError(FaceModelError):
    """A download failed (network, HTTP status or checksum)."""


def open_url_range(url: str, start: int, timeout: float = 60.0) -> tuple[int | None, bool, Iterator[bytes]]:
    """Open ``url`` from byte ``start`` on. The only function that uses the network.

    Returns:
        (total size in bytes or None, whether the server honoured the range, chunk iterator)
    """
    request = urllib.request.Request(url, headers={"User-Agent": "facerecon"})
    if start > 0:
        request.add_header("Range", f"bytes={start}-")
    try:
        response = urllib.request.urlopen(request, timeout=timeout)  # noqa: S310 (https URL by design)
    except (urllib.error.URLError, OSError) as exc:
        raise DownloadError(f"cannot download {url}: {getattr(exc, 'reason', exc)}") from exc
    partial = response.status == 206
    length = response.headers.get("Content-Length")
    total = (int(length) + (start if partial else 0)) if length else None

    def chunks() -> Iterator[bytes]:
        with response:
            while True:
                block = response.read(CHUNK)
                if not block:
                    return
                yield block

    return total, partial, chunks()


def download(
    url: str,
    destination: str | Path,
    expected_sha256: str | None = None,
    progress: Callable[[int, int | None], None] | None = None,
    opener: Callable[[str, int], tuple[int | None, bool, Iterator[bytes]]] = open_url_range,
) -> str:
    """Download ``url`` to ``destination`` with resume and an optional checksum.

    Bytes go to ``destination + '.part'``; an interrupted download continues from there
    on the next call (when the server supports ranges, else it restarts). The finished
    file is moved into place only after its SHA-256 matches ``expected_sha256`` (when
    given). ``progress(done, total)`` is called as bytes arrive.

    Returns:
        the hex SHA-256 of the downloaded file.
    """
    destination = Path(destination)
    destination.parent.mkdir(parents=True, exist_ok=True)
    part = destination.with_name(destination.name + ".part")
    start = part.stat().st_size if part.exists() else 0
    total, partial, chunks = opener(url, start)
    if start and not partial:
        start = 0  # server ignored the range: start over
    done = start
    with open(part, "ab" if start else "wb") as handle:
        if progress:
            progress(done, total)
        for block in chunks:
            handle.write(block)
            done += len(block)
            if progress:
                progress(done, total)
        handle.flush()
        os.fsync(handle.fileno())
    if total is not None and done != total:
        raise DownloadError(f"download of {url} stopped at {done} of {total} bytes; run the command again to resume")
    digest = sha256_file(part)
    if expected_sha256 and digest.lower() != expected_sha256.lower():
        part.unlink()
        raise DownloadError(f"checksum mismatch for {url}: expected {expected_sha256}, got {digest}")
    os.replace(part, destination)
    return digest


def sha256_file(path: str | Path) -> str:
    """Hex SHA-256 of a file, read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(CHUNK), b""):
            h.update(block)
    return h.hexdigest()


def extract_facex_model(archive: str | Path, target: str | Path) -> Path:
    """Extract ``FaceXModel/*.obj`` and ``vertex_indices.json`` from an ICT-FaceKit zip.

    Returns:
        the extracted ``FaceXModel`` folder.
    """
    archive, target = Path(archive), Path(target)
    try:
        with zipfile.ZipFile(archive) as zf:
            bad = zf.testzip()
            if bad is not None:
                raise DownloadError(f"{archive.name} is damaged (CRC error in {bad}); delete it and fetch again")
            members = [
                name for name in zf.namelist()
                if "/FaceXModel/" in f"/{name}" and (name.endswith(".obj") or name.endswith("vertex_indices.json"))
            ]
            if not any(name.endswith("generic_neutral_mesh.obj") for name in members):
                raise DownloadError(f"{archive.name} holds no FaceXModel/generic_neutral_mesh.obj")
            staging = target.with_name(target.name + ".extracting")
            shutil.rmtree(staging, ignore_errors=True)
            facex = staging / "FaceXModel"
            facex.mkdir(parents=True)
            for name in members:
                with zf.open(name) as src, open(facex / Path(name).name, "wb") as dst:
                    shutil.copyfileobj(src, dst)
    except zipfile.BadZipFile as exc:
        raise DownloadError(f"{archive.name} is not a valid zip archive; delete it and fetch again") from exc
    shutil.rmtree(target, ignore_errors=True)
    os.replace(staging, target)
    return target / "FaceXModel"


def fetch_ict_checkout(
    url: str = ICT_ARCHIVE_URL,
    expected_sha256: str | None = ICT_ARCHIVE_SHA256,
    progress: Callable[[int, int | None], None] | None = None,
    opener: Callable[[str, int], tuple[int | None, bool, Iterator[bytes]]] = open_url_range,
) -> tuple[Path, str]:
    """Download (or resume) the ICT-FaceKit archive into the cache and extract it.

    Returns:
        (the extracted FaceXModel folder, the archive's SHA-256)
    """
    archive = cache_dir() / "ICT-FaceKit.zip"
    if archive.exists() and expected_sha256 and sha256_file(archive) != expected_sha256.lower():
        archive.unlink()
    if archive.exists():
        digest = sha256_file(archive)
    else:
        digest = download(url, archive, expected_sha256, progress=progress, opener=opener)
    facex = extract_facex_model(archive, cache_dir() / "ICT-FaceKit")
    return facex, digest
