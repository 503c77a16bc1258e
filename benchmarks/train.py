"""R-Net training throughput (run by hand; prints numbers).

    PYTHONPATH=. python benchmarks/train.py --face-model ict [--device cuda] [--batch 256]
        [--amp bf16] [--channels-last] [--views 3]

Images/s of full training steps as ``facerecon train`` runs them (``Trainer.training_loss``:
network forward, rendering at ``--render-size``, all paper-000 loss terms, with ``--views N``
also the paper-001 multi-view terms over groups of N views of one face; backward, Adam) on
synthetic crops with their true landmarks. Prints the mean over ``--steps`` steps after a warm-up
and the best single step (less sensitive to other load on a shared machine).
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from facerecon.facemodel.model import load_face_model
from facerecon.facemodel.resolve import resolve_face_model_path
from facerecon.facemodel.tensors import FaceModelTensors
from facerecon.fitting.optimize import FaceTargets
from facerecon.synthetic import random_parameters, render_faces, textured_backgrounds
from facerecon.training.config import parse_config
from facerecon.training.trainer import Trainer


def synthetic_batch(tensors: FaceModelTensors, batch: int, views: int, size: int) -> FaceTargets:
    """Crops on the fitting camera; consecutive groups of ``views`` share identity and albedo."""
    generator = torch.Generator().manual_seed(0)
    params = random_parameters(tensors, batch, generator)
    if views > 1:
        first = torch.arange(batch) // views * views
        params["identity"] = params["identity"][first]
        params["albedo"] = params["albedo"][first]
    rendered = render_faces(tensors, params, size, textured_backgrounds(batch, size, generator))
    dense = rendered.dense if rendered.dense is not None else torch.zeros(batch, 468, 2)
    return FaceTargets(rendered.images, rendered.landmarks68, dense, torch.ones(batch, size, size))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--face-model", default=None)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--architecture", default="resnet50")
    parser.add_argument("--batch", type=int, default=8, help="images per step")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--size", type=int, default=224, help="crop size")
    parser.add_argument("--render-size", type=int, default=112)
    parser.add_argument("--amp", choices=["off", "bf16", "fp16"], default="off", help="autocast of the network")
    parser.add_argument("--channels-last", action="store_true", help="channels_last network and input")
    parser.add_argument("--views", type=int, default=0,
                        help="multi-view terms over groups of this many views (0: paper 000 terms only)")
    args = parser.parse_args()
    if args.views == 1 or (args.views and args.batch % args.views):
        parser.error("--views must be 0 or at least 2 and divide --batch")
    device = torch.device(args.device)
    model_path = resolve_face_model_path(args.face_model)
    model = load_face_model(model_path)
    grouping = f'group_by = "folder"\nviews_per_identity = {args.views}' if args.views else ""
    config = parse_config("\n".join([
        "[data]", 'images = ["unused"]', grouping,
        "[model]", f"face_model = {json.dumps(str(model_path))}",
        "[network]", f'architecture = "{args.architecture}"',
        "[loss]", f"render_size = {args.render_size}",
        "[optim]", f"batch_size = {args.batch}", f'amp = "{args.amp}"',
        f'channels_last = "{"on" if args.channels_last else "off"}"']))
    trainer = Trainer(config, device)
    batch = synthetic_batch(FaceModelTensors(model), args.batch, max(args.views, 1), args.size).to(device)

    def step():
        loss, _ = trainer.training_loss(batch)
        trainer.backward(loss)

    step()  # warm-up
    times = []
    for _ in range(args.steps):
        if device.type == "cuda":
            torch.cuda.synchronize()
        started = time.perf_counter()
        step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - started)
    mean, best = sum(times) / len(times), min(times)
    terms = f"multiview(views={args.views})" if args.views else "paper000"
    print(f"device={device} threads={torch.get_num_threads()} network={args.architecture} batch={args.batch} "
          f"size={args.size} render={args.render_size} amp={args.amp} channels_last={args.channels_last} "
          f"terms={terms}: {args.batch / mean:.1f} training images/s ({mean * 1000:.0f} ms/step; best step "
          f"{args.batch / best:.1f} images/s)")

if __name__ == "__main__":
    main()
