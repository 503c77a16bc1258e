"""``facerecon evaluate``: accuracy protocols with tables, JSON/CSV and plots."""

from __future__ import annotations

from pathlib import Path
from typing import Collection

import click

from facerecon.cli.common import (FIT_STEPS, EXIT_NOTHING_DONE, StageProgress, fail_run, graceful_stop, print_json,
                                  stderr_console)


def _run_protocol(console, quiet: bool, out_dir: Path, as_json: bool, run):
    """``run(progress, should_stop)`` under Ctrl-C handling and a progress display; a run that
    cannot start (no face model, bad dataset, unwritable output) ends with one error line."""
    from facerecon.errors import InputError, describe_os_error

    try:
        with graceful_stop() as stop, StageProgress(console, enabled=not quiet) as progress:
            return run(progress, stop)
    except (InputError, OSError) as exc:  # user mistakes (face model, store, dataset); a bug keeps its traceback
        fail_run(describe_os_error(exc), out_dir, as_json)


def _finish(result, as_json: bool, anything_done: bool) -> None:
    """JSON on stdout when asked, then the exit code: 130 interrupted, 1 nothing evaluated."""
    if as_json:
        print_json(result.to_dict())
    if result.summary["interrupted"]:
        raise SystemExit(130)
    if not anything_done:
        raise SystemExit(EXIT_NOTHING_DONE)


def _floats(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise click.BadParameter(f"expected comma-separated numbers, got {text!r}") from None


@click.group()
def evaluate() -> None:
    """Measure reconstruction accuracy with published protocols.

    \b
    Available:
      rendered  faces sampled from the face model, rendered at several
                poses, reconstructed and scored (error by yaw)
      micc      MICC Florence videos: one neutral shape per video scored
                against the subject's 3D scan (cooperative, indoor, outdoor)
      now       NoW benchmark: predictions in NoW's layout, scan-to-mesh
                median / mean / std where the scans are present (val)
      aflw2000  AFLW2000-3D: 68-point NME by yaw bin
      landmarks real photos with 68-point ground truth (.pts, .ljson,
                .mat): NME of the fit and of the detector, misses counted
      scan      a real 3D scan, with photos of that person or rendered
                (semi-real): scan-to-mesh error and blendshape neutrality
      albums    one folder per person: same-vs-different AUC of the fitted
                neutral shapes, and their spread over photo resolutions
      lap       paper 003 (aggregate --method lap): SIDE/MAD by album size on
                scan renders; identity similarity and SSIM on real albums
    """


@evaluate.command("rendered")
@click.option("--out", "-o", "out_dir", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Output folder: photos/, fit/, results.json, results.csv, error_by_yaw.png.")
@click.option("--face-model", default=None, metavar="NAME|PATH", help="Face model to sample and fit with.")
@click.option("--samples", type=click.IntRange(1), default=3, show_default=True, help="Faces sampled from the model.")
@click.option("--seed", type=int, default=0, show_default=True, help="Sampling seed (same seed, same faces).")
@click.option("--yaws", default="-80,-40,0,40,80", show_default=True, help="Yaw angles in degrees.")
@click.option("--pitches", default="-15,-20,-25", show_default=True, help="Pitch angles in degrees.")
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N.")
@click.option("--specular", is_flag=True, help="Render specular highlights (paper 002's Blinn-Phong light).")
@click.option("--shading", type=click.Choice(["lambert", "blinn-phong"]), default="lambert", show_default=True,
              help="The fit's shading (as `facerecon fit --shading`).")
@click.option("--json", "as_json", is_flag=True, help="Print the results as JSON on stdout.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar or table.")
def rendered(out_dir: Path, face_model: str | None, samples: int, seed: int, yaws: str, pitches: str, device: str,
             specular: bool, shading: str, as_json: bool, quiet: bool) -> None:
    """Rendered-pose protocol: error by yaw against the mean-face baseline.

    \b
    Each sampled face (identity, expression, albedo, light from the model's
    priors) is rendered at every pitch x yaw, reconstructed with
    `detect + fit`, and scored on the ground truth cropped to 95 mm around its
    nose tip: ICP with isotropic scale, point-to-plane RMSE (and mean
    point-to-surface distance). In-span faces: a floor, not a claim about
    real faces. Also the de-lit diffuse albedo's error over the skin (mean RGB
    distance, as fitted and after a per-channel gain). Resumable: rerun the
    same command to continue.

    \b
    Examples:
      facerecon evaluate rendered --out eval/ --samples 5 --seed 1
      facerecon evaluate rendered --out shiny/ --specular --shading blinn-phong
    """
    from facerecon.evaluation.rendered import RenderedOptions, run_rendered
    from facerecon.fitting.optimize import SHADING_PRESETS
    options = RenderedOptions(face_model=face_model, samples=samples, seed=seed, yaws=_floats(yaws),
                              pitches=_floats(pitches), device=device, specular=specular,
                              settings=SHADING_PRESETS[shading]())
    console = stderr_console(quiet=quiet)
    result = _run_protocol(console, quiet, out_dir, as_json,
                           lambda progress, stop: run_rendered(
                               out_dir, options, progress=progress.stage("fit", "face"),
                               detect_progress=progress.stage("detect"), should_stop=stop))
    if not quiet:
        from rich.table import Table

        table = Table(title="rendered-pose protocol: point-to-plane RMSE (mm)", title_justify="left")
        for column in ("yaw", "images", "reconstructed", "fit", "mean face", "improvement", "albedo err"):
            table.add_column(column, justify="right")
        for row in result.by_yaw:
            fmt = (lambda v, p="{:.2f}": "-" if v is None else p.format(v))  # noqa: E731
            table.add_row(f"{row['yaw']:+.0f}", str(row["images"]), str(row["reconstructed"]),
                          fmt(row["rmse_mean_mm"]) + (f" ± {row['rmse_std_mm']:.2f}" if row["rmse_std_mm"] else ""),
                          fmt(row["baseline_rmse_mean_mm"]), fmt(row["improvement_over_baseline"], "{:.0%}"),
                          fmt(row["albedo_error_mean"], "{:.3f}"))
        console.print(table)
        console.print(f"results: {out_dir / 'results.json'}, {out_dir / 'results.csv'}, "
                      f"{out_dir / 'error_by_yaw.png'}")
    _finish(result, as_json, anything_done=any(row["reconstructed"] for row in result.by_yaw))


def _subset(text: str, allowed: Collection[str], option: str) -> tuple[str, ...]:
    """A comma-separated, non-empty subset of ``allowed`` (case-insensitive, duplicates dropped)."""
    lookup = {name.lower(): name for name in allowed}
    names = tuple(dict.fromkeys(v.strip().lower() for v in text.split(",") if v.strip()))
    unknown = [n for n in names if n not in lookup]
    if unknown or not names:
        raise click.BadParameter(f"expected a comma-separated subset of {','.join(allowed)}, got {text!r}",
                                 param_hint=option)
    return tuple(lookup[n] for n in names)


@evaluate.command("micc")
@click.argument("root", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--out", "-o", "out_dir", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Output folder: frames/, fits/, results/, micc_results.json|.csv and plots.")
@click.option("--scenarios", default="cooperative,indoor,outdoor", show_default=True,
              help="Videos to evaluate: cooperative (Indoor-Cooperative), indoor (PTZ-Indoor), outdoor (PTZ-Outdoor).")
@click.option("--frames", type=click.IntRange(1), default=30, show_default=True,
              help="Evenly spaced frames reconstructed per video (all when the video is shorter).")
@click.option("--face-model", default=None, metavar="NAME|PATH", help="Face model to fit with.")
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N.")
@click.option("--steps", type=(click.IntRange(0), click.IntRange(0), click.IntRange(0)), default=FIT_STEPS,
              hidden=True, help="Fit iterations (landmark, coarse, fine), as `fit --steps`.")
@click.option("--json", "as_json", is_flag=True, help="Print the results as JSON on stdout.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar or tables.")
def micc(root: Path, out_dir: Path, scenarios: str, frames: int, face_model: str | None, device: str,
         steps: tuple[int, int, int], as_json: bool, quiet: bool) -> None:
    """MICC Florence protocol: per-video shape error against the 3D scans.

    \b
    ROOT is the MICC tree: subject_XX/Model/<view>/obj/<timestamp>.obj (scans
    in mm; frontal1, else frontal2, else any view) and subject_XX/Video/
    (Indoor-Cooperative, PTZ-Indoor, PTZ-Outdoor as .mjpg/.mjpeg/.mpg/.avi or
    a folder of frames with that name).

    \b
    Variant reported (paper 000 / Deep3DFaceRecon): --frames evenly spaced
    frames per video reconstructed with `detect + fit`, their neutral shapes
    (expression zero) averaged; the scan cropped to 95 mm around its nose tip
    (found from the geometry); ICP with rotation, translation and isotropic
    scale; point-to-plane RMSE of the scan vertices (mean point-to-surface
    distance too). Mean ± std over subjects per scenario.

    \b
    Resumable: frames, fits and finished videos are kept in OUT; rerun the
    same command to continue. Failures (no frames, no face, missing scan or
    video) are one-line reasons in the results.

    \b
    Exit codes: 0 at least one video scored; 1 none; 2 usage error;
    130 interrupted (finished videos are kept).

    \b
    Example:
      facerecon evaluate micc /data/MICC --out eval/micc --scenarios cooperative
    """
    from facerecon.evaluation.micc import SCENARIOS, MiccOptions, run_micc
    from facerecon.fitting.optimize import FitSettings

    settings = FitSettings(landmark_steps=steps[0], coarse_steps=steps[1], fine_steps=steps[2])
    options = MiccOptions(face_model=face_model, scenarios=_subset(scenarios, SCENARIOS, "--scenarios"),
                          frames=frames, device=device, settings=settings)
    console = stderr_console(quiet=quiet)

    def report(row: dict) -> None:
        what = f"{row['subject']} {row['scenario']}"
        if row["status"] == "ok":
            console.print(f"{what}: {row['rmse_mm']:.2f} mm RMSE ({row['frames_fitted']}/{row['frames_sampled']} "
                          f"frames, {row['seconds']:.1f} s{', done before' if row['resumed'] else ''})")
        else:
            console.print(f"{what}: [yellow]{row['reason']}[/]")

    result = _run_protocol(console, quiet, out_dir, as_json,
                           lambda progress, stop: run_micc(
                               root, out_dir, options, progress=progress.stage("micc", "video"), on_video=report,
                               should_stop=stop))
    if not quiet:
        _print_micc_tables(console, result, out_dir)
    _finish(result, as_json, anything_done=bool(result.summary["scored"]))


def _print_micc_tables(console, result, out_dir: Path) -> None:
    from rich.table import Table

    from facerecon.cli.common import problems_table

    def pm(mean, std) -> str:
        return "-" if mean is None else f"{mean:.2f} ± {std:.2f}"

    table = Table(title=f"MICC ({result.summary['variant']}): point-to-plane RMSE and mean distance, "
                        "mean ± std over subjects (mm)", title_justify="left")
    for column in ("scenario", "scored", "RMSE", "mean dist", "mean face", "s/video"):
        table.add_column(column, justify="left" if column == "scenario" else "right", no_wrap=True)
    for row in result.by_scenario:
        seconds = row["seconds_per_video"]
        table.add_row(row["scenario"], f"{row['scored']}/{row['videos']}",
                      pm(row["rmse_mean_mm"], row["rmse_std_mm"]),
                      pm(row["mean_distance_mean_mm"], row["mean_distance_std_mm"]),
                      "-" if row["baseline_rmse_mean_mm"] is None else f"{row['baseline_rmse_mean_mm']:.2f}",
                      "-" if seconds is None else f"{seconds:.1f}")
    console.print(table)
    scenarios = result.summary["scenario_names"]
    subjects = Table(title="per subject: point-to-plane RMSE (mm)", title_justify="left")
    subjects.add_column("subject")
    for scenario in scenarios:
        subjects.add_column(scenario, justify="right")
    cells: dict[str, dict[str, str]] = {}
    for row in result.rows:
        value = f"{row['rmse_mm']:.2f}" if row["status"] == "ok" else "failed"
        cells.setdefault(row["subject"], {})[row["scenario"]] = value
    for subject, values in cells.items():
        subjects.add_row(subject, *(values.get(s, "-") for s in scenarios))
    console.print(subjects)
    failures = result.summary["failures"]
    if failures:
        console.print(problems_table("not scored", [(f"{f['subject']} {f['scenario']}", f["reason"])
                                                    for f in failures], headers=("video", "reason")))
    plots = ", ".join(result.summary.get("plots", {}).values())
    console.print(f"results: {out_dir / 'micc_results.json'}, {out_dir / 'micc_results.csv'}, {plots}")
    if result.summary["seconds_per_video"] is not None:
        console.print(f"time per video (this run): {result.summary['seconds_per_video']:.1f} s")


def _fit_method_options(function):
    """--face-model, --device, --checkpoint, --refine, --batch-size and the hidden --steps shared
    by `evaluate now` and `evaluate aflw2000`."""
    options = [
        click.option("--face-model", default=None, metavar="NAME|PATH", help="Face model to fit with."),
        click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N."),
        click.option("--checkpoint", type=click.Path(exists=True, dir_okay=False), default=None,
                     help="Trained R-Net checkpoint: method 'network' instead of 'optimize' (as `fit --checkpoint`)."),
        click.option("--refine", type=click.IntRange(0), default=0, show_default=True,
                     help="With --checkpoint: photometric steps starting from the network's prediction."),
        click.option("--batch-size", type=click.IntRange(1, 4096), default=16, show_default=True,
                     help="Faces fitted together."),
        click.option("--limit", type=click.IntRange(1), default=None,
                     help="Evaluate only the first N images (a quick check; the numbers are not the benchmark's)."),
        click.option("--steps", type=(click.IntRange(0), click.IntRange(0), click.IntRange(0)),
                     default=FIT_STEPS, hidden=True, help="Fit iterations (landmark, coarse, fine), as `fit --steps`."),
    ]
    for option in reversed(options):
        function = option(function)
    return function


def _fmt(value, pattern: str = "{:.2f}") -> str:
    return "-" if value is None else pattern.format(value)


@evaluate.command("now")
@click.argument("root", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--out", "-o", "out_dir", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Output folder: predictions/ (NoW layout), images/, fit/, results/, now_results.json|.csv, "
                   "now_cumulative_error.png.")
@click.option("--split", type=click.Choice(["val", "test"]), default="val", show_default=True,
              help="Image list: imagepathsvalidation.txt (val) or imagepathstest.txt (test).")
@click.option("--image-list", type=click.Path(exists=True, dir_okay=False), default=None,
              help="Another image list (lines <subject>/<challenge>/<image>) instead of the split's.")
@click.option("--challenges", default=",".join(("multiview_neutral", "multiview_expressions", "multiview_occlusions",
                                                "selfie")), show_default=True,
              help="Challenges (image folders) to evaluate.")
@_fit_method_options
@click.option("--json", "as_json", is_flag=True, help="Print the results as JSON on stdout.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bars or tables.")
def now(root: Path, out_dir: Path, split: str, image_list: str | None, challenges: str, face_model: str | None,
        device: str, checkpoint: str | None, refine: int, batch_size: int, limit: int | None,
        steps: tuple[int, int, int], as_json: bool, quiet: bool) -> None:
    """NoW benchmark: predictions in NoW's layout and, with scans, its scan-to-mesh error.

    \b
    ROOT is the NoW dataset folder (or the one above final_release_version/):
    imagepathsvalidation.txt / imagepathstest.txt, iphone_pictures/<subject>/
    <challenge>/<image>.jpg, scans/<subject>/*.obj (mm) and
    scans_lmks_onlypp/<subject>/*.pp (7 landmarks).

    \b
    Every listed image is reconstructed with `detect + fit` (largest face);
    its neutral shape (expression zero; the scans are neutral) is written as
    OUT/predictions/<subject>/<challenge>/<image>.obj (mm) with <image>.npy,
    the 7 landmarks (68-point indices 36, 39, 42, 45, 33, 48, 54): the layout
    NoW's own evaluation and challenge server read. Where the subject's scan is
    present (val) the scan is cropped around its landmarks, the prediction is
    aligned (7-landmark similarity, refined on the squared scan-to-surface
    distances) and every scan vertex's distance to the surface is pooled:
    median / mean / std in mm, overall and per challenge.

    \b
    Resumable: fits and finished images are kept in OUT; rerun the same
    command to continue. Exit codes: 0 at least one image predicted; 1 none;
    2 usage error; 130 interrupted (finished images are kept).

    \b
    Example:
      facerecon evaluate now /data/NoW_Dataset/final_release_version --split val --out eval/now
    """
    from facerecon.evaluation.now import CHALLENGES, NowOptions, run_now
    from facerecon.fitting.optimize import FitSettings

    settings = FitSettings(landmark_steps=steps[0], coarse_steps=steps[1], fine_steps=steps[2])
    options = NowOptions(face_model=face_model, split=split, image_list=image_list,
                         challenges=_subset(challenges, CHALLENGES, "--challenges"), limit=limit, device=device,
                         batch_size=batch_size,
                         checkpoint=checkpoint, refine=refine, settings=settings)
    console = stderr_console(quiet=quiet)
    result = _run_protocol(console, quiet, out_dir, as_json,
                           lambda progress, stop: run_now(
                               root, out_dir, options, progress=progress.stage("fit", "face"),
                               detect_progress=progress.stage("detect"), score_progress=progress.stage("score"),
                               should_stop=stop))
    if not quiet:
        _print_now_tables(console, result, out_dir)
    _finish(result, as_json, anything_done=bool(result.summary["predicted"]))


def _print_now_tables(console, result, out_dir: Path) -> None:
    from rich.table import Table

    from facerecon.cli.common import problems_table

    summary = result.summary
    table = Table(title=f"NoW ({summary['split']}): scan-to-mesh distance, all scan vertices pooled (mm)",
                  title_justify="left")
    for column in ("challenge", "images", "predicted", "scored", "median", "mean", "std"):
        table.add_column(column, justify="left" if column == "challenge" else "right", no_wrap=True)
    for row in result.by_challenge:
        table.add_row(row["challenge"], str(row["images"]), str(row["predicted"]), str(row["scored"]),
                      _fmt(row["median_mm"]), _fmt(row["mean_mm"]), _fmt(row["std_mm"]))
    table.add_row("all", str(summary["images_total"]), str(summary["predicted"]), str(summary["scored"]),
                  _fmt(summary["median_mm"]), _fmt(summary["mean_mm"]), _fmt(summary["std_mm"]), style="bold")
    console.print(table)
    if summary["failures"]:
        console.print(problems_table("not predicted", [(f["image"], f["reason"]) for f in summary["failures"]],
                                     headers=("image", "reason")))
    if summary["not_scored"]:
        reasons: dict[str, int] = {}
        for item in summary["not_scored"]:
            reasons[item["reason"]] = reasons.get(item["reason"], 0) + 1
        console.print(problems_table("predicted, not scored", [(f"{n} image(s)", r) for r, n in reasons.items()],
                                     headers=("images", "reason")))
    console.print(f"predictions (NoW layout): {summary['predictions_dir']}")
    console.print(f"results: {out_dir / 'now_results.json'}, {out_dir / 'now_results.csv'}, "
                  f"{', '.join(summary.get('plots', {}).values())}")
    if summary["seconds_per_image"] is not None:
        console.print(f"time per image (this run): {summary['seconds_per_image']:.1f} s")


@evaluate.command("scan")
@click.argument("scan", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--out", "-o", "out_dir", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Output folder: renders/ (semi-real variant), fit/, scan_results.json|.csv, "
                   "scan_error_by_image.png.")
@click.option("--landmarks", "scan_landmarks", type=click.Path(exists=True, dir_okay=False), default=None,
              help="The scan's 3D landmarks (.npy or text, 68 or 51 iBUG points without the jaw, scan units): "
                   "landmark initialisation, nose tip, and the renders' lips, brows and eyes.")
@click.option("--photos", type=click.Path(exists=True, path_type=Path), default=None,
              help="Real photos of the scanned person (folder or file). Without it the scan itself is rendered "
                   "over --yaws x --pitches (semi-real variant).")
@click.option("--scan-units", type=click.Choice(["auto", "m", "cm", "mm"]), default="auto", show_default=True,
              help="Units of the scan and its landmarks (auto: from the scan's size).")
@click.option("--yaws", default=",".join(f"{v:g}" for v in (-40, -20, 0, 20, 40)), show_default=True,
              help="Render yaws in degrees (semi-real variant).")
@click.option("--pitches", default="-10,0,10", show_default=True, help="Render pitches in degrees (semi-real variant).")
@click.option("--seed", type=int, default=0, show_default=True, help="Albedo variation and backgrounds of the renders.")
@click.option("--face-model", default=None, metavar="NAME|PATH", help="Face model to fit with.")
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N.")
@click.option("--steps", type=(click.IntRange(0), click.IntRange(0), click.IntRange(0)), default=FIT_STEPS,
              hidden=True, help="Fit iterations (landmark, coarse, fine), as `fit --steps`.")
@click.option("--json", "as_json", is_flag=True, help="Print the results as JSON on stdout.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bars or tables.")
def scan(scan: Path, out_dir: Path, scan_landmarks: str | None, photos: Path | None, scan_units: str, yaws: str,
         pitches: str, seed: int, face_model: str | None, device: str, steps: tuple[int, int, int], as_json: bool,
         quiet: bool) -> None:
    """A real 3D scan: shape error of the fit against the scanned face.

    \b
    With --photos, real photos of the scanned person are reconstructed;
    without, the scan itself is rendered with a plausible skin albedo and
    light over a yaw x pitch grid (semi-real: a real face that no face model
    can express exactly). Each fit's exported mesh (with its expression), its
    neutral version and the model's mean face are scored: the scan cropped to
    95 mm around its nose tip, landmark initialisation, ICP with one
    isotropic scale, mean scan-to-mesh distance (mm). The scanned face is
    neutral, so the fitted blendshapes are checked too: the largest weight and
    opposing pairs (look up + down, jaw left + right, ...) that are both on.

    \b
    Resumable: fits are kept in OUT/fit. Exit codes: 0 at least one face
    scored; 1 none; 2 usage error; 130 interrupted.

    \b
    Examples:
      facerecon evaluate scan head.obj --landmarks head_lmks.npy --out eval/scan
      facerecon evaluate scan head.obj --landmarks head_lmks.npy --photos shots/ --out eval/scan_photos
    """
    from facerecon.evaluation.scan import ScanOptions, run_scan
    from facerecon.fitting.optimize import FitSettings

    settings = FitSettings(landmark_steps=steps[0], coarse_steps=steps[1], fine_steps=steps[2])
    options = ScanOptions(landmarks=scan_landmarks, units=scan_units, photos=None if photos is None else str(photos),
                          yaws=_floats(yaws), pitches=_floats(pitches), seed=seed, face_model=face_model,
                          device=device, settings=settings)
    console = stderr_console(quiet=quiet)
    result = _run_protocol(console, quiet, out_dir, as_json,
                           lambda progress, stop: run_scan(
                               scan, out_dir, options, progress=progress.stage("fit", "face"),
                               detect_progress=progress.stage("detect"), should_stop=stop))
    if not quiet:
        _print_scan_tables(console, result, out_dir)
    _finish(result, as_json, anything_done=bool(result.summary["reconstructed"]))


def _print_scan_tables(console, result, out_dir: Path) -> None:
    from rich.table import Table

    summary = result.summary
    table = Table(title=f"scan protocol ({summary['variant']}): mean scan-to-mesh distance (mm)", title_justify="left")
    for column in ("image", "exported", "neutral", "max blendshape", "opposing pairs on"):
        table.add_column(column, justify="left" if column in ("image", "opposing pairs on") else "right")
    for row in result.rows:
        if row["status"] != "ok":
            table.add_row(row["image"], "-", "-", "-", row["reason"])
            continue
        table.add_row(row["image"], _fmt(row["fit_mean_mm"]), _fmt(row["neutral_mean_mm"]),
                      f"{_fmt(row.get('max_blendshape'))} {row.get('max_blendshape_name', '')}",
                      row.get("opposing_active") or "")
    table.add_row("mean", _fmt(summary["fit_mean_mm"]), _fmt(summary["neutral_mean_mm"]), "", "", style="bold")
    table.add_row("mean face", _fmt(summary["mean_face_mean_mm"]), "", "", "")
    console.print(table)
    if summary["fit_improvement"] is not None:
        console.print(f"exported mesh vs mean face: {summary['fit_improvement']:+.0%}; neutral: "
                      f"{summary['neutral_improvement']:+.0%}")
    console.print(f"results: {out_dir / 'scan_results.json'}, {out_dir / 'scan_results.csv'}")


@evaluate.command("lap")
@click.argument("albums_root", required=False, type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--out", "-o", "out_dir", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Output folder: renders/, albums/, aggregate/, albums_aggregate/, lap_results.json|.csv, "
                   "lap_albums.json|.csv, lap_depth_by_size.png.")
@click.option("--scan", "scan_path", type=click.Path(exists=True, dir_okay=False), default=None,
              help="A real scan (OBJ) to render at 8 views: depth part (SIDE, MAD, scan-to-mesh by album size).")
@click.option("--scan-landmarks", type=click.Path(exists=True, dir_okay=False), default=None,
              help="The scan's 3D landmarks (68 or 51 iBUG points; needed with --scan).")
@click.option("--scan-units", type=click.Choice(["auto", "m", "cm", "mm"]), default="auto", show_default=True,
              help="Units of the scan and its landmarks.")
@click.option("--sizes", default="1,2,4,8", show_default=True, help="Album sizes of the depth part (at most 8).")
@click.option("--lap-steps", type=(click.IntRange(0), click.IntRange(0)), default=(120, 50), show_default=True,
              metavar="AGGREGATE PERSONALISE", help="As `aggregate --lap-steps`.")
@click.option("--face-model", default=None, metavar="NAME|PATH", help="Face model of the 3DMM start.")
@click.option("--steps", type=(click.IntRange(0), click.IntRange(0), click.IntRange(0)), default=FIT_STEPS,
              hidden=True, help="The joint fit's iterations (landmark, coarse, fine), as `aggregate --steps`.")
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N.")
@click.option("--json", "as_json", is_flag=True, help="Print the results as JSON on stdout.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bars or tables.")
def lap(albums_root: Path | None, out_dir: Path, scan_path: str | None, scan_landmarks: str | None, scan_units: str,
        sizes: str, lap_steps: tuple[int, int], face_model: str | None, steps: tuple[int, int, int], device: str,
        as_json: bool, quiet: bool) -> None:
    """Paper 003's metrics for `aggregate --method lap` against the 3DMM.

    \b
    Depth (--scan): the scan rendered at 8 views; albums of its first 1, 2,
    4, 8 views aggregated with --method lap; the 3DMM joint neutral face,
    LAP's canonical face and its personalised faces aligned to the scan and
    scored in every view: SIDE (x 10^-2) and MAD (degrees) against the scan's
    own depth and normals, and the scan-to-mesh distance (mm).
    Albums (ALBUMS_ROOT, one folder per person): per photo, identity
    similarity and SSIM of the 3DMM fit's, the canonical and the personalised
    render against the photo (paper 003 table 5).

    \b
    Resumable (the aggregate runs skip finished albums). Exit codes: 0 scored;
    1 nothing scored; 2 usage error; 130 interrupted.

    \b
    Examples:
      facerecon evaluate lap --scan head.obj --scan-landmarks head_lmks.npy --out eval/lap
      facerecon evaluate lap people/ --out eval/lap_albums
    """
    from facerecon.aggregation.lap import LapSettings
    from facerecon.evaluation.lap import LapEvalOptions, run_lap_eval
    from facerecon.fitting.optimize import FitSettings

    if albums_root is None and scan_path is None:
        raise click.UsageError("give an albums ROOT and/or --scan")
    size_list = tuple(int(v) for v in _floats(sizes))
    if not size_list or any(v < 1 or v > 8 for v in size_list):
        raise click.BadParameter("sizes must be between 1 and 8", param_hint="--sizes")
    options = LapEvalOptions(scan=scan_path, scan_landmarks=scan_landmarks, scan_units=scan_units,
                             albums=None if albums_root is None else str(albums_root), sizes=size_list,
                             face_model=face_model, device=device,
                             lap=LapSettings(aggregate_steps=lap_steps[0], personal_steps=lap_steps[1]),
                             settings=FitSettings(landmark_steps=steps[0], coarse_steps=steps[1], fine_steps=steps[2]))
    console = stderr_console(quiet=quiet)
    result = _run_protocol(console, quiet, out_dir, as_json,
                           lambda progress, stop: run_lap_eval(out_dir, options, progress=progress.stage("lap", "album"),
                                                               should_stop=stop))
    if not quiet:
        _print_lap_tables(console, result, out_dir)
    anything = any(r["status"] == "ok" for r in result.depth_rows + result.album_rows)
    _finish(result, as_json, anything_done=anything)


def _print_lap_tables(console, result, out_dir: Path) -> None:
    from rich.table import Table

    if result.summary["depth_summary"]:
        table = Table(title="LAP depth on scan renders (lower is better)", title_justify="left")
        for column in ("photos", "prediction", "views", "SIDE x1e-2", "MAD deg", "scan-to-mesh mm"):
            table.add_column(column, justify="left" if column == "prediction" else "right")
        for r in result.summary["depth_summary"]:
            table.add_row(str(r["size"]), r["prediction"], str(r["views"]), _fmt(r["side_x100"]), _fmt(r["mad_deg"]),
                          _fmt(r["mesh_mm"]))
        console.print(table)
    albums = result.summary["albums_summary"]
    if albums:
        table = Table(title="LAP on real albums (higher is better)", title_justify="left")
        for column in ("render", "identity similarity", "SSIM"):
            table.add_column(column, justify="left" if column == "render" else "right")
        for label in ("fit", "canonical", "personal"):
            table.add_row({"fit": "3DMM fit"}.get(label, f"LAP {label}"), _fmt(albums.get(f"identity_{label}")),
                          _fmt(albums.get(f"ssim_{label}")))
        console.print(table)
    console.print(f"results: {out_dir / 'lap_results.json'}")


@evaluate.command("albums")
@click.argument("root", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--out", "-o", "out_dir", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Output folder: fit/, resolutions/, resolutions_fit/, albums_results.json|.csv, albums_pairs.csv, "
                   "albums_distances.png.")
@click.option("--resolutions", default=",".join(str(h) for h in (240, 480, 720, 1080)), show_default=True,
              help="Photo heights (px) for the resolution spread; empty to skip it.")
@click.option("--resolution-photos", type=click.IntRange(0), default=1, show_default=True,
              help="Photos per person resized for the resolution spread.")
@click.option("--face-model", default=None, metavar="NAME|PATH", help="Face model to fit with.")
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N.")
@click.option("--batch-size", type=click.IntRange(1, 4096), default=16, show_default=True, help="Faces fitted together.")
@click.option("--steps", type=(click.IntRange(0), click.IntRange(0), click.IntRange(0)), default=FIT_STEPS,
              hidden=True, help="Fit iterations (landmark, coarse, fine), as `fit --steps`.")
@click.option("--json", "as_json", is_flag=True, help="Print the results as JSON on stdout.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bars or tables.")
def albums(root: Path, out_dir: Path, resolutions: str, resolution_photos: int, face_model: str | None, device: str,
           batch_size: int, steps: tuple[int, int, int], as_json: bool, quiet: bool) -> None:
    """Real albums: do one person's photos give one shape, and others another?

    \b
    ROOT holds one folder per person. Every photo is fitted (largest face);
    the neutral shapes (expression zero, front of the face) of every photo
    pair are compared after a similarity alignment (RMS distance, mm).
    Reported: the median same-person and different-person distances and the
    verification AUC (how well the distance alone tells same from different
    people), and the resolution spread: the first photo(s) of each person
    resized to each --resolutions height and fitted again (mean pairwise
    distance of one photo's shapes; median over photos). Identity
    similarity: cosine of dlib face-recognition embeddings of each photo and
    of its fit rendered over it (paper 003 table 5), averaged.

    \b
    Resumable: fits are kept in OUT. Exit codes: 0 at least two photos
    fitted; 1 fewer; 2 usage error; 130 interrupted.

    \b
    Example:
      facerecon evaluate albums ../shared/realdata/albums --out eval/albums
    """
    from facerecon.evaluation.albums import AlbumOptions, run_albums
    from facerecon.fitting.optimize import FitSettings

    try:
        heights = tuple(int(v) for v in resolutions.split(",") if v.strip())
    except ValueError:
        raise click.BadParameter(f"expected comma-separated heights in pixels, got {resolutions!r}",
                                 param_hint="--resolutions") from None
    if any(h < 16 or h > 8192 for h in heights):
        raise click.BadParameter("heights must lie in 16..8192 px", param_hint="--resolutions")
    settings = FitSettings(landmark_steps=steps[0], coarse_steps=steps[1], fine_steps=steps[2])
    options = AlbumOptions(face_model=face_model, device=device, batch_size=batch_size, resolutions=heights,
                           resolution_photos=resolution_photos, settings=settings)
    console = stderr_console(quiet=quiet)
    result = _run_protocol(console, quiet, out_dir, as_json,
                           lambda progress, stop: run_albums(
                               root, out_dir, options, progress=progress.stage("fit", "face"),
                               detect_progress=progress.stage("detect"), should_stop=stop))
    if not quiet:
        _print_album_tables(console, result, out_dir)
    _finish(result, as_json, anything_done=result.summary["fitted"] >= 2)


def _print_album_tables(console, result, out_dir: Path) -> None:
    from rich.table import Table

    from facerecon.cli.common import problems_table

    s = result.summary
    table = Table(title="albums: neutral-shape consistency (aligned RMS distance, mm)", title_justify="left")
    for column in ("people", "photos", "fitted", "same median", "different median", "AUC", "resolution spread",
                   "identity similarity"):
        table.add_column(column, justify="right")
    spread = (s["resolution"] or {}).get("median_spread_mm")
    table.add_row(str(s["people"]), str(s["photos"]), str(s["fitted"]), _fmt(s["same_median_mm"]),
                  _fmt(s["different_median_mm"]), _fmt(s["auc"], "{:.3f}"), _fmt(spread),
                  _fmt(s["identity_similarity_mean"], "{:.3f}"))
    console.print(table)
    failures = [(r["key"], r["reason"]) for r in result.rows if r["status"] != "ok"]
    if failures:
        console.print(problems_table("not fitted", failures, headers=("photo", "reason")))
    console.print(f"results: {out_dir / 'albums_results.json'}, {out_dir / 'albums_pairs.csv'}")


def _run_landmark_protocol(run, root: Path, out_dir: Path, options, as_json: bool, quiet: bool, title: str) -> None:
    console = stderr_console(quiet=quiet)
    result = _run_protocol(console, quiet, out_dir, as_json,
                           lambda progress, stop: run(
                               root, out_dir, options, progress=progress.stage("fit", "face"),
                               detect_progress=progress.stage("detect"), should_stop=stop))
    if not quiet:
        _print_landmark_tables(console, result, out_dir, title)
    _finish(result, as_json, anything_done=bool(result.summary["scored"]))


def _landmark_options(face_model, device, checkpoint, refine, batch_size, limit, steps) -> dict:
    from facerecon.fitting.optimize import FitSettings

    settings = FitSettings(landmark_steps=steps[0], coarse_steps=steps[1], fine_steps=steps[2])
    return dict(face_model=face_model, device=device, batch_size=batch_size, limit=limit, checkpoint=checkpoint,
                refine=refine, settings=settings)


@evaluate.command("landmarks")
@click.argument("root", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--out", "-o", "out_dir", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Output folder: fit/, landmarks_results.json|.csv, landmarks_nme_by_yaw.png, "
                   "landmarks_cumulative_nme.png.")
@_fit_method_options
@click.option("--json", "as_json", is_flag=True, help="Print the results as JSON on stdout.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bars or tables.")
def landmarks(root: Path, out_dir: Path, face_model: str | None, device: str, checkpoint: str | None, refine: int,
              batch_size: int, limit: int | None, steps: tuple[int, int, int], as_json: bool, quiet: bool) -> None:
    """Real photos with 68-point ground truth: NME of the fit and of the detector.

    \b
    ROOT holds photos, each with a ground-truth file of the same name:
      photo.pts    iBUG / 300-W (68 lines "x y", 1-based pixels)
      photo.ljson  menpo JSON (points stored as y, x)
      photo.mat    AFLW2000-3D (pt3d_68) or 300W-LP (pt2d), with Pose_Para

    \b
    Every photo is reconstructed with `detect + fit` (every face); the fitted
    face whose projected 68 landmarks overlap the annotated ones most is
    scored. NME = mean 2D distance over the 68 points / sqrt(w x h) of the
    ground-truth landmarks' box, x 100, for the fit's projected landmarks and
    for the detector's own 68 points on the same face. Bins on |yaw| (from
    Pose_Para, else the fitted yaw): [0, 30], (30, 60], (60, 90]. A photo
    whose face is not found is a miss: counted and listed, never dropped.

    \b
    Resumable: fits are kept in OUT/fit; rerun the same command to continue.
    Exit codes: 0 at least one photo scored; 1 none; 2 usage error;
    130 interrupted (finished fits are kept).

    \b
    Example:
      facerecon evaluate landmarks ../shared/realdata/landmarks --out eval/landmarks
    """
    from facerecon.evaluation.landmarks import LandmarkOptions, run_landmarks

    options = LandmarkOptions(**_landmark_options(face_model, device, checkpoint, refine, batch_size, limit, steps))
    _run_landmark_protocol(run_landmarks, root, out_dir, options, as_json, quiet, "68-point landmarks")


@evaluate.command("aflw2000")
@click.argument("root", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--out", "-o", "out_dir", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Output folder: fit/, aflw2000_results.json|.csv, aflw2000_nme_by_yaw.png, "
                   "aflw2000_cumulative_nme.png.")
@_fit_method_options
@click.option("--json", "as_json", is_flag=True, help="Print the results as JSON on stdout.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bars or tables.")
def aflw2000(root: Path, out_dir: Path, face_model: str | None, device: str, checkpoint: str | None, refine: int,
             batch_size: int, limit: int | None, steps: tuple[int, int, int], as_json: bool, quiet: bool) -> None:
    """AFLW2000-3D: 68-point landmark NME by yaw bin.

    \b
    ROOT holds image<NNNNN>.jpg with image<NNNNN>.mat beside each (pt3d_68:
    3 x 68 landmarks in pixels; Pose_Para: pitch, yaw, roll in radians, ...).

    \b
    Every photo is reconstructed with `detect + fit` (every face); the fitted
    face whose projected 68 landmarks overlap the annotated ones most is
    scored. NME = mean 2D distance over the 68 points / sqrt(w x h) of the
    ground-truth landmarks' box, x 100. Bins on |yaw|: [0, 30], (30, 60],
    (60, 90] (beyond 90 counts in the last). Reported: each bin's mean, the
    mean of the three bin means (headline) and the plain mean over images,
    with the face detector's own landmarks as a reference. Images without a
    detected face are misses: counted and listed (the `missed` column).

    \b
    Resumable: fits are kept in OUT/fit; rerun the same command to continue.
    Exit codes: 0 at least one image scored; 1 none; 2 usage error;
    130 interrupted (finished fits are kept).

    \b
    Example:
      facerecon evaluate aflw2000 /data/AFLW2000 --out eval/aflw2000
    """
    from facerecon.evaluation.aflw2000 import AflwOptions, run_aflw2000

    options = AflwOptions(**_landmark_options(face_model, device, checkpoint, refine, batch_size, limit, steps))
    _run_landmark_protocol(run_aflw2000, root, out_dir, options, as_json, quiet, "AFLW2000-3D")


def _print_landmark_tables(console, result, out_dir: Path, title: str) -> None:
    from rich.table import Table

    from facerecon.cli.common import problems_table

    summary = result.summary
    table = Table(title=f"{title}: 68-point NME x 100 (normalised by sqrt(w*h) of the landmark box)",
                  title_justify="left")
    for column in ("|yaw|", "images", "scored", "missed", "mean", "median", "std", "detector"):
        table.add_column(column, justify="left" if column == "|yaw|" else "right", no_wrap=True)
    for row in result.by_yaw:
        table.add_row(row["yaw_bin"], str(row["images"]), str(row["scored"]), str(row["missed"]),
                      _fmt(row["nme_mean_percent"]),
                      _fmt(row["nme_median_percent"]), _fmt(row["nme_std_percent"]),
                      _fmt(row["detector_nme_mean_percent"]))
    table.add_row("mean of bins", "", "", "", _fmt(summary["nme_balanced_percent"]), "", "",
                  _fmt(summary["detector_nme_balanced_percent"]), style="bold")
    table.add_row("all images", str(summary["images_total"]), str(summary["scored"]), str(summary["missed"]),
                  _fmt(summary["nme_mean_percent"]), "", "", _fmt(summary["detector_nme_mean_percent"]))
    console.print(table)
    regions = Table(title="by face part (mean NME x 100 over the scored images)", title_justify="left")
    for column in ("", *summary["regions"], f"inner lips, open mouth ({summary['open_mouth_images']})"):
        regions.add_column(column.replace("_", " "), justify="right", no_wrap=True)
    open_lips = summary["inner_lips_open_mouth"] or {"fit": None, "detector": None}
    for who in ("fit", "detector"):
        regions.add_row(who, *(_fmt(v[who]) for v in summary["regions"].values()), _fmt(open_lips[who]))
    console.print(regions)
    if summary["failures"]:
        console.print(problems_table("not scored", [(f["image"], f["reason"]) for f in summary["failures"]],
                                     headers=("image", "reason")))
    stem = summary["protocol"]
    console.print(f"results: {out_dir / (stem + '_results.json')}, {out_dir / (stem + '_results.csv')}, "
                  f"{', '.join(summary.get('plots', {}).values())}")
    if summary["seconds_per_image"] is not None:
        console.print(f"time per image (this run): {summary['seconds_per_image']:.2f} s")
