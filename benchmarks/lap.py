"""Time of `aggregate --method lap` per album (run by hand; prints numbers).

    FACERECON_HOME=... PYTHONPATH=. python benchmarks/lap.py ../shared/realdata/albums/id03 [--photos 5]
        [--sizes 128,256] [--threads 2]

For each canonical map size: the whole album (detection, the joint 3DMM aggregation, LAP) and
the LAP part alone (aggregation + personalisation + files), in seconds, on the first
``--photos`` photos of the album (a fresh output folder per run).
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import h5py
import torch

from facerecon.aggregation.lap import LapSettings
from facerecon.stages.aggregate import AggregateOptions, run_aggregate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("album", type=Path)
    parser.add_argument("--photos", type=int, default=5)
    parser.add_argument("--sizes", default="128")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    photos = sorted(p for p in args.album.iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png"))[:args.photos]
    print(f"album {args.album.name}: {len(photos)} photos, torch threads {torch.get_num_threads()}")
    print(f"{'grid':>6} {'album s':>9} {'lap s':>8} {'joint+detect s':>15}")
    for size in (int(v) for v in args.sizes.split(",")):
        with tempfile.TemporaryDirectory() as tmp:
            album = Path(tmp) / args.album.name
            album.mkdir()
            for p in photos:
                shutil.copy(p, album / p.name)
            started = time.perf_counter()
            summary = run_aggregate([str(album)], Path(tmp) / "out", AggregateOptions(
                method="lap", formats=["obj"], texture_size=512, lap=LapSettings(grid_size=size)))
            total = time.perf_counter() - started
            with h5py.File(Path(tmp) / "out" / "aggregate.h5") as f:
                lap_seconds = float(f["identities"][album.name]["lap"].attrs["seconds"])
            assert summary.albums[0].status == "ok", summary.albums[0].reason
            print(f"{size:>6} {total:>9.1f} {lap_seconds:>8.1f} {total - lap_seconds:>15.1f}")


if __name__ == "__main__":
    main()
