"""``facerecon synth``: render faces from the face model with known parameters."""

from __future__ import annotations

from pathlib import Path

import click

from facerecon.cli.common import StageProgress, fail_run, graceful_stop, print_json, stderr_console, summary_table
from facerecon.cli.params import FiniteFloatRange


@click.command()
@click.option("--out", "-o", "out_dir", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Output folder: images/ and synth.h5 (ground truth).")
@click.option("--count", type=click.IntRange(1), default=100, show_default=True, help="Images to render.")
@click.option("--views", type=click.IntRange(1), default=1, show_default=True,
              help="Images per identity (multi-view groups: same identity and albedo).")
@click.option("--size", type=click.IntRange(64, 2048), default=224, show_default=True, help="Image side in pixels.")
@click.option("--zoom", type=FiniteFloatRange(0.2, 3.0), default=1.0, show_default=True,
              help="Focal-length factor: 1 frames the face like an aligned crop, 0.6 like a portrait photo.")
@click.option("--max-yaw", type=FiniteFloatRange(0, 90), default=60.0, show_default=True, help="Degrees.")
@click.option("--max-pitch", type=FiniteFloatRange(0, 60), default=20.0, show_default=True, help="Degrees.")
@click.option("--specular", is_flag=True,
              help="Add specular highlights (paper 002: a specular albedo lit by one Blinn-Phong light); the "
                   "light and specular parameters are stored with the others.")
@click.option("--seed", type=int, default=0, show_default=True, help="Same seed, same images.")
@click.option("--face-model", default=None, metavar="NAME|PATH", help="Face model to sample from.")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON on stdout.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar or summary.")
def synth(out_dir: Path, count: int, views: int, size: int, zoom: float, max_yaw: float, max_pitch: float,
          specular: bool, seed: int, face_model: str | None, as_json: bool, quiet: bool) -> None:
    """Render synthetic faces with ground-truth parameters.

    \b
    Identity, expression, albedo and coloured light come from the face
    model's priors, pose from the yaw/pitch ranges, backgrounds are random
    colour fields. Ground truth per image (coefficients, pose, light,
    intrinsics, 68 and dense landmarks) is stored in OUT/synth.h5.
    Resumable: rerun the same command to continue.

    \b
    Examples:
      facerecon synth --out synth/ --count 1000 --views 4
      facerecon synth --out shiny/ --count 50 --specular
    """
    from facerecon.facemodel.model import FaceModelError
    from facerecon.io.store import StoreError
    from facerecon.stages.synth import SynthOptions, run_synth

    options = SynthOptions(face_model=face_model, count=count, views=views, size=size, zoom=zoom, seed=seed,
                           max_yaw=max_yaw, max_pitch=max_pitch, specular=specular)
    console = stderr_console(quiet=quiet)
    try:
        with graceful_stop() as stop, StageProgress(console, enabled=not quiet) as progress:
            summary = run_synth(out_dir, options, progress=progress.stage("synth"), should_stop=stop)
    except (FaceModelError, StoreError, OSError) as exc:
        fail_run(str(exc), out_dir, as_json)
    data = summary.to_dict()
    if not quiet:
        console.print(summary_table("synth summary", [("written", data["written"]), ("already there", data["skipped"]),
                                                      ("time", f"{data['elapsed_seconds']:.1f} s"),
                                                      ("output", data["output"])]))
    if as_json:
        print_json(data)
    if summary.interrupted:
        raise SystemExit(130)
