"""The ``facerecon`` command line. This layer parses arguments and calls the library."""

from __future__ import annotations

import click

from facerecon import __version__


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="facerecon")
def main() -> None:
    """Turn folders of ordinary face photos into textured 3D face meshes.

    \b
    Typical session:
      facerecon fit photos/ --out meshes/    # detect + fit + textured meshes
      facerecon detect photos/ --out det.h5  # faces, landmarks, crops, masks only
      facerecon export meshes/fits.h5 --out glb/ --format glb --neutral
      facerecon aggregate album/ --out person/  # one identity from many photos
      facerecon model list                   # face models available
      facerecon evaluate rendered --out eval/  # accuracy by yaw on rendered faces
      facerecon synth --out synth/ --count 1000 --views 4
      facerecon train --config train.toml    # see: facerecon train --print-config

    Exit codes: 0 success (at least one input processed), 1 nothing could be
    processed, 2 usage error (bad option or argument), 130 interrupted by
    Ctrl-C (finished work is saved; run the same command again to resume).
    """


def _register() -> None:
    # Each command lives in its own module.
    from facerecon.cli.aggregate import aggregate
    from facerecon.cli.detect import detect
    from facerecon.cli.evaluate import evaluate
    from facerecon.cli.export import export
    from facerecon.cli.fit import fit
    from facerecon.cli.model import model
    from facerecon.cli.synth import synth
    from facerecon.cli.train import train

    for command in (model, detect, fit, export, aggregate, evaluate, synth, train):
        main.add_command(command)


_register()
