"""``facerecon aggregate``: one neutral 3D identity per photo album."""

from __future__ import annotations

from pathlib import Path

import click

from facerecon.cli.common import (FIT_STEPS, StageProgress, fail_run, graceful_stop, problems_table, report_stage,
                                  stderr_console, summary_table)
from facerecon.cli.fit import face_model_options


@click.command()
@click.argument("albums", nargs=-1, required=True)
@click.option("--out", "-o", "out_dir", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Output folder: aggregate.h5 and one sub-folder per identity.")
@click.option("--method", type=click.Choice(["joint", "mean", "cnet", "lap"]), default=None,
              help="joint (default): one identity optimised over all photos, outlier photos down-weighted; "
                   "mean: average of the single-photo identities (paper 000 baseline); cnet: R-Net "
                   "predictions aggregated with C-Net's per-coefficient confidences (paper 000 sec. 5; "
                   "the default when --cnet is given); lap: after joint, paper 003's model-free canonical "
                   "depth and albedo of the person, then one personalised face per photo (optimisation, or "
                   "the trained networks of --checkpoint; docs/aggregation.md).")
@click.option("--lap-size", type=click.Choice(["128", "256"]), default="128", show_default=True,
              help="--method lap: side of the canonical depth and albedo maps.")
@click.option("--lap-steps", type=(click.IntRange(0), click.IntRange(0)), default=(120, 50), show_default=True,
              metavar="AGGREGATE PERSONALISE",
              help="--method lap: Adam steps of the aggregation over the album and of each photo's personalisation.")
@click.option("--checkpoint", "lap_checkpoint", type=click.Path(exists=True, dir_okay=False), default=None,
              help="--method lap: a LAP checkpoint of `facerecon train` with [lap] enabled; its networks predict "
                   "the canonical and personalised faces instead of the optimisation (--lap-size and "
                   "--lap-steps do not apply: the checkpoint sets the size).")
@click.option("--cnet", "cnet", type=click.Path(exists=True, dir_okay=False), default=None,
              help="C-Net checkpoint from `facerecon train` with [cnet] enabled (it holds its R-Net too).")
@face_model_options
@click.option("--format", "formats", default="obj,ply", show_default=True,
              help="Mesh formats, comma-separated: obj (with MTL + texture PNG), ply, glb.")
@click.option("--recognition-weights", type=click.Path(exists=True, dir_okay=False), default=None,
              help="ArcFace IR-ResNet backbone.pth you own: checks who is the album's person with face "
                   "recognition (reliable) and turns on the perceptual loss.")
@click.option("--identity-check", type=click.Choice(["recognition", "shape"]), default="recognition",
              show_default=True,
              help="Who is the album's person: recognition (face-recognition embeddings: dlib's network, or "
                   "--recognition-weights) or shape (identity shapes, then skin patterns after the fit).")
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N.")
@click.option("--batch-size", type=click.IntRange(1, 4096), default=16, show_default=True,
              help="Faces fitted together in the single-photo fits.")
@click.option("--texture-size", type=click.IntRange(64, 8192), default=1024, show_default=True,
              help="Side of the merged UV texture PNG.")
@click.option("--steps", type=(click.IntRange(0), click.IntRange(0), click.IntRange(0)), default=FIT_STEPS,
              show_default=True, metavar="LANDMARK COARSE FINE",
              help="Iterations of the three fitting stages (landmarks; photometric at 112 px; at crop size).")
@click.option("--overwrite", is_flag=True, help="Redo albums already in aggregate.h5 (default: skip them).")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON on stdout.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar or summary table.")
def aggregate(albums: tuple[str, ...], out_dir: Path, method: str | None, lap_size: str, lap_steps: tuple[int, int],
              lap_checkpoint: str | None, cnet: str | None, face_model: str | None,
              no_download: bool, formats: str, recognition_weights: str | None, identity_check: str, device: str,
              batch_size: int, texture_size: int,
              steps: tuple[int, int, int], overwrite: bool, as_json: bool, quiet: bool) -> None:
    """Build one neutral, textured 3D face per person from a photo album.

    \b
    ALBUMS are folders of one person's photos, or parent folders whose
    sub-folders are people (one identity per sub-folder), or detections .h5
    files from `facerecon detect` (images grouped by their first sub-folder).
    Faces that are not the album's person (a second face in a group photo, a
    stranger) are excluded and reported with the rule and its numbers (by
    default face recognition: dlib's network, Euclidean distance to the
    album's consensus above 0.6); unreadable photos are reported and skipped.
    Photos at the top of a people folder (beside its person sub-folders) are
    skipped and reported.

    \b
    Outputs in OUT/<album>/: <album>_neutral.obj|.mtl|_texture.png|.ply|.glb
    (texture merged from the photos that see each part best),
    contact_sheet.png (photos by confidence + the result from three views),
    detections.h5; OUT/aggregate.h5 holds the identity coefficients,
    per-photo identities, confidences (with --method cnet also each photo's
    confidence vector) and exclusions (docs/aggregation.md). With --method lap
    also <album>_lap.obj|... (the canonical face), _lap_depth.png (16-bit),
    _lap_normal.png, _lap_albedo.png, lap_personalised/ (one face per photo)
    and lap_sheet.png (photos, canonical and personalised renders).

    \b
    Exit codes: 0 at least one album done (or already done); 1 none could be
    done; 2 usage error; 130 interrupted (finished albums are kept; rerun to
    resume).

    \b
    Examples:
      facerecon aggregate album/ --out person/
      facerecon aggregate people/ --out ids/ --method mean --format obj,glb --json
      facerecon aggregate det.h5 --out ids/ --recognition-weights backbone.pth
      facerecon aggregate people/ --out ids/ --cnet runs/cnet/checkpoints/latest.pt
      facerecon aggregate album/ --out person/ --method lap
      facerecon aggregate album/ --out person/ --method lap --checkpoint runs/lap/checkpoints/latest.pt
    """
    from facerecon.export.meshio import parse_formats
    from facerecon.facemodel.model import FaceModelError
    from facerecon.fitting.optimize import FitSettings
    from facerecon.io.store import StoreError
    from facerecon.stages.aggregate import AggregateOptions, run_aggregate

    if method is None:
        method = "cnet" if cnet else "joint"
    if method == "cnet" and not cnet:
        raise click.UsageError("--method cnet needs --cnet CKPT (a checkpoint of `facerecon train` with [cnet] "
                               "enabled)")
    if cnet and method != "cnet":
        raise click.UsageError(f"--cnet is used only by --method cnet, not {method}")
    if lap_checkpoint and method != "lap":
        raise click.UsageError(f"--checkpoint is used only by --method lap, not {method}")
    if lap_checkpoint:
        context = click.get_current_context()
        for name, flag in (("lap_size", "--lap-size"), ("lap_steps", "--lap-steps")):
            if context.get_parameter_source(name) == click.core.ParameterSource.COMMANDLINE:
                raise click.UsageError(f"{flag} is for the optimisation route; with --checkpoint the networks "
                                       "predict at the checkpoint's size")
    try:
        format_list = parse_formats(formats)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--format") from None
    settings = FitSettings(landmark_steps=steps[0], coarse_steps=steps[1], fine_steps=steps[2])
    lap = None
    if method == "lap" and not lap_checkpoint:
        from facerecon.aggregation.lap import LapSettings

        lap = LapSettings(grid_size=int(lap_size), aggregate_steps=lap_steps[0], personal_steps=lap_steps[1])
    options = AggregateOptions(face_model=face_model, allow_download=False if no_download else None, device=device,
                               method=method, formats=format_list, texture_size=texture_size, batch_size=batch_size,
                               overwrite=overwrite, recognition_weights=recognition_weights,
                               identity_check=identity_check, settings=settings,
                               cnet=cnet, lap=lap, lap_checkpoint=lap_checkpoint)
    console = stderr_console(quiet=quiet)
    try:
        with graceful_stop() as stop, StageProgress(console, enabled=not quiet) as progress:
            summary = run_aggregate(list(albums), out_dir, options, progress=progress.stage("aggregate", "album"),
                                    should_stop=stop)
    # still any ValueError: stages/aggregate and the network loaders (networks/*) report user
    # mistakes as plain ValueError; narrow to facerecon.errors.InputError once they raise it
    except (FaceModelError, StoreError, ValueError, OSError) as exc:
        fail_run(str(exc), out_dir, as_json)
    report_stage(console, summary, quiet, as_json, _print_summary, "albums")


def _print_summary(console, data: dict) -> None:
    rows = [(a["name"], f"{a['status']}" + (f" ({a['reason']})" if a["reason"] else ""),
             f"{a['faces_used']}/{a['photos']}", str(len(a["excluded"])), str(len(a["failures"])),
             f"{a['seconds']:.1f} s" if a["status"] == "ok" else "-") for a in data["identities"]]
    from rich.table import Table

    table = Table(title=f"aggregate summary ({data['method']})")
    for column in ("album", "status", "faces used / photos", "excluded", "failed photos", "time"):
        table.add_column(column)
    for row in rows:
        table.add_row(*row)
    console.print(table)
    console.print(summary_table("totals", [("albums done", data["albums_ok"]),
                                           ("  already done (skipped)", data["albums_skipped"]),
                                           ("  failed", data["albums_failed"]),
                                           ("time", f"{data['elapsed_seconds']:.1f} s"),
                                           ("output", data["output"])]))
    problems = [(p["input"], p["reason"]) for p in data["problems"]]
    for a in data["identities"]:
        problems += [(f"{a['name']}: {e['face']}", f"excluded: {e['reason']}") for e in a["excluded"]]
        problems += [(f"{a['name']}: {f['photo']}", f["reason"]) for f in a["failures"]]
        if a["status"] == "failed":
            problems.append((a["name"], a["reason"]))
    if problems:
        console.print(problems_table("problems", problems))
