"""R-Net inference throughput (run by hand; prints numbers).

    PYTHONPATH=. python benchmarks/infer.py --face-model ict [--device cuda] [--amp]

Images/s of the network alone (224x224 input -> coefficients) at batch 1 and a large batch.
"""

from __future__ import annotations

import argparse
import time

import torch

from facerecon.facemodel.resolve import resolve_face_model
from facerecon.facemodel.tensors import FaceModelTensors
from facerecon.networks.rnet import RNet


def measure(network, batch: int, device, amp: bool, min_time: float) -> float:
    images = torch.rand(batch, 3, 224, 224, device=device)
    if device.type == "cuda":
        images = images.contiguous(memory_format=torch.channels_last)
    with torch.inference_mode(), torch.autocast(device.type, enabled=amp, dtype=torch.bfloat16):
        network(images)  # warm-up
        if device.type == "cuda":
            torch.cuda.synchronize()
        count, started = 0, time.perf_counter()
        while time.perf_counter() - started < min_time:
            network(images)
            count += batch
        if device.type == "cuda":
            torch.cuda.synchronize()
    return count / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--face-model", default=None)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--architectures", default="resnet18,resnet50")
    parser.add_argument("--batches", default="1,32")
    parser.add_argument("--amp", action="store_true", help="bfloat16 autocast")
    parser.add_argument("--min-time", type=float, default=3.0)
    args = parser.parse_args()
    device = torch.device(args.device)
    tensors = FaceModelTensors(resolve_face_model(args.face_model))
    print(f"device={device} threads={torch.get_num_threads()} amp={args.amp}")
    print(f"{'network':>10} {'batch':>6} {'images/s':>10}")
    for arch in args.architectures.split(","):
        network = RNet(tensors, arch).to(device).eval()
        if device.type == "cuda":
            network = network.to(memory_format=torch.channels_last)
        for batch in (int(b) for b in args.batches.split(",")):
            print(f"{arch:>10} {batch:>6} {measure(network, batch, device, args.amp, args.min_time):>10.1f}")


if __name__ == "__main__":
    main()
