"""Error types that mean "the user's input is wrong", as opposed to a bug.

The command line prints an :class:`InputError` (and its subclasses) as a one-line message
with a non-zero exit code; any other exception, a plain ``ValueError`` from a shape mismatch
included, keeps its traceback, because it is a bug to report.
"""

from __future__ import annotations


class InputError(ValueError):
    """A user-facing input mistake: a bad option, file, setting or data layout.

    Subclasses ``ValueError`` so code that caught ``ValueError`` before keeps working.
    """
