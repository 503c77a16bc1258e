"""R-Net inference throughput (run by hand; prints numbers).

    PYTHONPATH=. python benchmarks/infer.py --face-model ict [--device cuda] [--amp bf16]
        [--channels-last] [--batch 1,256] [--levels base,final] [--modes 500]

Images/s at each batch size, for each level:

* ``base``: R-Net as paper 000 (coefficients of the face model, light, pose);
* ``final``: R-Net with paper 004's corrective heads (``--modes`` geometry + reflectance
  coefficients; paper: 500 each).

Two columns: ``network`` (224x224 images -> coefficients) and ``meshes`` (the same, then the
level's per-vertex geometry and reflectance: the face model's shape and albedo, plus at the
final level the corrective fields delta @ Theta), the output paper 004 times at "over 250 Hz".
"""

from __future__ import annotations

import argparse
import time

import torch

from facerecon.facemodel.resolve import resolve_face_model
from facerecon.facemodel.tensors import FaceModelTensors
from facerecon.networks.rnet import RNet

AMP_DTYPES = {"off": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def decode(tensors: FaceModelTensors, network: RNet, out: dict[str, torch.Tensor]) -> torch.Tensor:
    """The level's per-vertex geometry and reflectance (B, N, 3) each, summed into one tensor."""
    with torch.autocast(out["identity"].device.type, enabled=False):
        geometry = tensors.shape(out["identity"].float(), out["expression"].float())
        reflectance = tensors.albedo(out["albedo"].float())
        if network.correctives is not None:
            fg, fr = network.correctives.fields(out)
            geometry, reflectance = geometry + fg, reflectance + fr
    return geometry + reflectance


def measure(network, tensors, batch: int, device, amp: str, channels_last: bool, min_time: float,
            meshes: bool) -> float:
    images = torch.rand(batch, 3, 224, 224, device=device)
    if channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    dtype = AMP_DTYPES[amp]

    def run():
        out = network(images)
        if meshes:
            decode(tensors, network, out)

    with torch.inference_mode(), torch.autocast(device.type, enabled=dtype is not None,
                                                dtype=dtype or torch.bfloat16):
        run()  # warm-up
        if device.type == "cuda":
            torch.cuda.synchronize()
        count, started = 0, time.perf_counter()
        while time.perf_counter() - started < min_time:
            run()
            count += batch
        if device.type == "cuda":
            torch.cuda.synchronize()
    return count / (time.perf_counter() - started)


def build(tensors: FaceModelTensors, support, arch: str, level: str, modes: int, device) -> RNet:
    """R-Net of ``level``; at the final level with ``modes`` corrective modes on ``support`` (S,) vertices."""
    correctives = None
    if level == "final":
        correctives = {"geometry_modes": modes, "reflectance_modes": modes,
                       "support": torch.as_tensor(support, dtype=torch.int64)}
    network = RNet(tensors, arch, correctives=correctives)
    if network.correctives is not None:
        network.correctives.initialise(tensors.mean_shape)
        torch.nn.init.normal_(network.correctives.geometry_head.weight, std=1e-3)  # non-zero outputs
    return network.to(device).eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--face-model", default=None)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--architectures", default="resnet18,resnet50")
    parser.add_argument("--batch", "--batches", dest="batch", default="1,256", help="comma-separated batch sizes")
    parser.add_argument("--levels", default="base,final", help="base and/or final (paper 004's corrective heads)")
    parser.add_argument("--modes", type=int, default=500, help="corrective modes per field at the final level")
    parser.add_argument("--amp", choices=sorted(AMP_DTYPES), default="off", help="autocast dtype")
    parser.add_argument("--channels-last", action="store_true", help="channels_last network and input")
    parser.add_argument("--min-time", type=float, default=3.0)
    args = parser.parse_args()
    device = torch.device(args.device)
    model = resolve_face_model(args.face_model)
    tensors = FaceModelTensors(model).to(device)
    print(f"device={device} threads={torch.get_num_threads()} amp={args.amp} channels_last={args.channels_last} "
          f"vertices={model.n_vertices} corrective_modes={args.modes}+{args.modes}")
    print(f"{'network':>10} {'level':>6} {'batch':>6} {'network/s':>10} {'meshes/s':>10}")
    for arch in args.architectures.split(","):
        for level in args.levels.split(","):
            network = build(tensors, model.regions["photometric"], arch, level, args.modes, device)
            if args.channels_last:
                network = network.to(memory_format=torch.channels_last)
            for batch in (int(b) for b in args.batch.split(",")):
                rates = [measure(network, tensors, batch, device, args.amp, args.channels_last, args.min_time, m)
                         for m in (False, True)]
                print(f"{arch:>10} {level:>6} {batch:>6} {rates[0]:>10.1f} {rates[1]:>10.1f}", flush=True)


if __name__ == "__main__":
    main()
