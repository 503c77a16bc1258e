"""Throughput benchmark of the detect stage (run by hand, no assertions).

    PYTHONPATH=. python benchmarks/detect.py              # 640x480 and 1920x1080
    PYTHONPATH=. python benchmarks/detect.py --images 40 --sizes 640x480

Builds JPEG photos from ``examples/astronaut.png``: the astronaut scaled so the face is
about a quarter of the image height, pasted at varying positions on a noisy, tinted
background, saved at quality 90. Reports images/s for two measurements:

* ``pipeline``: per image, in one thread: read the file, SHA-256, decode
  (:func:`facerecon.io.images.load_image`), then detect + mesh + align/crop + skin
  attention + region masks (:func:`facerecon.stages.detect.analyze_image`). No HDF5.
  A per-phase breakdown (ms/image) is printed too.
* ``end-to-end``: :func:`facerecon.stages.detect.run_detect` on the folder, i.e. what
  ``facerecon detect DIR --out X.h5`` does: loading in a background thread, the same
  analysis, one HDF5 shard per image (gzip, fsync) and the final pack into X.h5.
  Excludes process start-up and mediapipe's one-time graph creation (a warm-up image
  is analysed first).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from facerecon.detection.align import alignment_matrix, transform_points, valid_mask, warp_crop  # noqa: E402
from facerecon.detection.masks import region_masks  # noqa: E402
from facerecon.detection.skin import skin_attention_image  # noqa: E402
from facerecon.io.images import load_image  # noqa: E402
from facerecon.stages.detect import DetectOptions, analyze_image, run_detect  # noqa: E402


def make_photos(folder: Path, width: int, height: int, count: int, seed: int = 0) -> list[Path]:
    """``count`` JPEG photos of the astronaut on varying backgrounds."""
    rng = np.random.default_rng(seed)
    source = cv2.cvtColor(cv2.imread(str(REPO / "examples" / "astronaut.png")), cv2.COLOR_BGR2RGB)
    paths = []
    for i in range(count):
        tint = rng.uniform(60, 200, size=3)
        background = np.clip(tint + rng.normal(0, 12, size=(height, width, 3)), 0, 255).astype(np.uint8)
        # astronaut face is ~0.2 of the 512 source; aim for a face of ~height/4
        side = int(min(height, width) * rng.uniform(1.0, 1.2))
        side = min(side, height, width)
        portrait = cv2.resize(source, (side, side), interpolation=cv2.INTER_AREA)
        x = int(rng.integers(0, width - side + 1))
        y = int(rng.integers(0, height - side + 1))
        background[y:y + side, x:x + side] = portrait
        path = folder / f"photo_{width}x{height}_{i:03d}.jpg"
        cv2.imwrite(str(path), cv2.cvtColor(background, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, 90])
        paths.append(path)
    return paths


def bench_pipeline(paths: list[Path], analyzer, crop_size: int = 224) -> dict:
    phases = {"load": 0.0, "detect+mesh": 0.0, "crop": 0.0, "skin": 0.0, "masks": 0.0}
    faces = 0
    started = time.perf_counter()
    for path in paths:
        t0 = time.perf_counter()
        image = load_image(path)
        t1 = time.perf_counter()
        found = analyzer.analyze(image.rgb)
        t2 = time.perf_counter()
        phases["load"] += t1 - t0
        phases["detect+mesh"] += t2 - t1
        for face in found:
            t3 = time.perf_counter()
            m = alignment_matrix(face.points5, crop_size)
            crop = warp_crop(image.rgb, m, crop_size)
            lm = transform_points(face.landmarks478, m)
            t4 = time.perf_counter()
            skin_attention_image(crop)
            t5 = time.perf_counter()
            masks = region_masks(lm, crop_size)
            masks["valid"] = valid_mask(m, (image.width, image.height), crop_size)
            t6 = time.perf_counter()
            phases["crop"] += t4 - t3
            phases["skin"] += t5 - t4
            phases["masks"] += t6 - t5
        faces += len(found)
    total = time.perf_counter() - started
    return {"seconds": total, "faces": faces, "phases": {k: 1000 * v / len(paths) for k, v in phases.items()}}


def bench_end_to_end(folder: Path, analyzer) -> dict:
    with tempfile.TemporaryDirectory() as out_dir:
        out = Path(out_dir) / "det.h5"
        started = time.perf_counter()
        summary = run_detect([str(folder)], out, DetectOptions(), analyzer=analyzer)
        total = time.perf_counter() - started
        size = out.stat().st_size
    data = summary.to_dict()
    return {"seconds": total, "faces": data["faces"], "failed": data["failed"], "bytes": size}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=60, help="photos per size")
    parser.add_argument("--sizes", default="640x480,1920x1080")
    args = parser.parse_args()
    from facerecon.detection.mediapipe_backend import FaceAnalyzer

    print(f"cpu cores: {os.cpu_count()}, images per size: {args.images}")
    rows = []
    with FaceAnalyzer() as analyzer, tempfile.TemporaryDirectory() as tmp:
        for size in args.sizes.split(","):
            width, height = (int(v) for v in size.lower().split("x"))
            folder = Path(tmp) / size
            folder.mkdir()
            paths = make_photos(folder, width, height, args.images)
            analyze_image(analyzer, load_image(paths[0]).rgb)  # warm-up
            pipe = bench_pipeline(paths, analyzer)
            e2e = bench_end_to_end(folder, analyzer)
            rows.append((size, len(paths), pipe, e2e))
    print()
    print(f"{'size':>10} {'images':>6} {'faces':>5} {'pipeline img/s':>15} {'end-to-end img/s':>17} {'KB/img':>7}")
    for size, n, pipe, e2e in rows:
        print(f"{size:>10} {n:>6} {pipe['faces']:>5} {n / pipe['seconds']:>15.1f} {n / e2e['seconds']:>17.1f} "
              f"{e2e['bytes'] / 1024 / n:>7.0f}")
    print()
    print("pipeline breakdown, ms per image:")
    for size, _n, pipe, _e2e in rows:
        print(f"  {size:>10}: " + ", ".join(f"{k} {v:.1f}" for k, v in pipe["phases"].items()))


if __name__ == "__main__":
    main()
