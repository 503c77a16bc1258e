"""``facerecon model``: import, fetch, calibrate, learn correctives for, list and describe face models."""

from __future__ import annotations

import contextlib
import json
import sys
from pathlib import Path

import click

from facerecon.facemodel.model import FaceModelError


def _fail(message: str, code: int = 1) -> None:
    click.echo(f"error: {message}", err=True)
    sys.exit(code)


@click.group()
def model() -> None:
    """Manage face models (3D morphable models) used for reconstruction.

    \b
    Models are stored as HDF5 files in the data directory
    (FACERECON_HOME overrides it). Commands that need a model take
    --face-model NAME|PATH, then FACERECON_FACE_MODEL, then the default 'ict'.

    \b
    Examples:
      facerecon model fetch ict
      facerecon model import ict ~/src/ICT-FaceKit
      facerecon model import bfm BFM_model_front.mat --name bfm
      facerecon model list
      facerecon model info ict --json
      facerecon model learn-correctives out/fits.h5 --out ict_fml.h5
    """


@model.command("import")
@click.argument("kind", type=click.Choice(["ict", "bfm"]))
@click.argument("sources", nargs=-1, required=True, type=click.Path(exists=True, path_type=Path))
@click.option("--name", default=None, help="Name to install the model under (default: the KIND).")
@click.option("--out", "out_path", type=click.Path(dir_okay=False, path_type=Path),
              help="Write the converted model to this file instead of the data directory.")
@click.option("--include-head", is_flag=True, help="ICT: keep head and neck vertices, not only the face area.")
@click.option("--embed/--no-embed", default=True, show_default=True,
              help="Compute the dense (468-point) landmark embedding with the detector.")
@click.option("--calibrate/--no-calibrate", default=True, show_default=True,
              help="Measure the detector's pose-dependent landmark bias on renders (about 35 s on 2 cores; "
                   "see `facerecon model calibrate`).")
@click.option("--force", is_flag=True, help="Replace an installed model of the same name.")
def import_cmd(kind: str, sources: tuple[Path, ...], name: str | None, out_path: Path | None,
               include_head: bool, embed: bool, calibrate: bool, force: bool) -> None:
    """Convert face-model files you own into facerecon's format.

    \b
    ict SOURCE   an ICT-FaceKit checkout (FaceXModel/*.obj + vertex_indices.json)
                 or the packed ict_face_light.npz
    bfm SOURCE.. BFM_model_front.mat, or 01_MorphableModel.mat + Exp_Pca.bin
                 (see docs/bfm.md for the optional index files); add an AlbedoMM
                 .h5 for its diffuse and specular albedo spaces
    """
    from facerecon.stages.model_install import add_dense_embedding, add_detector_bias, import_model
    from facerecon.facemodel.model import save_face_model
    from facerecon.facemodel.resolve import install_model

    if kind == "ict" and len(sources) != 1:
        raise click.UsageError("ict takes exactly one SOURCE (a checkout folder or .npz)")
    try:
        converted = import_model(kind, sources, include_head=include_head)
        if embed:
            converted = add_dense_embedding(converted, log=lambda msg: click.echo(f"warning: {msg}", err=True))
        if calibrate and converted.has_albedo:
            with _cell_progress("measuring the detector's landmark bias") as progress:
                converted = add_detector_bias(converted, log=lambda msg: click.echo(f"warning: {msg}", err=True),
                                              progress=progress)
        if out_path is not None:
            if out_path.exists() and not force:
                _fail(f"{out_path} exists; pass --force to replace it")
            path = save_face_model(converted, out_path)
        else:
            path = install_model(converted, name or kind, overwrite=force)
    except FaceModelError as exc:
        _fail(str(exc))
    summary = converted.summary()
    click.echo(
        f"imported {summary['model_id']}: {summary['vertices']} vertices, {summary['triangles']} triangles, "
        f"{summary['identity_coefficients']} identity / {summary['expression_coefficients']} expression / "
        f"{summary['albedo_coefficients']} albedo coefficients -> {path}"
    )


@model.command("fetch")
@click.argument("kind", type=click.Choice(["ict"]))
@click.option("--name", default="ict", show_default=True, help="Name to install the model under.")
@click.option("--url", default=None, help="Archive address (default: the public ICT-FaceKit repository).")
@click.option("--sha256", default=None, help="Expected SHA-256 of the archive (verified before use).")
@click.option("--embed/--no-embed", default=True, show_default=True,
              help="Compute the dense (468-point) landmark embedding after import.")
@click.option("--calibrate/--no-calibrate", default=True, show_default=True,
              help="Measure the detector's pose-dependent landmark bias after import.")
def fetch_cmd(kind: str, name: str, url: str | None, sha256: str | None, embed: bool, calibrate: bool) -> None:
    """Download a freely licensed face model and install it.

    The download resumes where it stopped if interrupted; run the command again.
    """
    from facerecon.stages.model_install import fetch_and_install_ict

    try:
        path = fetch_and_install_ict(name=name, url=url, sha256=sha256, embed=embed, calibrate=calibrate)
    except FaceModelError as exc:
        _fail(str(exc))
    click.echo(f"installed {kind} as {name!r} -> {path}")


@contextlib.contextmanager
def _cell_progress(description: str):
    """The commands' progress bar on stderr; yields a (done, total) callback."""
    from facerecon.cli.common import make_progress, stderr_console

    with make_progress(stderr_console(), unit="cell") as bar:
        task = bar.add_task(description, total=None)
        yield lambda done, total: bar.update(task, completed=done, total=total)


def _angle_grid(text: str, option: str) -> tuple[float, ...]:
    """'-90:90:15' (inclusive) or '0,30' -> angles in degrees; a usage error otherwise."""
    try:
        if ":" in text:
            start, stop, step = (float(x) for x in text.split(":"))
            if step <= 0 or stop < start:
                raise ValueError
            values = tuple(start + i * step for i in range(int((stop - start) / step + 1e-9) + 1))
        else:
            values = tuple(float(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise click.UsageError(f"{option}: expected START:STOP:STEP or a comma list of degrees, got {text!r}")
    if not values or any(abs(v) > 180 for v in values):
        raise click.UsageError(f"{option}: angles must lie in [-180, 180] degrees, got {text!r}")
    return values


@model.command("calibrate")
@click.argument("reference", required=False)
@click.option("--yaws", default="-90:90:15", show_default=True,
              help="Yaw grid in degrees: START:STOP:STEP or a comma list.")
@click.option("--pitches", default="-30:30:15", show_default=True,
              help="Pitch grid in degrees: START:STOP:STEP or a comma list.")
@click.option("--faces-per-cell", default=4, show_default=True, type=click.IntRange(1, 64),
              help="Random faces rendered per (yaw, pitch) cell of the grid.")
@click.option("--seed", default=11, show_default=True, type=int, help="Seed of the random faces.")
@click.option("--remove", is_flag=True, help="Delete the model's table instead (fits then use raw detections).")
@click.option("--embed/--no-embed", default=True, show_default=True,
              help="Recompute the dense (468-point) landmark embedding first; it is measured with the detector too.")
@click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON.")
def calibrate_cmd(reference: str | None, yaws: str, pitches: str, faces_per_cell: int, seed: int, remove: bool,
                  embed: bool, as_json: bool) -> None:
    """Measure the landmark detector's bias by head pose and store it in a face model.

    \b
    mediapipe pulls the landmarks of turned faces towards frontal. This renders random faces
    of the model at yaw -90..90 and pitch -30..30 (every 15 degrees), detects them like
    `facerecon detect`, and stores the mean offset of every landmark from its true position
    by pose. `fit`, `aggregate` and `evaluate` subtract the offset expected at the pose they
    find (see docs/fitting.md). It first recomputes the dense landmark embedding (where each
    of the detector's 468 points lies on the model; --no-embed keeps the stored one).
    `model import` and `model fetch` run both already; run this again after upgrading
    mediapipe or facerecon (a fit notes when the embedding is out of date). REFERENCE is an
    installed NAME or a model PATH (default: the model commands would use); the file is
    rewritten atomically.

    \b
    example:  facerecon model calibrate ict
    """
    import dataclasses

    from facerecon.facemodel.embedding import embed_dense_landmarks, embedding_version
    from facerecon.facemodel.model import save_face_model
    from facerecon.stages.calibrate import calibrate_detector_bias

    grid = {"yaws": _angle_grid(yaws, "--yaws"), "pitches": _angle_grid(pitches, "--pitches")}
    try:
        path, face_model = _load(reference)
        if embed and not remove:
            click.echo("measuring the dense landmark embedding", err=True)
            face_model = embed_dense_landmarks(face_model)
        if remove:
            bias = None
        else:
            with _cell_progress("measuring the detector's landmark bias") as progress:
                bias = calibrate_detector_bias(face_model, faces_per_cell=faces_per_cell, seed=seed,
                                               progress=progress, **grid)
        save_face_model(dataclasses.replace(face_model, detector_bias=bias), path)
    except FaceModelError as exc:
        _fail(str(exc))
    result = {"path": str(path), "samples": 0 if bias is None else bias.n_samples,
              "detector": None if bias is None else bias.detector,
              "dense_embedding": embedding_version(face_model)}
    if as_json:
        click.echo(json.dumps(result))
    elif bias is None:
        click.echo(f"removed the detector-bias table from {path}")
    else:
        click.echo(f"stored a detector-bias table ({bias.n_samples} views, {bias.detector}) in {path}")


def _load(reference: str | None):
    from facerecon.facemodel.model import load_face_model
    from facerecon.facemodel.resolve import resolve_face_model_path

    path = resolve_face_model_path(reference, allow_download=False)
    return path, load_face_model(path)


@model.command("learn-correctives")
@click.argument("fits", nargs=-1, required=True, type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--out", "out_path", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="Face-model file to write: the face model with the learned corrective space.")
@click.option("--face-model", default=None, metavar="NAME|PATH",
              help="The face model the photos were fitted with [default: FACERECON_FACE_MODEL, then 'ict'].")
@click.option("--geometry-modes", default=8, show_default=True, type=click.IntRange(1, 512),
              help="Size C_g of the geometry corrective space.")
@click.option("--reflectance-modes", default=8, show_default=True, type=click.IntRange(1, 512),
              help="Size C_r of the reflectance corrective space.")
@click.option("--steps", default=120, show_default=True, type=click.IntRange(0),
              help="Joint optimisation steps of bases and coefficients (after the free-form start).")
@click.option("--batch-size", default=8, show_default=True, type=click.IntRange(1, 4096),
              help="Photos per optimisation step.")
@click.option("--seed", default=0, show_default=True, type=int, help="Seed of the batch order.")
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda, cuda:N or mps.")
@click.option("--force", is_flag=True, help="Replace --out if it exists.")
@click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON.")
def learn_correctives_cmd(fits: tuple[Path, ...], out_path: Path, face_model: str | None, geometry_modes: int,
                          reflectance_modes: int, steps: int, batch_size: int, seed: int, device: str, force: bool,
                          as_json: bool) -> None:
    """Learn paper 004's corrective space from fitted photos and write a face model with it.

    \b
    FITS are fits.h5 files of `facerecon fit` runs (their detections files must still exist);
    every fitted face takes part. The geometry and reflectance bases and each photo's
    coefficients are found together by optimisation on the CPU (docs/fitting.md,
    "Correctives"); `fit --level final --face-model OUT` then solves the learned space's
    coefficients instead of free-form correctives.

    \b
    example:  facerecon model learn-correctives runs/*/fits.h5 --out ict_fml.h5
    """
    from facerecon.errors import InputError
    from facerecon.fitting.corrective_learning import LearnSettings
    from facerecon.stages.learn_correctives import run_learn_correctives

    try:
        settings = LearnSettings(geometry_modes=geometry_modes, reflectance_modes=reflectance_modes, steps=steps,
                                 batch_size=batch_size, seed=seed)
        with _phase_progress() as progress:
            summary = run_learn_correctives(fits, out_path, face_model, settings, device=device, overwrite=force,
                                            progress=progress)
    except InputError as exc:
        _fail(str(exc))
    if as_json:
        click.echo(json.dumps(summary))
        return
    click.echo(f"learned {summary['geometry_modes']} geometry + {summary['reflectance_modes']} reflectance modes "
               f"from {summary['photos']} photos (photometric error {summary['photometric_face_base']:.4f} -> "
               f"{summary['photometric_face_learned']:.4f}) -> {summary['path']}")


@contextlib.contextmanager
def _phase_progress():
    """A progress bar on stderr for named phases; yields a (phase, done, total) callback."""
    from facerecon.cli.common import make_progress, stderr_console

    with make_progress(stderr_console(), unit="step") as bar:
        tasks: dict[str, int] = {}

        def update(phase: str, done: int, total: int) -> None:
            if phase not in tasks:
                tasks[phase] = bar.add_task(phase, total=total)
            bar.update(tasks[phase], completed=done, total=total)

        yield update


@model.command("info")
@click.argument("reference", required=False)
@click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON.")
def info_cmd(reference: str | None, as_json: bool) -> None:
    """Describe a face model (NAME or PATH; default: the model commands would use)."""
    try:
        path, face_model = _load(reference)
    except FaceModelError as exc:
        _fail(str(exc))
    summary = face_model.summary() | {"path": str(path)}
    if as_json:
        click.echo(json.dumps(summary, indent=2))
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"face model {summary['model_id']}", show_header=False)
    for key, value in summary.items():
        if key == "regions":
            value = ", ".join(f"{k} {v}" for k, v in value.items())
        elif key == "detector_bias":
            value = "none (fits use raw detections)" if value is None else \
                f"{value['samples']} views, {value['detector']}"
        elif key == "correctives":
            value = "none (fit --level final uses free-form correctives)" if value is None else \
                f"learned: {value['geometry_modes']} geometry + {value['reflectance_modes']} reflectance modes " \
                f"from {value['photos']} photos"
        table.add_row(key.replace("_", " "), str(value))
    Console().print(table)


@model.command("list")
@click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON.")
def list_cmd(as_json: bool) -> None:
    """List the face models installed in the data directory."""
    from facerecon.facemodel.model import load_face_model
    from facerecon.facemodel.resolve import installed_models
    from facerecon.paths import models_dir

    rows = []
    for path in installed_models():
        try:
            s = load_face_model(path).summary()
            rows.append({"name": path.stem, "path": str(path), **{k: s[k] for k in (
                "model_id", "vertices", "triangles", "identity_coefficients", "expression_coefficients",
                "albedo", "dense_landmarks")}})
        except FaceModelError as exc:
            rows.append({"name": path.stem, "path": str(path), "error": str(exc)})
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    if not rows:
        click.echo(f"no face models in {models_dir()}; run `facerecon model fetch ict` or `facerecon model import`")
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"face models in {models_dir()}")
    for column in ("name", "model id", "vertices", "triangles", "identity", "expression", "albedo", "dense lmk"):
        table.add_column(column)
    for r in rows:
        if "error" in r:
            table.add_row(r["name"], f"[red]{r['error']}[/red]", "", "", "", "", "", "")
        else:
            table.add_row(r["name"], r["model_id"], str(r["vertices"]), str(r["triangles"]),
                          str(r["identity_coefficients"]), str(r["expression_coefficients"]),
                          "yes" if r["albedo"] else "no", str(r["dense_landmarks"]))
    Console().print(table)
