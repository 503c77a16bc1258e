"""The generic crash-safe result store: shards, packing, reading, lock, kill -9."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest

from facerecon.io.store import (ResultStore, StoreError, StoreLockedError, decode_key, encode_key, lock_path,
                                open_results, parts_dir, read_index)

REPO_ROOT = Path(__file__).resolve().parents[1]


def _writer(value: int):
    def write(group: h5py.Group) -> None:
        group.create_dataset("values", data=np.full((50, 7), value, dtype=np.int32), compression="gzip")
        group.create_group("sub").attrs["n"] = value
    return write


def _check_item(group: h5py.Group, value: int) -> None:
    assert group["values"].shape == (50, 7) and (group["values"][()] == value).all()
    assert group["sub"].attrs["n"] == value


def test_key_encoding_round_trip():
    for key in ["a.jpg", "dir/sub/ünï cödé ✓.png", ".hidden/x", "50%/a%2F.png", "..", "a//b"]:
        name = encode_key(key)
        assert "/" not in name and name not in (".", "..") and decode_key(name) == key


def test_write_pack_read(tmp_path):
    out = tmp_path / "out.h5"
    with ResultStore(out, kind="test", file_attrs={"tool": "t", "settings": {"a": 1}}) as store:
        for i in range(5):
            store.write_item(f"dir/item {i}.png", _writer(i), {"sha256": f"s{i}", "status": "ok"})
        assert len(list(parts_dir(out).glob("*.h5"))) == 5
        assert lock_path(out).exists()
    assert not parts_dir(out).exists() and not lock_path(out).exists()
    with h5py.File(out, "r") as f:
        assert f.attrs["format"] == "facerecon-results" and f.attrs["kind"] == "test"
        assert json.loads(f.attrs["settings"]) == {"a": 1}
        assert len(f["items"]) == 5
    with open_results(out) as results:
        assert results.keys() == [f"dir/item {i}.png" for i in range(5)]
        for i in range(5):
            _check_item(results[f"dir/item {i}.png"], i)
            assert results[f"dir/item {i}.png"].attrs["key"] == f"dir/item {i}.png"
    assert read_index(out)["dir/item 3.png"]["sha256"] == "s3"


def test_leftover_shards_are_read_and_merged(tmp_path):
    out = tmp_path / "out.h5"
    with ResultStore(out, kind="test") as store:
        store.write_item("old", _writer(1), {"sha256": "a"})
        store.write_item("kept", _writer(2), {"sha256": "b"})
    # a "crashed" run: shards written, never packed, lock left behind by a dead holder
    store = ResultStore(out, kind="test")
    store.open()
    store.write_item("new", _writer(3), {"sha256": "c"})
    store.write_item("old", _writer(4), {"sha256": "d"})  # supersedes the packed one
    store.close(pack=False)
    with open_results(out) as results:
        assert sorted(results.keys()) == ["kept", "new", "old"]
        _check_item(results["old"], 4)
        _check_item(results["kept"], 2)
    with h5py.File(out, "r") as f:  # OUT itself still holds the previous state
        assert sorted(f["items"]) == ["kept", "old"]
    with ResultStore(out, kind="test") as store:  # opening merges the leftovers
        assert not parts_dir(out).exists()
        assert store.is_done("old", "d") and not store.is_done("old", "a")
    with open_results(out) as results:
        _check_item(results["old"], 4)
        _check_item(results["new"], 3)


def test_is_done_checks_sha_and_status(tmp_path):
    with ResultStore(tmp_path / "o.h5", kind="test") as store:
        store.write_item("x", None, {"sha256": "abc", "status": "failed"})
        assert store.is_done("x") and store.is_done("x", "abc")
        assert not store.is_done("x", "abd")
        assert not store.is_done("x", "abc", statuses=("ok",))
        assert not store.is_done("y")


def test_periodic_pack(tmp_path):
    out = tmp_path / "o.h5"
    with ResultStore(out, kind="test", pack_interval=0.01) as store:
        store.write_item("a", _writer(1))
        time.sleep(0.02)
        assert store.maybe_pack()
        assert out.exists() and not parts_dir(out).exists()
        store.write_item("b", _writer(2))
        with open_results(out) as results:
            assert results.keys() == ["a", "b"]


def test_temporaries_of_killed_runs_are_removed(tmp_path):
    out = tmp_path / "o.h5"
    with ResultStore(out, kind="test") as store:
        store.write_item("a", _writer(1))
    stale_pack = tmp_path / ".o.h5.abc123.tmp"
    stale_pack.write_bytes(b"partial")
    parts_dir(out).mkdir()
    stale_shard = parts_dir(out) / ".0123.h5.xyz.tmp"
    stale_shard.write_bytes(b"partial")
    with ResultStore(out, kind="test"):
        assert not stale_pack.exists() and not stale_shard.exists()
    with open_results(out) as results:
        assert results.keys() == ["a"]


def test_refuses_foreign_files(tmp_path):
    other = tmp_path / "other.h5"
    with ResultStore(other, kind="fits"):
        pass
    with pytest.raises(StoreError, match="not a facerecon detections file"):
        ResultStore(other, kind="detections").open()
    junk = tmp_path / "junk.h5"
    junk.write_text("not hdf5")
    with pytest.raises(StoreError, match="not a readable HDF5 file"):
        ResultStore(junk, kind="detections").open()
    assert not lock_path(junk).exists()  # the lock is released after a refusal


def test_second_writer_is_refused_in_process(tmp_path):
    out = tmp_path / "o.h5"
    with ResultStore(out, kind="test"):
        with pytest.raises(StoreLockedError) as info:
            ResultStore(out, kind="test").open()
        assert f"process {os.getpid()}" in str(info.value)
    with ResultStore(out, kind="test"):  # free again afterwards
        pass


_HOLD = """
import sys, time
from facerecon.io.store import ResultStore
store = ResultStore(sys.argv[1], kind="test")
store.open()
print("locked", flush=True)
time.sleep(60)
"""


def _python(code: str, *args: str, **kwargs) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT))
    return subprocess.Popen([sys.executable, "-c", code, *args], env=env, stdout=subprocess.PIPE, text=True,
                            **kwargs)


def test_lock_between_processes_and_stale_takeover(tmp_path):
    out = tmp_path / "o.h5"
    holder = _python(_HOLD, str(out))
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(StoreLockedError) as info:
            ResultStore(out, kind="test").open()
        assert f"process {holder.pid}" in str(info.value) and "being written" in str(info.value)
    finally:
        holder.kill()
        holder.wait()
    assert lock_path(out).exists()  # killed holder leaves its lock file behind
    with ResultStore(out, kind="test") as store:  # ... which is taken over
        store.write_item("a", None)
    with open_results(out) as results:
        assert results.keys() == ["a"]


_WRITE_FOREVER = """
import sys, numpy as np
from facerecon.io.store import ResultStore
def write(value):
    def fill(group):
        group.create_dataset("values", data=np.full((200, 50), value, dtype=np.int32), compression="gzip")
        group.create_group("sub").attrs["n"] = value
    return fill
with ResultStore(sys.argv[1], kind="test", pack_interval=float(sys.argv[2])) as store:
    start = len(store.index)
    for i in range(start, start + 100000):
        store.write_item(f"item{i:06d}", write(i), {"value": i})
        print(i, flush=True)
        store.maybe_pack()
"""


@pytest.mark.parametrize("pack_interval", [0.0, 0.05])
def test_kill_9_never_loses_a_completed_item(tmp_path, pack_interval):
    out = tmp_path / "o.h5"
    rng = np.random.default_rng(int(pack_interval * 100))
    confirmed: set[int] = set()
    for _round in range(4):
        proc = _python(_WRITE_FOREVER, str(out), str(pack_interval))
        deadline = time.monotonic() + rng.uniform(0.6, 1.5)
        lines = []
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            lines.append(int(line))
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        confirmed.update(lines)
        with open_results(out) as results:
            stored = {int(k[4:]) for k in results.keys()}
            assert confirmed <= stored, "a completed item was lost"
            for key, group in results.items():
                value = int(key[4:])
                assert (group["values"][()] == value).all() and group["sub"].attrs["n"] == value
    assert len(confirmed) > 4
    with ResultStore(out, kind="test"):  # a final writer packs all leftovers
        pass
    with h5py.File(out, "r") as f:
        assert {int(k[4:]) for k in f["items"]} >= confirmed
    assert not parts_dir(out).exists()


_MANY_SHARDS_LOW_FD_LIMIT = """
import resource, sys
import h5py
from facerecon.io.store import ResultStore, open_results
resource.setrlimit(resource.RLIMIT_NOFILE, (40, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))
out = sys.argv[1]
with open_results(out) as results:
    values = [int(results[k]["values"][0, 0]) for k in results.keys()]
assert values == list(range(150)), values
with ResultStore(out, kind="test"):
    pass
with h5py.File(out, "r") as f:
    assert len(f["items"]) == 150
print("ok")
"""


def test_many_leftover_shards_with_few_file_handles(tmp_path):
    out = tmp_path / "o.h5"
    store = ResultStore(out, kind="test", pack_interval=0)
    store.open()
    for i in range(150):
        store.write_item(f"item{i:03d}", _writer(i))
    store.close(pack=False)
    assert len(list(parts_dir(out).glob("*.h5"))) == 150
    proc = _python(_MANY_SHARDS_LOW_FD_LIMIT, str(out))
    stdout, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0 and stdout.strip() == "ok"
    assert not parts_dir(out).exists()
