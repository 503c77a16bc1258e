"""Helpers shared by the batch commands: consoles, progress bars, summaries, exit codes.

Conventions for every command:

* human output (progress, tables, warnings, errors) goes to **stderr**; stdout carries only
  machine-readable output (``--json``), so ``facerecon detect ... --json > summary.json``
  works with a progress bar on the terminal;
* exit codes: :data:`EXIT_OK` (0) at least one input succeeded, :data:`EXIT_NOTHING_DONE`
  (1) nothing succeeded or the command could not start its work, :data:`EXIT_USAGE` (2) bad
  option or argument (click's own convention), :data:`EXIT_INTERRUPTED` (130) stopped by
  Ctrl-C or SIGTERM after saving the completed work (:func:`graceful_stop`).
"""

from __future__ import annotations

import contextlib
import json
import signal
import sys
import threading
from typing import Any, Iterable, Iterator, NoReturn, Sequence

import click

#: Default iterations of the fit stages (landmark, coarse, fine): FitSettings' defaults, kept here
#: so the command line does not import torch to show --help (a test keeps the two equal).
FIT_STEPS = (80, 200, 25)

EXIT_OK = 0
EXIT_NOTHING_DONE = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130


def exit_code_for(succeeded: int, interrupted: bool = False) -> int:
    """The documented exit code for a batch with ``succeeded`` successful inputs."""
    if interrupted:
        return EXIT_INTERRUPTED
    return EXIT_OK if succeeded > 0 else EXIT_NOTHING_DONE


def stderr_console(quiet: bool = False):
    """A rich console on stderr (``quiet`` silences everything but errors printed via :func:`fail`)."""
    from rich.console import Console

    return Console(stderr=True, highlight=False, quiet=quiet)


def fail(message: str, code: int = EXIT_NOTHING_DONE) -> NoReturn:
    """Print ``error: message`` on stderr and exit with ``code``."""
    click.echo(f"error: {message}", err=True)
    sys.exit(code)


def fail_run(message: str, output: Any, as_json: bool) -> NoReturn:
    """A batch command could not run: JSON error record on stdout (with ``--json``), one
    ``error:`` line on stderr, exit :data:`EXIT_NOTHING_DONE`."""
    if as_json:
        print_json({"output": str(output), "error": message, "exit_code": EXIT_NOTHING_DONE})
    click.echo(f"error: {message}", err=True)
    raise SystemExit(EXIT_NOTHING_DONE)


def print_json(data: Any) -> None:
    """Write ``data`` as JSON (UTF-8, indented) to stdout."""
    click.echo(json.dumps(data, indent=2, ensure_ascii=False, default=str))


# --------------------------------------------------------------------------- progress


def _rate_column(unit: str):
    from rich.progress import ProgressColumn
    from rich.text import Text

    class RateColumn(ProgressColumn):
        """Items per second, e.g. ``23.4 img/s``."""

        def render(self, task) -> Text:
            speed = task.finished_speed or task.speed
            task_unit = task.fields.get("unit", unit)
            if speed is None:
                return Text(f"-- {task_unit}/s", style="progress.data.speed")
            return Text(f"{speed:.1f} {task_unit}/s", style="progress.data.speed")

    return RateColumn()


def make_progress(console, unit: str = "img"):
    """A rich progress bar: description, bar, done/total, rate, elapsed, remaining."""
    from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                               TimeRemainingColumn)

    return Progress(TextColumn("[progress.description]{task.description}"), BarColumn(), MofNCompleteColumn(),
                    _rate_column(unit), TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(),
                    console=console, transient=False)


class StageProgress:
    """One rich progress display shared by consecutive stages (e.g. detect, then fit).

    ``stage(name, unit)`` returns an object with ``start(total)`` / ``advance(...)`` that adds
    its own bar to the shared display, so stages never draw two live displays at once.
    """

    def __init__(self, console, enabled: bool = True):
        self.enabled = enabled
        self._console = console
        self._progress = None

    def __enter__(self) -> "StageProgress":
        return self

    def __exit__(self, *exc) -> None:
        if self._progress is not None:
            self._progress.stop()

    def stage(self, description: str, unit: str = "img") -> "_Stage":
        return _Stage(self, description, unit)

    def _display(self, unit: str):
        if self._progress is None:
            self._progress = make_progress(self._console, unit)
            self._progress.start()
        return self._progress


class _Stage:
    def __init__(self, owner: StageProgress, description: str, unit: str):
        self.owner, self.description, self.unit, self.task = owner, description, unit, None

    def start(self, total: int) -> None:
        if self.owner.enabled:
            self.task = self.owner._display(self.unit).add_task(self.description, total=total, unit=self.unit)

    def advance(self, *_args: Any, **_kwargs: Any) -> None:
        if self.task is not None:
            self.owner._progress.advance(self.task)


class ProgressReporter:
    """Drives a rich progress bar from ``start(total)`` / ``advance(...)`` callbacks.

    Use as a context manager; disabled (no output) when ``enabled`` is False.
    """

    def __init__(self, console, description: str, unit: str = "img", enabled: bool = True):
        self.console = console
        self.description = description
        self.enabled = enabled
        self._progress = make_progress(console, unit) if enabled else None
        self._task = None

    def __enter__(self) -> "ProgressReporter":
        if self._progress is not None:
            self._progress.start()
        return self

    def __exit__(self, *exc) -> None:
        if self._progress is not None:
            self._progress.stop()

    def start(self, total: int) -> None:
        if self._progress is not None:
            self._task = self._progress.add_task(self.description, total=total)

    def advance(self, *_args: Any, **_kwargs: Any) -> None:
        if self._progress is not None and self._task is not None:
            self._progress.advance(self._task)


# --------------------------------------------------------------------------- summary


def summary_table(title: str, rows: Iterable[tuple[str, Any]]):
    """A two-column rich table of (label, value) rows."""
    from rich.table import Table

    table = Table(title=title, show_header=False, title_justify="left")
    table.add_column("what", style="bold")
    table.add_column("count", justify="right")
    for label, value in rows:
        table.add_row(label, str(value))
    return table


def problems_table(title: str, rows: Sequence[tuple[str, str]], headers: tuple[str, str] = ("input", "reason")):
    """A rich table with one row per problem (input, reason)."""
    from rich.table import Table

    table = Table(title=title, title_justify="left")
    table.add_column(headers[0], overflow="fold")
    table.add_column(headers[1], overflow="fold")
    for item, reason in rows:
        table.add_row(item, reason)
    return table


# --------------------------------------------------------------------------- signals


class StopRequest:
    """A stop asked for by a signal; calling the object says whether one was asked for.

    Batch loops poll it between items and finish cleanly (saving their work), which is
    more reliable than an exception raised at an arbitrary point inside the handler.
    """

    def __init__(self) -> None:
        self._event = threading.Event()
        self.signal_name = ""

    def __call__(self) -> bool:
        return self._event.is_set()

    def request(self, signal_name: str = "") -> None:
        self.signal_name = signal_name
        self._event.set()


@contextlib.contextmanager
def graceful_stop() -> Iterator[StopRequest]:
    """While active, the first Ctrl-C (SIGINT) or SIGTERM only requests a stop (see
    :class:`StopRequest`); a second Ctrl-C raises KeyboardInterrupt as usual. Handlers are
    installed only in the main thread and restored afterwards."""
    stop = StopRequest()
    if threading.current_thread() is not threading.main_thread():
        yield stop
        return

    def on_signal(signum, frame):  # noqa: ARG001
        if stop() and signum == signal.SIGINT:
            raise KeyboardInterrupt
        if not stop():
            sys.stderr.write("\nstopping: finishing the current item and saving (Ctrl-C again to abort)\n")
        stop.request(signal.Signals(signum).name)

    previous = {}
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(ValueError, OSError):
            previous[sig] = signal.signal(sig, on_signal)
    try:
        yield stop
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def report_stage(console, summary, quiet: bool, as_json: bool, print_summary, finished: str) -> None:
    """End of a batch stage: notes and the summary (unless quiet), the resume hint after an
    interruption, JSON on stdout with ``--json``, then the stage's exit code.

    ``summary`` has ``to_dict()`` (with ``notes`` and ``output``), ``interrupted`` and
    ``exit_code``; ``print_summary(console, data)`` draws its tables; ``finished`` names what
    an interrupted run keeps ("images", "albums").
    """
    data = summary.to_dict()
    if not quiet:
        for note in data["notes"]:
            console.print(f"note: {note}")
        print_summary(console, data)
    if summary.interrupted:
        click.echo(f"interrupted: finished {finished} are saved in {data['output']}; run the same command to "
                   "resume", err=True)
    if as_json:
        print_json(data)
    if summary.exit_code:
        raise SystemExit(summary.exit_code)
