"""``facerecon train``: self-supervised R-Net training (paper 000, multi-view terms of paper 001),
C-Net (paper 000 sec. 5) or the LAP networks (paper 003)."""

from __future__ import annotations

from pathlib import Path

import click

from facerecon.cli.common import StageProgress, fail_run, graceful_stop, print_json, stderr_console, summary_table


@click.command()
@click.option("--config", "config_path", type=click.Path(dir_okay=False, path_type=Path),
              help="Training configuration (TOML); see --print-config and docs/training.md.")
@click.option("--print-config", is_flag=True, help="Print a fully commented default configuration and exit.")
@click.option("--resume", is_flag=True, help="Continue from the last checkpoint in the output directory.")
@click.option("--device", default="auto", show_default=True,
              help="auto, cpu, cuda or cuda:N (under torchrun: cuda means cuda:LOCAL_RANK).")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON on stdout.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar or summary.")
def train(config_path: Path | None, print_config: bool, resume: bool, device: str, as_json: bool,
          quiet: bool) -> None:
    """Train R-Net (ResNet regressing face-model coefficients, light and pose)
    with the self-supervised hybrid loss of Deng et al. 2019, plus the
    multi-view consistency losses of Shang et al. 2020 when data.group_by
    groups the images by identity. With [cnet] enabled = true, train C-Net
    instead (Deng et al. 2019 sec. 5): confidences for aggregating the
    identity over several photos of a person, over a frozen trained R-Net
    (one process; not under torchrun). Use it with
    `facerecon aggregate --cnet CKPT`. With [lap] enabled = true, train the
    LAP networks of Zhang et al. 2021 (paper 003: aggregation, pose, light,
    confidence and attribute-refining networks) on photos grouped by person,
    in the paper's three steps; use them with
    `facerecon aggregate --method lap --checkpoint CKPT`.

    \b
    Writes to output.directory: checkpoints/ (atomic, with config, face-model
    id and code version), metrics.jsonl (loss terms, images/s, validation
    loss), previews/ (input | render | overlay).

    \b
    Examples:
      facerecon train --print-config > train.toml
      facerecon train --config train.toml
      facerecon train --config train.toml --resume
      torchrun --nproc_per_node 4 -m facerecon train --config train.toml
      facerecon train --config cnet.toml        # [cnet] enabled, own output.directory
      facerecon train --config lap.toml         # [lap] enabled, own output.directory
    """
    from facerecon.training.config import DEFAULT_CONFIG_TEXT, ConfigError, load_config

    if print_config:
        click.echo(DEFAULT_CONFIG_TEXT, nl=False)
        return
    if config_path is None:
        raise click.UsageError("--config is required (or --print-config)")
    try:
        config = load_config(config_path)
    except ConfigError as exc:
        raise click.UsageError(f"{config_path}: {exc}") from None

    from facerecon.errors import InputError
    from facerecon.training.distributed import RemoteError, is_main_process
    from facerecon.training.run import run_training

    quiet = quiet or not is_main_process()  # under torchrun only rank 0 reports
    as_json = as_json and is_main_process()
    console = stderr_console(quiet=quiet)
    try:
        with graceful_stop() as stop, StageProgress(console, enabled=not quiet) as progress:
            summary, _ = run_training(config, device, resume, progress=progress.stage("train", "step"),
                                      should_stop=stop)
    except (InputError, RemoteError, OSError, FloatingPointError) as exc:  # a bug keeps its traceback
        fail_run(str(exc), config.output, as_json)
    data = summary.to_dict()
    if not quiet:
        for note in data["notes"]:
            console.print(f"note: {note}")
        fmt = lambda v, p="{:.4f}": "-" if v is None else p.format(v)  # noqa: E731
        console.print(summary_table("train summary", [
            ("steps", data["steps_done"]), ("first loss", fmt(data["first_loss"])),
            ("last loss", fmt(data["last_loss"])), ("validation loss", fmt(data["validation_loss"])),
            ("images/s", fmt(data["images_per_second"], "{:.1f}")), ("checkpoint", data["checkpoint"])]))
    if as_json:
        print_json(data)
    if summary.interrupted:
        raise SystemExit(130)
