"""Error types that mean "the user's input is wrong", as opposed to a bug.

The command line prints an :class:`InputError` (and its subclasses) as a one-line message
with a non-zero exit code; any other exception, a plain ``ValueError`` from a shape mismatch
included, keeps its traceback, because it is a bug to report.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator


class InputError(ValueError):
    """A user-facing input mistake: a bad option, file, setting or data layout.

    Subclasses ``ValueError`` so code that caught ``ValueError`` before keeps working.
    """


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
