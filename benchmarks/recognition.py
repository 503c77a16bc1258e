"""Speed of dlib's face-recognition ResNet in PyTorch (run by hand; asserts nothing).

Embeddings per second of random 150x150 chips at batch 1 and batch 64, for a few ways of
running the network: plain ``torch.no_grad``, ``torch.inference_mode``, and channels-last
memory layout (the batch-norm-as-affine layers are always folded into the convolutions by
the loader). Also the time to read the .dat and build the network, and the whole-photo
helper (chips cut from a 1024x768 photo, then embedded).

    OMP_NUM_THREADS=2 python benchmarks/recognition.py --threads 2
"""

from __future__ import annotations

import argparse
import contextlib
import time

import numpy as np
import torch

from facerecon.networks.dlib_resnet import load_dlib_resnet


def faces_per_second(network, batch: int, context, channels_last: bool, seconds: float, device) -> float:
    chips = torch.rand(batch, 3, 150, 150, device=device)
    if channels_last:
        chips = chips.contiguous(memory_format=torch.channels_last)
    with context():
        network(chips)  # warm-up
        done, started = 0, time.perf_counter()
        while time.perf_counter() - started < seconds or done == 0:
            network(chips)
            done += batch
        if device.type == "cuda":
            torch.cuda.synchronize()
    return done / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--seconds", type=float, default=5.0, help="time per measurement")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    started = time.perf_counter()
    network = load_dlib_resnet(device=device)
    print(f"read the .dat and built the network in {time.perf_counter() - started:.2f} s "
          f"({args.threads} threads, torch {torch.__version__}, {device})")
    variants = {
        "no_grad": (torch.no_grad, False),
        "inference_mode": (torch.inference_mode, False),
        "inference_mode + channels_last": (torch.inference_mode, True),
    }
    for name, (context, channels_last) in variants.items():
        model = network.to(memory_format=torch.channels_last) if channels_last else network
        rates = [faces_per_second(model, batch, context, channels_last, args.seconds, device) for batch in (1, 64)]
        print(f"{name:32s} batch 1: {rates[0]:7.1f} faces/s   batch 64: {rates[1]:7.1f} faces/s")
    network = network.to(memory_format=torch.contiguous_format)

    from facerecon.aggregation.recognition import photo_embeddings

    rng = np.random.default_rng(0)
    photo = rng.integers(0, 256, (768, 1024, 3), dtype=np.uint8)
    centres = rng.uniform([200, 200], [824, 568], (64, 2))
    from facerecon.networks.dlib_resnet import chip_template, CHIP_POINTS

    template = chip_template().numpy() - 75.0
    landmarks = np.zeros((64, 68, 2))
    landmarks[:, list(CHIP_POINTS)] = template[None] * 1.3 + centres[:, None]
    photo_embeddings(photo, landmarks[:2], network)
    started = time.perf_counter()
    photo_embeddings(photo, landmarks, network)
    print(f"whole-photo helper, 64 faces of one 1024x768 photo: {64 / (time.perf_counter() - started):.1f} faces/s")


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        main()
