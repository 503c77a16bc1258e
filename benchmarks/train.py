"""R-Net training throughput with the hybrid loss (run by hand; prints numbers).

    PYTHONPATH=. python benchmarks/train.py --face-model ict [--device cuda] [--batch 256]

Images/s of full training steps (network forward, rendering at 112 px, all loss terms,
backward, Adam) on random crops with plausible landmarks.
"""

from __future__ import annotations

import argparse
import time

import torch

from facerecon.facemodel.embedding import face_oval_indices
from facerecon.facemodel.resolve import resolve_face_model
from facerecon.facemodel.tensors import FaceModelTensors
from facerecon.fitting.optimize import FaceFitter, FitSettings
from facerecon.networks.rnet import RNet
from facerecon.synthetic import random_parameters, render_faces, textured_backgrounds
from facerecon.fitting.optimize import FaceTargets


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--face-model", default=None)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--architecture", default="resnet50")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=5)
    args = parser.parse_args()
    device = torch.device(args.device)
    model = resolve_face_model(args.face_model)
    tensors = FaceModelTensors(model)
    generator = torch.Generator().manual_seed(0)
    synthetic = render_faces(tensors, random_parameters(tensors, args.batch, generator), 224,
                             textured_backgrounds(args.batch, 224, generator))
    targets = FaceTargets(synthetic.images, synthetic.landmarks68, synthetic.dense,
                          torch.ones(args.batch, 224, 224)).to(device)
    tensors = tensors.to(device)
    oval = face_oval_indices() if model.dense_triangle is not None else None
    loss = FaceFitter(tensors, model.regions, FitSettings(), oval_indices=oval)
    network = RNet(tensors, args.architecture).to(device)
    optimizer = torch.optim.Adam(network.parameters(), lr=1e-4)

    def step():
        terms = loss.losses(network(targets.crops.permute(0, 3, 1, 2)), targets, 112)
        optimizer.zero_grad(set_to_none=True)
        terms["total"].mean().backward()
        optimizer.step()

    step()  # warm-up
    if device.type == "cuda":
        torch.cuda.synchronize()
    started = time.perf_counter()
    for _ in range(args.steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - started
    print(f"device={device} network={args.architecture} batch={args.batch}: "
          f"{args.steps * args.batch / elapsed:.1f} training images/s ({elapsed / args.steps * 1000:.0f} ms/step)")


if __name__ == "__main__":
    main()
