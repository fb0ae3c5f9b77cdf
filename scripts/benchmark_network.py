"""Size and speed of MGRAD-UNet beside MONAI's BasicUNet at a matched parameter count.

Prints parameters, FLOPs per slice (``torch.utils.flop_counter``) and eval-mode forward time per
slice at batch 1 and 8, measured in this one run, with the ratio MGRAD-UNet / BasicUNet.

    python scripts/benchmark_network.py                 # full width, 224×224, 9 classes
    python scripts/benchmark_network.py --size=96 --repeats=1

Not part of the test suite: a full-width forward at batch 8 takes seconds on a CPU.
"""

from __future__ import annotations

import time

import fire
import torch
from monai.networks.nets import BasicUNet
from torch.utils.flop_counter import FlopCounterMode

from mgrad_net.networks import MGRADUNet


def _flops_per_slice(net: torch.nn.Module, x: torch.Tensor) -> float:
    counter = FlopCounterMode(display=False)
    with counter, torch.inference_mode():
        net(x)
    return counter.get_total_flops() / x.shape[0]


def _seconds_per_slice(net: torch.nn.Module, x: torch.Tensor, repeats: int) -> float:
    with torch.inference_mode():
        net(x)  # warm-up: allocator and kernel selection
        best = float("inf")
        for _ in range(repeats):
            start = time.perf_counter()
            net(x)
            best = min(best, time.perf_counter() - start)
    return best / x.shape[0]


def main(
    size: int = 224,
    in_channels: int = 1,
    out_channels: int = 9,
    batches: tuple = (1, 8),
    repeats: int = 2,
    threads: int | None = None,
    device: str | None = None,
) -> None:
    """Measure and print the table.

    Args:
        size: in-plane size of the square slices (divisible by 16).
        in_channels: input channels.
        out_channels: classes.
        batches: batch sizes to time.
        repeats: timed forwards per configuration (the fastest counts).
        threads: torch CPU threads (default: torch's choice).
        device: "cuda" or "cpu" (default: CUDA when available).
    """
    if threads:
        torch.set_num_threads(int(threads))
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    nets = {
        "MGRAD-UNet": MGRADUNet(in_channels=in_channels, out_channels=out_channels),
        "BasicUNet (matched)": BasicUNet(
            spatial_dims=2, in_channels=in_channels, out_channels=out_channels, features=(56, 112, 224, 448, 896, 56)
        ),
    }
    rows: dict[str, list[float]] = {}
    for name, net in nets.items():
        net = net.to(dev).eval()
        x1 = torch.randn(1, in_channels, size, size, device=dev)
        col = [float(sum(p.numel() for p in net.parameters())), _flops_per_slice(net, x1) / 1e9]
        for b in batches:
            x = torch.randn(b, in_channels, size, size, device=dev)
            sec = _seconds_per_slice(net, x, repeats)
            col += [sec * 1e3, col[1] / sec]
        rows[name] = col
        print(f"measured {name}", flush=True)

    labels = ["parameters", f"GFLOPs per {size}x{size} slice"]
    for b in batches:
        labels += [f"eval forward, batch {b}, ms/slice", f"eval forward, batch {b}, GFLOP/s"]
    a, b_ = rows["MGRAD-UNet"], rows["BasicUNet (matched)"]
    print(f"\ndevice: {dev}, threads: {torch.get_num_threads()}, torch {torch.__version__}, classes {out_channels}")
    print(f"| | MGRAD-UNet | BasicUNet (matched) | ratio |\n|---|---|---|---|")
    for label, x, y in zip(labels, a, b_):
        fmt = ",.0f" if label == "parameters" else ",.2f"
        print(f"| {label} | {x:{fmt}} | {y:{fmt}} | {x / y:.2f} |")


if __name__ == "__main__":
    fire.Fire(main)
