"""Throughput benchmark of facerecon.render.MeshRenderer (run by hand, no assertions).

    PYTHONPATH=. python benchmarks/render.py                # CPU
    PYTHONPATH=. python benchmarks/render.py --device cuda  # if available
    PYTHONPATH=. python benchmarks/render.py --profile      # + per-stage timings

Renders a procedural face-like mesh (front cap of an ellipsoid, ~18k triangles,
scaled to cover ~60% of a 224x224 frame) lit by 27 SH coefficients, and reports
images/s for forward and forward+backward (backward of ``image.sum()`` w.r.t. the
vertices and the albedo) at several batch sizes. The mesh is always procedural, so the
benchmark runs anywhere (``FACERECON_FACE_MODEL`` is ignored).
"""

from __future__ import annotations

import argparse
import math
import time

import torch

from facerecon.render import MeshRenderer, euler_to_matrix, intrinsics_from_fov
from facerecon.render.camera import project_points
from facerecon.render.rasterize import fragments_from_triangle_ids, interpolate, rasterize_triangle_ids
from facerecon.render.shading import shade_lambertian, vertex_normals


def face_like_mesh(rows: int = 96, cols: int = 96) -> tuple[torch.Tensor, torch.Tensor]:
    """Front cap of an ellipsoid in the model frame (+y up, +z out of the face), mm.

    Returns vertices (rows*cols, 3) and triangles (2*(rows-1)*(cols-1), 3),
    counter-clockwise seen from +z.
    """
    lon = torch.linspace(-math.radians(80), math.radians(80), cols, dtype=torch.float64)
    lat = torch.linspace(-math.radians(75), math.radians(75), rows, dtype=torch.float64)
    la, lo = torch.meshgrid(lat, lon, indexing="ij")  # (rows, cols); row 0 = bottom
    a, b, c = 75.0, 100.0, 90.0
    x = a * torch.sin(lo) * torch.cos(la)
    y = b * torch.sin(la)
    z = c * torch.cos(lo) * torch.cos(la)
    # A nose-like bump so depth/normals vary.
    z = z + 25.0 * torch.exp(-((x / 18.0) ** 2 + (y / 30.0) ** 2))
    verts = torch.stack([x, y, z], dim=-1).reshape(-1, 3).float()
    r = torch.arange(rows - 1)
    q = torch.arange(cols - 1)
    rr, qq = torch.meshgrid(r, q, indexing="ij")
    i00 = (rr * cols + qq).reshape(-1)
    i01 = i00 + 1  # +x (right)
    i10 = i00 + cols  # +y (up)
    i11 = i10 + 1
    # Counter-clockwise seen from +z (x right, y up): 00 -> 01 -> 11 and 00 -> 11 -> 10.
    tris = torch.cat([torch.stack([i00, i01, i11], -1), torch.stack([i00, i11, i10], -1)], 0)
    return verts, tris


def make_inputs(batch: int, device: torch.device, focal_scale: float = 1.0, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    verts, tris = face_like_mesh()
    n = verts.shape[0]
    model_to_cam = torch.tensor([[1.0, 0, 0], [0, -1.0, 0], [0, 0, -1.0]])  # y up -> y down
    angles = (torch.rand(batch, 3, generator=gen) - 0.5) * torch.tensor([0.3, 0.5, 0.2])
    rot = euler_to_matrix(angles) @ model_to_cam
    t = torch.tensor([0.0, 0.0, 600.0])
    v_cam = verts[None] @ rot.transpose(1, 2) + t
    k = intrinsics_from_fov(30.0, (224, 224), batch=batch)
    k[:, 0, 0] *= focal_scale
    k[:, 1, 1] *= focal_scale
    albedo = 0.3 + 0.5 * torch.rand(batch, n, 3, generator=gen)
    sh = torch.zeros(batch, 27)
    sh[:, 0::9] = 0.8
    sh[:, 1:9] = 0.1 * torch.randn(batch, 8, generator=gen)
    return (
        v_cam.to(device),
        tris.to(device),
        k.to(device),
        albedo.to(device),
        sh.to(device),
    )


def calibrate_focal(device: torch.device, target: float = 0.6) -> float:
    """Focal multiplier so that the mesh covers ~``target`` of the frame."""
    scale = 1.0
    for _ in range(3):
        v, f, k, _, _ = make_inputs(1, device, scale)
        cov = (rasterize_triangle_ids(project_points(v, k), f, (224, 224)) >= 0).float().mean().item()
        scale *= math.sqrt(target / cov)
    return scale


def other_cpu_load(seconds: float = 1.0) -> float | None:
    """Fraction of all CPUs busy while this process sleeps (Linux /proc/stat), or None."""
    def snapshot():
        with open("/proc/stat") as fh:
            vals = [int(x) for x in fh.readline().split()[1:]]
        idle = vals[3] + (vals[4] if len(vals) > 4 else 0)
        return sum(vals), idle

    try:
        t0, i0 = snapshot()
        time.sleep(seconds)
        t1, i1 = snapshot()
    except (OSError, ValueError, IndexError):
        return None
    return 1.0 - (i1 - i0) / max(t1 - t0, 1)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def bench(fn, device, min_time: float = 2.0, min_iters: int = 5) -> tuple[float, float]:
    """(median, min) seconds per call; the median is robust to noisy shared machines."""
    fn()  # warm-up
    sync(device)
    times: list[float] = []
    t_start = time.perf_counter()
    while len(times) < min_iters or time.perf_counter() - t_start < min_time:
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    times.sort()
    return times[len(times) // 2], times[0]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--batches", default="1,8,32")
    ap.add_argument("--min-time", type=float, default=2.0, help="seconds per measurement")
    ap.add_argument("--profile", action="store_true", help="per-stage timings at the largest batch")
    args = ap.parse_args()
    device = torch.device(args.device)
    batches = [int(b) for b in args.batches.split(",")]

    scale = calibrate_focal(device)
    v, f, k, _, _ = make_inputs(1, device, scale)
    cov = (rasterize_triangle_ids(project_points(v, k), f, (224, 224)) >= 0).float().mean().item()
    print(
        f"device={device} torch={torch.__version__} threads={torch.get_num_threads()} "
        f"mesh: {v.shape[1]} vertices, {f.shape[0]} triangles, coverage {cov:.1%} of 224x224"
    )
    busy = other_cpu_load()
    if device.type == "cpu" and busy is not None and busy > 0.25:
        print(
            f"warning: other processes are using {busy:.0%} of the CPUs - timings will be slow and "
            "noisy (OpenMP threads spin while descheduled; OMP_WAIT_POLICY=PASSIVE softens this)"
        )
    renderer = MeshRenderer((224, 224), backend="torch")
    print(
        f"{'batch':>5} | {'forward img/s':>13} | {'ms/batch':>9} | {'best ms':>8} |"
        f" {'fwd+bwd img/s':>13} | {'ms/batch':>9} | {'best ms':>8}"
    )
    print("-" * 84)
    for bsz in batches:
        v, f, k, alb, sh = make_inputs(bsz, device, scale)
        v.requires_grad_(True)
        alb.requires_grad_(True)

        def fwd():
            return renderer.render(v, f, k, alb, sh).image

        def fwd_bwd():
            img = renderer.render(v, f, k, alb, sh).image
            img.sum().backward()
            v.grad = None
            alb.grad = None

        t_f, b_f = bench(fwd, device, args.min_time)
        t_b, b_b = bench(fwd_bwd, device, args.min_time)
        print(
            f"{bsz:>5} | {bsz / t_f:>13.1f} | {t_f * 1e3:>9.1f} | {b_f * 1e3:>8.1f} |"
            f" {bsz / t_b:>13.1f} | {t_b * 1e3:>9.1f} | {b_b * 1e3:>8.1f}"
        )
    print("(img/s and ms/batch from the median iteration; forward builds the autograd graph)")

    if args.profile:
        bsz = max(batches)
        v, f, k, alb, sh = make_inputs(bsz, device, scale)
        v.requires_grad_(True)
        alb.requires_grad_(True)
        stages = {}

        def timed(name, fn):
            sync(device)
            t0 = time.perf_counter()
            out = fn()
            sync(device)
            stages.setdefault(name, []).append(time.perf_counter() - t0)
            return out

        reps = 9
        for rep in range(reps + 1):
            if rep == 1:
                stages.clear()  # first repetition is a warm-up
            sv = timed("project", lambda: project_points(v, k))
            tid = timed("visibility (no grad)", lambda: rasterize_triangle_ids(sv, f, (224, 224)))
            fr = timed("barycentrics+depth", lambda: fragments_from_triangle_ids(sv, f, tid))
            nv = timed("vertex normals", lambda: vertex_normals(v, f))
            col = timed("SH shading", lambda: shade_lambertian(alb, nv, sh))
            att = timed("interpolate (6 ch)", lambda: interpolate(torch.cat([col, nv], -1), f, fr))
            timed("backward", lambda: att[..., :3].sum().backward())
            v.grad = None
            alb.grad = None
        med = {name: sorted(ts)[len(ts) // 2] for name, ts in stages.items()}
        total = sum(med.values())
        print(f"\nper-stage time at batch {bsz} (median of {reps}):")
        for name, t in med.items():
            print(f"  {name:<24} {t * 1e3:8.1f} ms  {t / total:6.1%}")


if __name__ == "__main__":
    main()
