"""R-Net inference throughput (run by hand; prints numbers).

    PYTHONPATH=. python benchmarks/infer.py --face-model ict [--device cuda] [--amp bf16]
        [--channels-last] [--batch 1,32]

Images/s of the network alone (224x224 input -> coefficients) at each batch size.
"""

from __future__ import annotations

import argparse
import time

import torch

from facerecon.facemodel.resolve import resolve_face_model
from facerecon.facemodel.tensors import FaceModelTensors
from facerecon.networks.rnet import RNet

AMP_DTYPES = {"off": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def measure(network, batch: int, device, amp: str, channels_last: bool, min_time: float) -> float:
    images = torch.rand(batch, 3, 224, 224, device=device)
    if channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    dtype = AMP_DTYPES[amp]
    with torch.inference_mode(), torch.autocast(device.type, enabled=dtype is not None,
                                                dtype=dtype or torch.bfloat16):
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
    parser.add_argument("--batch", "--batches", dest="batch", default="1,32", help="comma-separated batch sizes")
    parser.add_argument("--amp", choices=sorted(AMP_DTYPES), default="off", help="autocast dtype")
    parser.add_argument("--channels-last", action="store_true", help="channels_last network and input")
    parser.add_argument("--min-time", type=float, default=3.0)
    args = parser.parse_args()
    device = torch.device(args.device)
    tensors = FaceModelTensors(resolve_face_model(args.face_model))
    print(f"device={device} threads={torch.get_num_threads()} amp={args.amp} channels_last={args.channels_last}")
    print(f"{'network':>10} {'batch':>6} {'images/s':>10}")
    for arch in args.architectures.split(","):
        network = RNet(tensors, arch).to(device).eval()
        if args.channels_last:
            network = network.to(memory_format=torch.channels_last)
        for batch in (int(b) for b in args.batch.split(",")):
            rate = measure(network, batch, device, args.amp, args.channels_last, args.min_time)
            print(f"{arch:>10} {batch:>6} {rate:>10.1f}")


if __name__ == "__main__":
    main()
