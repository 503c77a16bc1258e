"""Finished per-item evaluation results on disk: a JSON row plus a NumPy array, both atomic.

An evaluation (one MICC video, one NoW image) is done once; its row and per-point errors are
kept so a rerun with the same settings digest reuses them instead of fitting again.
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import numpy as np

from facerecon.io.atomic import atomic_path, atomic_write_text


def load_finished(json_path: Path, array_path: Path, digest: str, ok_status: str) -> tuple[dict, np.ndarray] | None:
    """The stored ``(row, array)`` when both files exist, the digest matches and the row's
    status is ``ok_status``; otherwise None (also for damaged files)."""
    if not json_path.is_file() or not array_path.is_file():
        return None
    try:
        stored = json.loads(json_path.read_text())
        if stored.get("digest") != digest or stored.get("row", {}).get("status") != ok_status:
            return None
        return stored["row"], np.load(array_path)
    except (ValueError, KeyError, OSError):
        return None


def store_finished(json_path: Path, array_path: Path, row: dict, array: np.ndarray, digest: str,
                   version: int) -> None:
    """Write the array, then the row (the row is the completion mark), each atomically."""
    with atomic_path(array_path) as tmp:
        with open(tmp, "wb") as handle:
            np.save(handle, array)
    atomic_write_text(json_path, json.dumps({"digest": digest, "version": version, "row": row}, indent=1))


def write_result_files(out_dir: Path, stem: str, data: dict, rows: list[dict], fields: list[str]) -> None:
    """``out_dir/<stem>.json`` (``data``) and ``out_dir/<stem>.csv`` (``rows``, columns ``fields``),
    each written atomically."""
    atomic_write_text(out_dir / f"{stem}.json", json.dumps(data, indent=2))
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=fields, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: row.get(k) for k in fields})
    atomic_write_text(out_dir / f"{stem}.csv", buffer.getvalue())


def one_line(exc: BaseException) -> str:
    """The first line of an exception's message (its type name when empty), at most 300 characters."""
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0][:300]


def mean_or_none(values) -> float | None:
    """Mean of the values that are not None, or None when there are none."""
    values = [v for v in values if v is not None]
    return float(np.mean(values)) if values else None
