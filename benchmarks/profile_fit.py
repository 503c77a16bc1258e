"""Where the time of `facerecon fit` goes: one photo, and a batch of photos (run by hand).

Each run is a fresh process (as a user's command is), timed from its start: importing the CLI,
then `run_fit` with the stage functions wrapped by wall-clock timers: model load, recognition
network load, detection, the fit's stages (landmark L-BFGS, light, coarse and fine photometric
Adam), texture and mesh building, mesh files, overlays and the contact sheet. Prints one table
per run, and the median of ``--repeats`` runs. Numbers only, no assertions.

    FACERECON_HOME=... PYTHONPATH=. python benchmarks/profile_fit.py --photos examples/astronaut.png
    FACERECON_HOME=... PYTHONPATH=. python benchmarks/profile_fit.py --photos ../shared/realdata/landmarks --limit 16
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

#: (label, module, attribute path) of the functions timed inside the fit
TIMED = [
    ("model load", "facerecon.stages.fit", "resolve_face_model"),
    ("recognition network", "facerecon.stages.fit", "_networks"),
    ("detection", "facerecon.stages.fit", "_detections"),
    ("fit: landmarks (L-BFGS)", "facerecon.fitting.optimize", "FaceFitter._run_landmark_stage"),
    ("fit: light (least squares)", "facerecon.fitting.optimize", "FaceFitter.solve_light"),
    ("fit: photometric (Adam)", "facerecon.fitting.optimize", "FaceFitter._run_stage"),
    ("texture + arrays", "facerecon.stages.fit", "_FaceWriter.build"),
    ("mesh files", "facerecon.stages.fit", "write_face_files"),
    ("overlays", "facerecon.stages.fit", "_FaceWriter.overlay"),
    ("contact sheet", "facerecon.stages.fit", "_write_contact_sheet"),
]

CHILD = r'''
import importlib, json, sys, time
start = float(sys.argv[1])
t_import = time.time()
import facerecon.cli  # noqa: F401  (what `facerecon` imports first)
from facerecon.stages.fit import FitOptions, run_fit
imported = time.time()
timed = json.loads(sys.argv[2])
totals = {label: 0.0 for label, *_ in timed}

def wrap(label, owner, name):
    original = getattr(owner, name)
    def timer(*args, **kwargs):
        t = time.perf_counter()
        try:
            return original(*args, **kwargs)
        finally:
            totals[label] += time.perf_counter() - t
    setattr(owner, name, timer)

for label, module, path in timed:
    owner = importlib.import_module(module)
    *parents, name = path.split(".")
    for parent in parents:
        owner = getattr(owner, parent)
    wrap(label, owner, name)
summary = run_fit(sys.argv[3:-1], sys.argv[-1], FitOptions())
done = time.time()
print(json.dumps({"start-up (python + imports)": imported - start, **totals, "total (wall)": done - start,
                  "faces": len(summary.faces)}))
'''


def run_once(photos: list[str], out: Path) -> dict:
    """One fresh process fitting ``photos`` into ``out``; returns its timings (seconds)."""
    started = time.time()
    result = subprocess.run([sys.executable, "-c", CHILD, str(started), json.dumps(TIMED), *photos, str(out)],
                            capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise SystemExit(result.stderr[-2000:])
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--photos", required=True, help="A photo, or a folder of photos.")
    parser.add_argument("--limit", type=int, default=None, help="At most this many photos of a folder.")
    parser.add_argument("--repeats", type=int, default=3, help="Runs (the median is reported).")
    args = parser.parse_args()
    source = Path(args.photos)
    if source.is_dir():
        photos = sorted(str(p) for p in source.iterdir()
                        if p.suffix.lower() in (".jpg", ".jpeg", ".png", ".ppm", ".pgm"))[:args.limit]
    else:
        photos = [str(source)]
    runs = []
    for repeat in range(args.repeats):
        with tempfile.TemporaryDirectory() as tmp:
            runs.append(run_once(photos, Path(tmp) / "out"))
        print(f"run {repeat + 1}: {runs[-1]['total (wall)']:.2f} s, {runs[-1]['faces']} faces", flush=True)
    faces = runs[0]["faces"] or 1
    print(f"\n{len(photos)} photo(s), {faces} face(s); median of {len(runs)} fresh processes")
    print(f"{'stage':32s} {'seconds':>9s} {'per face':>9s}")
    for key in runs[0]:
        if key == "faces":
            continue
        value = statistics.median(r[key] for r in runs)
        print(f"{key:32s} {value:9.2f} {value / faces:9.2f}")


if __name__ == "__main__":
    main()
