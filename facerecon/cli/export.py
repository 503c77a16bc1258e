"""``facerecon export``: mesh files from a fits.h5, without refitting."""

from __future__ import annotations

from pathlib import Path

import click

from facerecon.cli.common import fail_run, print_json, problems_table, stderr_console, summary_table


@click.command()
@click.argument("fits", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--out", "-o", "out_dir", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Output folder (meshes/ is created inside).")
@click.option("--format", "formats", default="obj,ply", show_default=True,
              help="Mesh formats, comma-separated: obj, ply, glb.")
@click.option("--pose", type=click.Choice(["canonical", "camera"]), default="canonical", show_default=True,
              help="Canonical head frame (mm) or the fitting camera's frame.")
@click.option("--neutral", is_flag=True, help="Drop the expression: the person's neutral face.")
@click.option("--no-blendshapes", is_flag=True, help="Skip the blendshape JSON/CSV files.")
@click.option("--level", type=click.Choice(["base", "final"]), default=None,
              help="Paper 004's level to export: base (the face model's fit) or final (with the correctives; "
                   "faces fitted at the base level only are skipped) [default: the level each face was fitted at].")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON on stdout.")
@click.option("--quiet", "-q", is_flag=True, help="No summary table (errors still shown).")
def export(fits: Path, out_dir: Path, formats: str, pose: str, neutral: bool, no_blendshapes: bool,
           level: str | None, as_json: bool, quiet: bool) -> None:
    """Re-create meshes from a fits.h5 written by `facerecon fit` (no photos needed).

    \b
    For face models with ARKit-style expression blendshapes (ICT-FaceKit) it
    also writes <face>.blendshapes.json (the model's names) and
    <face>.arkit.csv (one row with Live Link Face's timecode, count and 52
    blendshape columns; no head or eye rotation columns). Meshes are in
    millimetres, except GLB, which is in metres as glTF requires.

    \b
    Examples:
      facerecon export out/fits.h5 --out exported/ --format obj,glb
      facerecon export out/fits.h5 --out neutral/ --neutral --format ply
      facerecon export out/fits.h5 --out base/ --level base
    """
    from facerecon.errors import OutputError
    from facerecon.export.meshio import parse_formats
    from facerecon.io.store import StoreError
    from facerecon.stages.export import run_export

    try:
        format_list = parse_formats(formats)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--format") from None
    try:
        summary = run_export(fits, out_dir, format_list, pose=pose, neutral=neutral, blendshapes=not no_blendshapes,
                             level=level)
    except OutputError as exc:
        fail_run(str(exc), out_dir, as_json)
    except (KeyError, OSError, StoreError) as exc:
        fail_run(f"{fits} is not a readable fits file ({exc})", out_dir, as_json)
    data = summary.to_dict()
    console = stderr_console(quiet=quiet)
    console.print(summary_table("export summary", [("faces exported", data["faces_exported"]),
                                                   ("files written", data["files"]), ("output", data["output"])]))
    if summary.skipped:
        console.print(problems_table("skipped", summary.skipped, headers=("face", "reason")))
    if as_json:
        print_json(data)
    if data["exit_code"]:
        raise SystemExit(data["exit_code"])
