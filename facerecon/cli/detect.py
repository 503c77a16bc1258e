"""``facerecon detect``: find faces, landmarks, aligned crops and masks in photos."""

from __future__ import annotations

from pathlib import Path

import click

from facerecon.cli.common import (ProgressReporter, exit_code_for, fail_run, graceful_stop, print_json,
                                  problems_table, stderr_console, summary_table)
from facerecon.cli.params import FiniteFloatRange
from facerecon.errors import describe_os_error
from facerecon.io.images import DEFAULT_MAX_PIXELS


@click.command()
@click.argument("inputs", nargs=-1, required=True)
@click.option("--out", "-o", "output", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="Detections file to write (HDF5, see docs/formats.md).")
@click.option("--largest", is_flag=True, help="Keep only the largest face of each image.")
@click.option("--max-faces", type=click.IntRange(min=1), default=None,
              help="Keep at most N faces per image, largest first [default: all].")
@click.option("--crop-size", type=click.IntRange(32, 4096), default=224, show_default=True,
              help="Side of the aligned face crops, in pixels.")
@click.option("--min-score", type=FiniteFloatRange(0.0, 1.0), default=0.5, show_default=True,
              help="Minimum face-detector confidence.")
@click.option("--detect-max-side", type=click.IntRange(min=64), default=2560, show_default=True,
              help="Reduce larger images to this long side for detection (crops use full resolution).")
@click.option("--tile-size", type=click.IntRange(min=0), default=640, show_default=True,
              help="Also scan images larger than this in overlapping tiles, for small faces (0: off).")
@click.option("--max-pixels", type=click.IntRange(min=1), default=DEFAULT_MAX_PIXELS, show_default=True,
              help="Refuse images with more pixels than this.")
@click.option("--skin-prior", type=FiniteFloatRange(0.0, 1.0, min_open=True, max_open=True), default=0.5,
              show_default=True, help="Prior P(skin) of the skin-colour posterior.")
@click.option("--second-look/--no-second-look", default=True, show_default=True,
              help="When the full-range detector finds no face in a photo, look again with the short-range "
                   "model (close-ups, half profiles, partly covered faces; docs/detection.md).")
@click.option("--overwrite", is_flag=True, help="Redo images already in the output (default: skip them).")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON on stdout.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar or summary table (errors still shown).")
@click.option("--pack-interval", type=FiniteFloatRange(min=0.0), default=60.0, hidden=True,
              help="Seconds between periodic packs of the output (0: only at the end).")
def detect(inputs: tuple[str, ...], output: Path, largest: bool, max_faces: int | None, crop_size: int,
           min_score: float, detect_max_side: int, tile_size: int, max_pixels: int, skin_prior: float,
           second_look: bool, overwrite: bool, as_json: bool, quiet: bool, pack_interval: float) -> None:
    """Detect faces in photos and store landmarks, aligned crops and masks.

    \b
    INPUTS are image files, folders (searched recursively for .jpg .jpeg .png
    .bmp .tif .tiff .webp) and glob patterns (quote them: 'photos/**/*.jpg').
    Per face: box, score, 478 mesh landmarks, iBUG 68 and 5 points, head pose,
    an aligned crop with its transform, skin attention and region masks.

    \b
    The output is crash-safe: completed images survive a kill; running the
    same command again skips images already done (same file content and
    settings) unless --overwrite. One process at a time may write an output.

    \b
    Exit codes: 0 at least one image processed (faces or none found, or
    already done); 1 none could be processed, or the output is locked or not
    a detections file; 2 usage error; 130 interrupted (completed work saved).

    \b
    Examples:
      facerecon detect photos/ --out det.h5
      facerecon detect 'shoot/*.jpg' portrait.png --out det.h5 --largest --json
    """
    from facerecon.io.store import StoreError
    from facerecon.stages.detect import DetectOptions, run_detect

    if output.exists() and output.is_dir():
        raise click.BadParameter(f"{output} is a directory", param_hint="--out")
    if largest and max_faces not in (None, 1):
        raise click.UsageError("--largest and --max-faces N (N > 1) contradict each other")
    options = DetectOptions(crop_size=crop_size, min_score=min_score, max_faces=1 if largest else max_faces,
                            detect_max_side=detect_max_side, tile_size=tile_size, max_pixels=max_pixels,
                            skin_prior=skin_prior, overwrite=overwrite, pack_interval=pack_interval,
                            second_look=second_look)
    console = stderr_console(quiet=quiet)
    try:
        with graceful_stop() as stop, ProgressReporter(console, "detect", enabled=not quiet) as progress:
            summary = run_detect(inputs, output, options, progress=progress, should_stop=stop)
    except (StoreError, OSError) as exc:
        message = str(exc) if isinstance(exc, StoreError) else f"cannot write {output}: {describe_os_error(exc)}"
        fail_run(message, output, as_json)

    data = summary.to_dict()
    if not quiet:
        _print_summary(console, data)
    if summary.interrupted:
        click.echo(f"interrupted: {data['processed']} image(s) saved to {output}; run the same command to resume",
                   err=True)
    if as_json:
        print_json(data)
    code = exit_code_for(summary.succeeded, summary.interrupted)
    if code:
        raise SystemExit(code)


def _print_summary(console, data: dict) -> None:
    rate = data["images_per_second"]
    rows = [
        ("images", data["images"]), ("processed", data["processed"]), ("  with faces", data["with_faces"]),
        ("  faces", data["faces"]), ("  no face", data["no_face"]), ("skipped (already done)", data["skipped"]),
        ("failures", data["failed"]),
        ("time", f"{data['elapsed_seconds']:.1f} s" + (f" ({rate:.1f} img/s)" if rate else "")),
        ("output", data["output"]),
    ]
    console.print(summary_table("detect summary", rows))
    if data["failures"]:
        console.print(problems_table("failures", [(f["key"], f["reason"]) for f in data["failures"]]))
