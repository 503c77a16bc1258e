"""A crash-safe HDF5 result store shared by the batch stages (detect, fit, ...).

A store is one output file ``OUT`` (self-contained HDF5) plus, while a run is going on,
a folder of *shards* ``OUT.parts/`` and a lock file ``OUT.lock``:

* Each completed item (one input image, say) is written at once as its own small HDF5
  file ``OUT.parts/<hash of key>.h5``, atomically: temporary file, fsync, ``os.replace``.
* ``OUT`` is rebuilt ("packed") atomically from its previous content plus the shards
  (a new temporary file, ``h5py`` copies, fsync, ``os.replace``), after which the merged
  shards are deleted. Packing happens when the store is closed (end of run, Ctrl-C) and
  periodically during a run (every ``pack_interval`` seconds, stretched so packing takes
  at most about a tenth of the run time).
* Readers (:func:`open_results`) merge ``OUT`` with leftover shards, a shard winning over
  an item of the same key in ``OUT``. Because every file is replaced atomically, a kill
  at any moment loses no completed item; the next writer merges leftover shards first.
* ``OUT.lock`` admits one writer. It is held with ``flock`` (released by the kernel when
  the process dies, so a stale lock from a killed run is taken over) and records pid,
  host and start time for the message the second writer prints. Where ``flock`` is not
  available the lock is an ``O_EXCL`` file whose pid is checked for liveness.

Layout of ``OUT`` (and of every shard)::

    /                       attrs: format="facerecon-results", store_version, kind, ...
    /<items_group>/<name>   one group per item; attrs["key"] = the item's key

``<name>`` is the key with ``%``, ``/`` and a leading ``.`` percent-encoded
(:func:`encode_key`). Files are written with h5py's default format bounds (not
``libver="latest"``), so no "file is open" flag can outlive a crash.
"""

from __future__ import annotations

import collections
import contextlib
import datetime as _dt
import errno
import hashlib
import json
import os
import socket
import time
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

import h5py
import numpy as np

from facerecon.errors import InputError
from facerecon.io.atomic import atomic_path

STORE_FORMAT = "facerecon-results"
STORE_VERSION = 1
DEFAULT_ITEMS_GROUP = "items"

try:  # POSIX advisory locks; absent on Windows
    import fcntl as _fcntl
except ImportError:  # pragma: no cover - non-POSIX
    _fcntl = None


class StoreError(InputError):
    """The store cannot be opened or written."""


class StoreLockedError(StoreError):
    """Another live process is writing the same output."""


# --------------------------------------------------------------------------- names


def encode_key(key: str) -> str:
    """HDF5 group name for ``key``: ``%`` -> ``%25``, ``/`` -> ``%2F``, leading ``.`` -> ``%2E``."""
    if not key:
        raise ValueError("empty item key")
    name = key.replace("%", "%25").replace("/", "%2F")
    if name.startswith("."):
        name = "%2E" + name[1:]
    return name


def decode_key(name: str) -> str:
    """Inverse of :func:`encode_key`."""
    if name.startswith("%2E"):
        name = "." + name[3:]
    return name.replace("%2F", "/").replace("%25", "%")


def shard_name(key: str) -> str:
    """File name of the shard holding ``key`` (safe on every file system)."""
    return hashlib.sha256(key.encode("utf-8")).hexdigest()[:32] + ".h5"


def parts_dir(path: str | os.PathLike) -> Path:
    """Folder of shards beside the output ``path``."""
    path = Path(path)
    return path.with_name(path.name + ".parts")


def lock_path(path: str | os.PathLike) -> Path:
    """Lock file beside the output ``path``."""
    path = Path(path)
    return path.with_name(path.name + ".lock")


def _fsync_dir(folder: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _list_shards(folder: Path) -> list[Path]:
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.suffix == ".h5" and not p.name.startswith("."))


def _attr_value(value: Any) -> Any:
    if isinstance(value, (dict, list, tuple)) and not (isinstance(value, (list, tuple))
                                                       and value and all(isinstance(v, (int, float)) for v in value)):
        return json.dumps(value, sort_keys=True)
    if value is None:
        return ""
    return value


def set_attrs(obj: h5py.HLObject, attrs: Mapping[str, Any]) -> None:
    """Set HDF5 attributes; dicts and mixed lists are stored as JSON text, None as ''."""
    for name, value in attrs.items():
        obj.attrs[name] = _attr_value(value)


def attrs_dict(obj: h5py.HLObject) -> dict[str, Any]:
    """Attributes as plain Python values (bytes decoded, numpy scalars unwrapped)."""
    out: dict[str, Any] = {}
    for name, value in obj.attrs.items():
        if isinstance(value, bytes):
            value = value.decode("utf-8", "replace")
        elif isinstance(value, np.generic):
            value = value.item()
        elif isinstance(value, np.ndarray):
            value = value.tolist()
        out[name] = value
    return out


# --------------------------------------------------------------------------- lock


def _pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    except OSError:
        return False
    return True


def _read_lock_info(path: Path) -> dict:
    with contextlib.suppress(OSError, ValueError):
        return json.loads(path.read_text(encoding="utf-8") or "{}")
    return {}


def _describe_holder(info: dict) -> str:
    if not info:
        return "another process"
    return f"process {info.get('pid', '?')} on {info.get('host', '?')} (since {info.get('started', '?')})"


class WriterLock:
    """Exclusive writer lock on ``OUT.lock`` (see the module notes)."""

    def __init__(self, output: str | os.PathLike):
        self.path = lock_path(output)
        self._fd: int | None = None
        self._uses_flock = False

    def _info(self) -> bytes:
        return json.dumps({
            "pid": os.getpid(), "host": socket.gethostname(),
            "started": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        }).encode("utf-8")

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if _fcntl is not None:
            try:
                self._acquire_flock()
                return
            except OSError as exc:
                if exc.errno not in (errno.ENOLCK, errno.ENOSYS, errno.EOPNOTSUPP):
                    raise
                # A file system without flock: fall back to the O_EXCL lock file below.
        self._acquire_exclusive_file()

    def _refuse(self, info: dict) -> None:
        raise StoreLockedError(
            f"{self.path.name[:-5]} is being written by {_describe_holder(info)}; wait for it to finish or "
            f"choose another output (remove {self.path} only if that process no longer exists)")

    def _acquire_flock(self) -> None:
        for _attempt in range(20):
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                _fcntl.flock(fd, _fcntl.LOCK_EX | _fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                self._refuse(_read_lock_info(self.path))
            except BaseException:
                empty = os.fstat(fd).st_size == 0
                os.close(fd)
                if empty:  # our own fresh file: do not leave it behind for the fallback
                    with contextlib.suppress(OSError):
                        self.path.unlink()
                raise
            # The holder may have unlinked the file between our open and flock: then the
            # lock we got is on a dead inode and we try again with the current file.
            try:
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if not same:
                os.close(fd)
                continue
            os.ftruncate(fd, 0)
            os.write(fd, self._info())
            os.fsync(fd)
            self._fd = fd
            self._uses_flock = True
            return
        raise StoreError(f"could not acquire {self.path} (it keeps changing)")

    def _acquire_exclusive_file(self) -> None:
        for _attempt in range(2):
            try:
                fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                info = _read_lock_info(self.path)
                if info:
                    stale = info.get("host") == socket.gethostname() and not _pid_alive(int(info.get("pid", 0)))
                else:  # unreadable or empty: a writer killed while creating it, or one starting now
                    try:
                        stale = time.time() - self.path.stat().st_mtime > 10.0
                    except OSError:
                        stale = True
                if not stale:
                    self._refuse(info)
                with contextlib.suppress(FileNotFoundError):
                    self.path.unlink()
                continue
            os.write(fd, self._info())
            os.fsync(fd)
            self._fd = fd
            return
        self._refuse(_read_lock_info(self.path))

    def release(self) -> None:
        if self._fd is None:
            return
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()  # unlink while still holding the lock, then let go
        os.close(self._fd)
        self._fd = None

    @property
    def held(self) -> bool:
        return self._fd is not None


# --------------------------------------------------------------------------- writer


class ResultStore:
    """Writer side of a store. Use as a context manager::

        with ResultStore("out.h5", kind="detections", items_group="images") as store:
            if not store.is_done(key, sha256):
                store.write_item(key, lambda group: group.create_dataset(...), {"sha256": sha256})
                store.maybe_pack()

    Opening takes the writer lock, removes temporary files left by killed runs and packs
    leftover shards. Leaving the block (normally, by an exception or by Ctrl-C) packs
    and releases the lock.

    Args:
        path: the output file ``OUT``.
        kind: what the items are (stored as the root attribute ``kind``); an existing
            output of another kind is refused.
        items_group: name of the group holding the items.
        file_attrs: root attributes to set on ``OUT`` at each pack.
        pack_interval: seconds between periodic packs (0 disables periodic packing).
    """

    def __init__(self, path: str | os.PathLike, *, kind: str, items_group: str = DEFAULT_ITEMS_GROUP,
                 file_attrs: Mapping[str, Any] | None = None, pack_interval: float = 60.0):
        self.path = Path(path)
        self.kind = kind
        self.items_group = items_group
        self.file_attrs = dict(file_attrs or {})
        self.pack_interval = float(pack_interval)
        self.parts = parts_dir(self.path)
        self._lock = WriterLock(self.path)
        self._index: dict[str, dict[str, Any]] = {}
        self._next_pack = 0.0
        self._open = False

    # ----------------------------------------------------------------- lifecycle
    def __enter__(self) -> "ResultStore":
        self.open()
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.close()

    def open(self) -> None:
        if self._open:
            return
        self._lock.acquire()
        try:
            self._check_existing()
            self._remove_temporaries()
            self._index = read_index(self.path, self.items_group)
            if _list_shards(self.parts):
                self.pack()
            self._next_pack = time.monotonic() + self.pack_interval
            self._open = True
        except BaseException:
            self._lock.release()
            raise

    def close(self, pack: bool = True) -> None:
        """Pack pending shards (unless ``pack`` is False) and release the lock."""
        if not self._open:
            return
        try:
            if pack:
                self.pack()
        finally:
            self._open = False
            self._lock.release()

    def _check_existing(self) -> None:
        if not self.path.exists():
            return
        try:
            with h5py.File(self.path, "r") as f:
                fmt = f.attrs.get("format", "")
                kind = f.attrs.get("kind", "")
        except OSError as exc:
            raise StoreError(f"{self.path} exists but is not a readable HDF5 file ({exc}); "
                             "move it away or choose another output") from None
        fmt = fmt.decode() if isinstance(fmt, bytes) else str(fmt)
        kind = kind.decode() if isinstance(kind, bytes) else str(kind)
        if fmt != STORE_FORMAT or (kind and kind != self.kind):
            raise StoreError(f"{self.path} is not a facerecon {self.kind} file (format={fmt or '?'}, "
                             f"kind={kind or '?'}); choose another output")

    def _remove_temporaries(self) -> None:
        # Temporary files of killed writers: ``.OUT.*.tmp`` beside OUT and ``.*.tmp`` in parts.
        candidates = list(self.path.parent.glob(f".{self.path.name}.*.tmp"))
        if self.parts.is_dir():
            candidates += [p for p in self.parts.iterdir() if p.name.startswith(".") and p.name.endswith(".tmp")]
        for tmp in candidates:
            with contextlib.suppress(OSError):
                tmp.unlink()

    # ----------------------------------------------------------------- queries
    @property
    def index(self) -> dict[str, dict[str, Any]]:
        """key -> attributes of every item stored so far (``OUT`` and shards)."""
        return self._index

    def item_attrs(self, key: str) -> dict[str, Any] | None:
        return self._index.get(key)

    def is_done(self, key: str, sha256: str | None = None, statuses: tuple[str, ...] | None = None) -> bool:
        """True when ``key`` is stored (with the same ``sha256`` attribute when given, and a
        ``status`` attribute in ``statuses`` when given)."""
        attrs = self._index.get(key)
        if attrs is None:
            return False
        if sha256 is not None and attrs.get("sha256") != sha256:
            return False
        if statuses is not None and attrs.get("status") not in statuses:
            return False
        return True

    # ----------------------------------------------------------------- writing
    def write_item(self, key: str, write: Callable[[h5py.Group], None] | None,
                   attrs: Mapping[str, Any] | None = None) -> Path:
        """Store one completed item as a shard, atomically; returns the shard path.

        ``write(group)`` fills the item's group (datasets, subgroups); ``attrs`` become its
        attributes (``key`` is added). A previous result for ``key`` is superseded.
        """
        if not self._open:
            raise StoreError("store is not open")
        self.parts.mkdir(parents=True, exist_ok=True)
        target = self.parts / shard_name(key)
        all_attrs = dict(attrs or {})
        all_attrs["key"] = key
        with atomic_path(target, suffix=".tmp") as tmp:
            with h5py.File(tmp, "w") as f:
                set_attrs(f, {"format": STORE_FORMAT, "store_version": STORE_VERSION, "kind": self.kind,
                              "shard": True})
                group = f.require_group(self.items_group).create_group(encode_key(key))
                if write is not None:
                    write(group)
                set_attrs(group, all_attrs)
        # No directory fsync here: after a power loss the worst case is a missing shard,
        # i.e. an item done again on resume. The pack syncs the directory before it
        # deletes shards, where losing the rename would lose data.
        self._index[key] = {k: v for k, v in all_attrs.items()}
        return target

    def maybe_pack(self) -> bool:
        """Pack when the periodic interval has passed; returns True when it packed."""
        if self.pack_interval <= 0 or time.monotonic() < self._next_pack:
            return False
        self.pack()
        return True

    def pack(self) -> None:
        """Rebuild ``OUT`` from its content plus all shards, atomically; delete merged shards.

        Shards are opened one at a time, so any number of them can be merged.
        """
        started = time.monotonic()
        shards = _list_shards(self.parts)
        if not shards and self.path.exists() and not self._attrs_changed():
            self._schedule(started)
            return
        readable: list[Path] = []
        from_shards: set[str] = set()
        for shard in shards:
            names = _shard_item_names(shard, self.items_group)
            if names is None:
                continue  # unreadable (never expected): left in place, not merged, not deleted
            readable.append(shard)
            from_shards.update(names)
        with atomic_path(self.path, suffix=".tmp") as tmp:
            with h5py.File(tmp, "w") as dst:
                root_attrs: dict[str, Any] = {}
                items = dst.create_group(self.items_group)
                if self.path.exists():
                    with h5py.File(self.path, "r") as old:
                        root_attrs = attrs_dict(old)
                        for name in old.get(self.items_group, {}):
                            if name not in from_shards:
                                old.copy(old[self.items_group][name], items, name=name)
                root_attrs.update(self.file_attrs)
                root_attrs.update({"format": STORE_FORMAT, "store_version": STORE_VERSION, "kind": self.kind,
                                   "items_group": self.items_group})
                root_attrs.pop("shard", None)
                set_attrs(dst, root_attrs)
                for shard in readable:
                    with h5py.File(shard, "r") as sf:
                        for name in sf.get(self.items_group, {}):
                            if name not in items:
                                sf.copy(sf[self.items_group][name], items, name=name)
        _fsync_dir(self.path.parent)  # OUT's new content is durable before shards go
        for shard in readable:
            with contextlib.suppress(FileNotFoundError):
                shard.unlink()
        with contextlib.suppress(OSError):
            self.parts.rmdir()  # only when empty
        self._schedule(started)

    def _attrs_changed(self) -> bool:
        if not self.file_attrs:
            return False
        with h5py.File(self.path, "r") as f:
            current = attrs_dict(f)
        return any(current.get(k) != _attr_value(v) for k, v in self.file_attrs.items())

    def _schedule(self, started: float) -> None:
        took = time.monotonic() - started
        self._next_pack = time.monotonic() + max(self.pack_interval, 10.0 * took)


# --------------------------------------------------------------------------- reader


def read_index(path: str | os.PathLike, items_group: str = DEFAULT_ITEMS_GROUP) -> dict[str, dict[str, Any]]:
    """key -> item attributes for everything stored in ``path`` and its leftover shards."""
    with open_results(path, items_group) as results:
        return {key: attrs_dict(results[key]) for key in results.keys()}


def _shard_item_names(shard: Path, items_group: str) -> list[str] | None:
    """Item group names inside a shard; None when it cannot be read (e.g. deleted by a pack)."""
    try:
        with h5py.File(shard, "r") as f:
            return list(f.get(items_group, {}))
    except (OSError, KeyError):
        return None


class Results:
    """Read-only merged view of ``OUT`` and its leftover shards (see :func:`open_results`).

    Shard files are opened on demand and at most ``max_open`` of them stay open (least
    recently used are closed), so a group obtained from a shard stays valid until that
    many other shards were accessed; copy what you need (``group[name][()]``) meanwhile.
    """

    def __init__(self, path: str | os.PathLike, items_group: str = DEFAULT_ITEMS_GROUP, max_open: int = 32):
        self.path = Path(path)
        self.items_group = items_group
        self.max_open = max(1, int(max_open))
        self._main: h5py.File | None = None
        self._shards: collections.OrderedDict[Path, h5py.File] = collections.OrderedDict()
        self._where: dict[str, Path | None] = {}  # group name -> shard path, or None for OUT
        self.attrs: dict[str, Any] = {}
        # Shards first, then OUT: a concurrent pack replaces OUT before deleting shards,
        # so every item is seen in one place or the other.
        in_shards: dict[str, Path] = {}
        for shard in _list_shards(parts_dir(self.path)):
            for name in _shard_item_names(shard, items_group) or ():
                in_shards[name] = shard
        self._open_main()
        for name, shard in in_shards.items():
            self._where[name] = shard

    def _open_main(self) -> None:
        if self._main is not None:
            with contextlib.suppress(Exception):
                self._main.close()
            self._main = None
        if not self.path.exists():
            return
        try:
            self._main = h5py.File(self.path, "r")
        except OSError as exc:
            self.close()
            raise StoreError(f"cannot read {self.path}: {exc}") from None
        self.attrs = attrs_dict(self._main)
        for name in self._main.get(self.items_group, {}):
            self._where.setdefault(name, None)

    def _shard(self, shard: Path) -> h5py.File:
        f = self._shards.get(shard)
        if f is not None:
            self._shards.move_to_end(shard)
            return f
        try:
            f = h5py.File(shard, "r")
        except OSError:
            if not shard.exists():
                raise
            # probably out of file handles: close the cached shards and try once more
            for cached in self._shards.values():
                with contextlib.suppress(Exception):
                    cached.close()
            self._shards.clear()
            f = h5py.File(shard, "r")
        self._shards[shard] = f
        while len(self._shards) > self.max_open:
            _old, oldest = self._shards.popitem(last=False)
            with contextlib.suppress(Exception):
                oldest.close()
        return f

    def keys(self) -> list[str]:
        """Item keys, sorted."""
        return sorted(decode_key(name) for name in self._where)

    def __len__(self) -> int:
        return len(self._where)

    def __contains__(self, key: str) -> bool:
        return encode_key(key) in self._where

    def __getitem__(self, key: str) -> h5py.Group:
        name = encode_key(key)
        if name not in self._where:
            raise KeyError(key)
        shard = self._where[name]
        if shard is not None:
            try:
                return self._shard(shard)[self.items_group][name]
            except (OSError, KeyError):
                if shard.exists():
                    raise
                # merged into OUT and deleted by a writer's pack since we listed it
                self._where[name] = None
                self._open_main()
        if self._main is None or name not in self._main.get(self.items_group, {}):
            raise KeyError(key)
        return self._main[self.items_group][name]

    def __iter__(self) -> Iterator[str]:
        return iter(self.keys())

    def items(self) -> Iterator[tuple[str, h5py.Group]]:
        for key in self.keys():
            yield key, self[key]

    def close(self) -> None:
        for f in list(self._shards.values()) + ([self._main] if self._main is not None else []):
            with contextlib.suppress(Exception):
                f.close()
        self._shards.clear()
        self._main = None
        self._where = {}

    def __enter__(self) -> "Results":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def open_results(path: str | os.PathLike, items_group: str = DEFAULT_ITEMS_GROUP) -> Results:
    """Open a store for reading, merging ``OUT`` with leftover shards. Use with ``with``.

    Works while a writer is running or after it was killed; a missing ``OUT`` with no
    shards reads as empty.
    """
    return Results(path, items_group)
