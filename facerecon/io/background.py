"""Work in a daemon thread that a Ctrl-C in the main thread does not have to wait for."""

from __future__ import annotations

import threading
from typing import Any, Callable


class Background:
    """``fn(*args)`` started at once in a daemon thread.

    The main thread waits in short slices (:meth:`result`, :meth:`wait`), so signal handlers
    run and a second Ctrl-C (KeyboardInterrupt) gets through while, say, a 12-second decode
    runs; an abandoned call finishes on its own and never holds up the process exit (unlike
    a ThreadPoolExecutor, whose shutdown and exit handler join their threads).
    """

    def __init__(self, fn: Callable[..., Any], *args: Any, name: str = "facerecon-background"):
        self._done = threading.Event()
        self._value: Any = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, args=(fn, args), name=name, daemon=True)
        self._thread.start()

    def _run(self, fn: Callable[..., Any], args: tuple) -> None:
        try:
            self._value = fn(*args)
        except BaseException as exc:  # noqa: BLE001 - handed to the caller of result()
            self._error = exc
        finally:
            self._done.set()

    def wait(self, timeout: float) -> bool:
        """True once the call has finished (waits at most ``timeout`` seconds)."""
        return self._done.wait(timeout)

    def result(self, poll: float = 0.05) -> Any:
        """The call's value (or its exception), waiting in ``poll``-second slices."""
        while not self._done.wait(poll):
            pass
        if self._error is not None:
            raise self._error
        return self._value
