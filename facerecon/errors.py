"""Error types that mean "the user's input (or output folder) is wrong", as opposed to a bug,
and one-line texts for OS errors.

The command line prints an :class:`InputError` (and its subclasses) as a one-line message
with a non-zero exit code; any other exception, a plain ``ValueError`` from a shape mismatch
included, keeps its traceback, because it is a bug to report.
"""

from __future__ import annotations

import errno
import os
import re
from contextlib import contextmanager
from typing import Iterator


class InputError(ValueError):
    """A user-facing input mistake: a bad option, file, setting or data layout; the message
    says why. Subclasses ``ValueError`` so code that caught ``ValueError`` before keeps working."""


class OutputError(OSError):
    """Results could not be written to the output folder; the message says where and why."""


_REASONS = {
    errno.ENOSPC: "no space left on device",
    errno.EDQUOT: "disk quota exceeded",
    errno.EACCES: "permission denied",
    errno.EPERM: "operation not permitted",
    errno.EROFS: "read-only file system",
    errno.ENAMETOOLONG: "file name too long",
    errno.ENOENT: "no such file or directory",
    errno.EISDIR: "is a directory",
    errno.ENOTDIR: "not a directory",
}


def root_os_error(exc: BaseException) -> OSError | None:
    """The first OSError with an errno in the chain of ``exc`` (its causes and contexts),
    e.g. the failed mesh write behind an error raised while closing a store afterwards."""
    seen = set()
    chain = []
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        chain.append(current)
        current = current.__cause__ or current.__context__
    for item in reversed(chain):  # the earliest error is the real cause
        if isinstance(item, OSError) and item.errno in _REASONS:
            return item
        # HDF5 reports the system error inside its text: "... errno = 28, error message = ..."
        found = re.search(r"errno = (\d+)", str(item))
        if found and int(found.group(1)) in _REASONS:
            return OSError(int(found.group(1)), os.strerror(int(found.group(1))), getattr(item, "filename", None))
    return None


def describe_os_error(exc: BaseException) -> str:
    """One line for a human: ``"<what>: <path>"`` instead of ``[Errno 13] Permission denied: '...'``."""
    root = root_os_error(exc)
    if root is None:
        return " ".join(str(exc).split())
    reason = _REASONS[root.errno]
    where = root.filename if root.filename is not None else ""
    text = f"{reason}: {os.fsdecode(where)}" if where else reason
    if root.errno in (errno.ENOSPC, errno.EDQUOT):
        text += " (free some space and run the same command again; finished work is kept)"
    return text


@contextmanager
def user_file(path) -> Iterator[None]:
    """Report a ``ValueError`` raised while reading the file ``path`` that the user named (weights,
    checkpoints) as an :class:`InputError`: for code that validates user files with plain
    ``ValueError`` (the network loaders). Keep the block narrow: only the read itself."""
    try:
        yield
    except InputError:
        raise
    except ValueError as exc:
        raise InputError(str(exc) if str(path) in str(exc) else f"{path}: {exc}") from exc
