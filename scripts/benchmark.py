"""Speed and memory of MGRAD-UNet beside MONAI's BasicUNet, measured side by side in one run.

Each configuration runs in its own subprocess (clean peak-memory figures, no warm caches
shared between them); the parent prints one table with ratios:

1. this machine's fp32 matmul peak (GFLOP/s): the best of MKL's ``torch.mm`` and the same GEMM
   through oneDNN, with the CPU (or GPU) it ran on and whether it has native bf16;
2. eval forward at 224×224, full width, batch 1 and 8: s/slice, GFLOP/s achieved
   (``torch.utils.flop_counter``) and fraction of the peak — MGRAD-UNet as trained (``plain``),
   MGRAD-UNet as the bundle infers (``optimized``: BatchNorm folded, channels-last), and
   BasicUNet(features=(56, 112, 224, 448, 896, 56)), the yardstick matched in parameters;
3. one feedback training step (3 passes, batch 8, 9 classes, full width, MGRAD loss with the
   aggregated side loss), twice in a row: seconds of the second step (as training repeats it) and
   of the first, and peak resident memory, at the default (``"auto"``, the mode it
   ran named), without recomputation, with selective and with full checkpointing and
   without transparent huge pages, and NCHW where the network's default is channels-last, beside
   BasicUNet's 3 plain steps with DiceCE; then, for both networks, where that step's time goes:
   the time inside convolutions, the same convolution calls replayed by themselves on warm
   memory (what they cost at the least), and the time and memory traffic outside them;
   where the device has native bf16, eval and training rows under bf16 autocast too, beside
   BasicUNet's under the same autocast; on a CPU with a C++ compiler, training rows under a
   caching allocator (``scripts/caching_allocator.py``: what memory taken afresh costs), beside
   BasicUNet's under the same allocator;
4. end-to-end 3D inference through the bundle's inference config (transforms, SliceInferer,
   inversion, NIfTI writing) on a 512×512×100 CT-like volume and on an ACDC volume, with the
   full-size network (``full_size.json``) and with the config's own CPU preset: slices/s, share
   of time outside the network forward, peak memory.

    python scripts/benchmark.py                       # everything: 55 min on a 2-core AVX2 CPU, 40 on AVX-512
    python scripts/benchmark.py --parts="eval,train"  # a subset
    python scripts/benchmark.py --size=96 --batch=4   # a quick look
    python scripts/benchmark.py --parts=eval --rounds=1  # one round instead of three

Every subprocess runs with ``THP_MEM_ALLOC_ENABLE=1`` (PyTorch then backs tensors of 2 MB and more
with transparent huge pages), except the row that says otherwise.

Not part of the test suite. Results and the optimisations tried are in ``scripts/benchmark.md``.
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import fire

REPO = Path(__file__).resolve().parents[1]
BASIC_FEATURES = (56, 112, 224, 448, 896, 56)


def _peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def _device(device: str | None):
    import torch

    return torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))


def _sync(dev) -> None:
    import torch

    if dev.type == "cuda":
        torch.cuda.synchronize()


def _net(name: str, classes: int, dev, **kwargs):
    from monai.networks.nets import BasicUNet

    from mgrad_net.networks import MGRADUNet

    if name == "basicunet":
        return BasicUNet(spatial_dims=2, in_channels=1, out_channels=classes, features=BASIC_FEATURES).to(dev)
    return MGRADUNet(in_channels=1, out_channels=classes, **kwargs).to(dev)


def _seconds(fn, dev) -> float:
    """Wall time of one call of ``fn``, with the device's queued work finished on either side."""
    _sync(dev)
    t = time.perf_counter()
    fn()
    _sync(dev)
    return time.perf_counter() - t


def _best_seconds(fn, dev, repeats: int) -> float:
    """The shortest of ``repeats`` timed calls of ``fn`` (warmed up by the caller)."""
    return min(_seconds(fn, dev) for _ in range(repeats))


# ---------------------------------------------------------------- measurements (in a subprocess)


def measure_peak(device: str | None = None, n: int = 2048, repeats: int = 10) -> dict:
    """fp32 matmul GFLOP/s, the best of ``repeats``: an n×n×n product through ``torch.mm`` (MKL on a
    CPU) and the same product as a 1×1 convolution (oneDNN, which runs the network's convolutions).

    MKL takes its AVX2 code path on AMD CPUs: on an AVX-512 EPYC ``torch.mm`` reached 218 GFLOP/s
    and oneDNN's GEMM 420-430, so MKL alone would put the convolutions above 100 % of "peak".
    """
    import torch
    import torch.nn.functional as F

    dev = _device(device)

    def best_of(fn) -> float:
        fn()  # warm-up
        return 2 * n**3 / _best_seconds(fn, dev, repeats) / 1e9

    a, b = torch.randn(n, n, device=dev), torch.randn(n, n, device=dev)
    mm = best_of(lambda: torch.mm(a, b))
    # n pixels × n channels in, n channels out
    x, w = torch.randn(1, n, n, 1, device=dev), torch.randn(n, n, 1, 1, device=dev)
    conv = best_of(lambda: F.conv2d(x, w))
    return {"gflops": max(mm, conv), "mm_gflops": mm, "conv1x1_gflops": conv, **_machine(dev)}


def _machine(dev) -> dict:
    """What the device is, and which of the network's defaults and optional rows apply to it."""
    import platform

    import torch

    from mgrad_net.networks.mgrad_unet import default_channels_last

    if dev.type == "cuda":
        return {
            "machine": torch.cuda.get_device_name(dev), "fast_bf16": torch.cuda.is_bf16_supported(),
            "channels_last_default": False, "cpu": False,
        }  # fmt: skip
    name = platform.processor()
    try:
        name = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    # oneDNN's own check for native bf16 instructions (AVX512-BF16, AMX); without them bf16 is emulated
    bf16 = bool(getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: False)())
    return {
        "machine": f"{name}, {os.cpu_count()} cores, ATen {torch.backends.cpu.get_cpu_capability()}",
        "fast_bf16": bf16,
        "channels_last_default": default_channels_last(2),
        "cpu": True,
    }


def measure_eval(
    net: str, batch: int, size: int = 224, classes: int = 9, repeats: int = 2, device: str | None = None,
    amp: str | None = None, compile: bool = False, window: int = 8,
) -> dict:  # fmt: skip
    """Eval forward time per slice and FLOPs per slice of one network configuration.

    Each timed repeat covers at least ``window`` slices (batch 1: ``window`` calls), so that batch
    sizes are compared over windows of equal length: the best of a few one-slice timings would
    pick the fastest single slice on a machine whose speed swings from call to call.
    """
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from mgrad_net.inference import optimize_for_inference

    dev = _device(device)
    model = _net("basicunet" if net == "basicunet" else "mgrad", classes, dev).eval()
    x = torch.randn(batch, 1, size, size, device=dev)
    counter = FlopCounterMode(display=False)
    with counter, torch.inference_mode():
        model(x[:1])
    flops = counter.get_total_flops()
    if net == "optimized":
        optimize_for_inference(model)
        x = x.contiguous(memory_format=torch.channels_last)
    if compile:
        model = torch.compile(model)
    ctx = torch.autocast(dev.type, dtype=getattr(torch, amp)) if amp else torch.autocast(dev.type, enabled=False)
    with torch.inference_mode(), ctx:
        warm = _seconds(lambda: model(x), dev)  # warm-up: kernel selection, allocator, compilation
        calls = max(1, -(-window // batch))

        def one_window() -> None:
            for _ in range(calls):
                model(x)

        best = _best_seconds(one_window, dev, repeats)
    return {"s_per_slice": best / (calls * batch), "flops_per_slice": flops, "first_call_s": warm, "peak_rss_gb": _peak_rss_gb()}


def _train_setup(net: str, batch: int, size: int, classes: int, dev, checkpointing=None, channels_last=None):
    """The model, loss, optimizer and batch of one training step (``checkpointing`` None: the
    network's default)."""
    import torch
    from monai.losses import DiceCELoss

    from mgrad_net.losses import MGRADLoss

    kwargs = {"checkpointing": checkpointing} if net != "basicunet" and checkpointing is not None else {}
    if net != "basicunet" and channels_last is not None:
        kwargs["channels_last"] = channels_last
    model = _net(net, classes, dev, **kwargs).train()
    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True) if net == "basicunet" else MGRADLoss()
    opt = torch.optim.AdamW(model.parameters(), 1e-4, weight_decay=1e-4)
    x = torch.randn(batch, 1, size, size, device=dev)
    y = torch.randint(0, classes, (batch, 1, size, size), device=dev)
    return model, loss_fn, opt, x, y


def _train_step(model, loss_fn, opt, x, y, passes: int, amp: str | None = None) -> None:
    """MGRAD-UNet's ``passes`` feedback passes, or BasicUNet's ``passes`` plain steps, each pass
    with its own backward and optimizer step."""
    import torch

    feedback = None
    for _ in range(passes):
        opt.zero_grad(set_to_none=True)
        with torch.autocast(x.device.type, dtype=getattr(torch, amp)) if amp else torch.autocast(x.device.type, enabled=False):
            out = model(x) if feedback is None else model(x, feedback=feedback)
            loss = loss_fn(out, y)
        loss.backward()
        opt.step()
        if hasattr(model, "feedback"):
            feedback = model.feedback(out)
        del out, loss


def measure_train(
    net: str, batch: int = 8, size: int = 224, classes: int = 9, passes: int = 3, checkpointing: bool | str | None = None,
    device: str | None = None, amp: str | None = None, channels_last: bool | None = None,
    caching_allocator_gb: float | None = None, steps: int = 2,
) -> dict:  # fmt: skip
    """One training step: MGRAD-UNet's ``passes`` feedback passes with the MGRAD loss, or BasicUNet's
    ``passes`` plain steps with DiceCE, each pass with its own backward and optimizer step.

    ``steps`` such steps run one after another; ``seconds`` is the last one's time, a step as
    training repeats it, ``first_seconds`` the first one's (with what a process pays once: the
    optimizer's state, oneDNN's kernels chosen, memory the process has not held before), peak
    memory the highest over all of them.

    ``amp`` (``"bfloat16"``, ``"float16"``) runs forward and loss under autocast, as
    ``FeedbackTrainer(amp=True)`` does (no gradient scaling: bf16 needs none; the timing of fp16
    on CUDA without it is the same). ``caching_allocator_gb`` runs the step under
    ``scripts/caching_allocator.py``, holding at most that many GB of freed blocks (CPU only)."""
    if caching_allocator_gb is not None:
        import caching_allocator

        caching_allocator.enable(float(caching_allocator_gb))
    dev = _device(device)
    model, loss_fn, opt, x, y = _train_setup(net, batch, size, classes, dev, checkpointing, channels_last)
    base = _peak_rss_gb()
    times = [_seconds(lambda: _train_step(model, loss_fn, opt, x, y, passes, amp), dev) for _ in range(max(1, steps))]
    recomputed = model.recompute_mode(x) if net != "basicunet" else "none"
    return {
        "seconds": times[-1], "first_seconds": times[0], "step_seconds": times, "peak_rss_gb": _peak_rss_gb(),
        "rss_before_gb": base, "recompute_mode": recomputed,
    }  # fmt: skip


def measure_ops(
    net: str, batch: int = 8, size: int = 224, classes: int = 9, passes: int = 3, device: str | None = None, warmup: int = 1
) -> dict:  # fmt: skip
    """Where a training step's time goes: the step of :func:`measure_train` (MGRAD-UNet without
    recomputation, so with the fewest convolutions; after ``warmup`` steps unrecorded, as
    ``measure_train`` times the step after the first) with every aten operation recorded, then every
    distinct convolution call (forward, and backward for input and weight) replayed by itself on
    warm memory, best of 3.

    The replayed sum is what the step's convolutions cost at the least on this device; the rest of
    the step (normalisation, activations, the decoders' element-wise work, interpolation, losses,
    optimizer, and the page faults of memory taken afresh) is the step minus that. ``other_gb``
    counts the bytes the operations other than convolutions and views read and write.
    """
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils.flop_counter import FlopCounterMode

    dev = _device(device)
    convs = (torch.ops.aten.convolution.default, torch.ops.aten.convolution_backward.default)

    def nbytes(obj) -> int:
        if isinstance(obj, torch.Tensor):
            return obj.numel() * obj.element_size()
        return sum(nbytes(v) for v in obj) if isinstance(obj, (list, tuple)) else 0

    def describe(obj):
        # a hashable stand-in for an argument: tensors by shape, dtype and memory format
        if isinstance(obj, torch.Tensor):
            last = obj.dim() == 4 and not obj.is_contiguous() and obj.is_contiguous(memory_format=torch.channels_last)
            return ("tensor", tuple(obj.shape), obj.dtype, last)
        return tuple(describe(v) for v in obj) if isinstance(obj, (list, tuple)) else obj

    def rebuild(arg):
        if isinstance(arg, tuple) and arg[:1] == ("tensor",):
            t = torch.randn(arg[1], dtype=arg[2], device=dev)
            return t.contiguous(memory_format=torch.channels_last) if arg[3] else t
        return [rebuild(v) for v in arg] if isinstance(arg, tuple) else arg

    class Record(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.calls: dict = {}
            self.conv_s = 0.0
            self.other_bytes = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            if func in convs:
                _sync(dev)
                t = time.perf_counter()
                out = func(*args, **kwargs)
                _sync(dev)
                self.conv_s += time.perf_counter() - t
                key = (func, describe(args))
                self.calls[key] = self.calls.get(key, 0) + 1
                return out
            out = func(*args, **kwargs)
            if not func.is_view:
                self.other_bytes += nbytes(args) + nbytes(list(kwargs.values())) + nbytes(out)
            return out

    model, loss_fn, opt, x, y = _train_setup(net, batch, size, classes, dev, checkpointing="none")
    for _ in range(warmup):
        _train_step(model, loss_fn, opt, x, y, passes)
    record = Record()
    with record:
        step = _seconds(lambda: _train_step(model, loss_fn, opt, x, y, passes), dev)
    del model, opt, x, y

    alone = flops = 0.0
    for (func, described), count in record.calls.items():
        args = rebuild(described)
        with FlopCounterMode(display=False) as counter:
            func(*args)  # also the warm-up: kernel choice, the output's memory backed
        alone += _best_seconds(lambda: func(*args), dev, 3) * count
        flops += counter.get_total_flops() * count
    return {
        "seconds": step, "conv_in_step_s": record.conv_s, "conv_alone_s": alone, "conv_tflop": flops / 1e12,
        "gflops_alone": flops / alone / 1e9, "outside_s": step - record.conv_s,
        "conv_calls": sum(record.calls.values()), "distinct_conv_calls": len(record.calls), "other_gb": record.other_bytes / 1e9,
    }  # fmt: skip


def measure_infer3d(
    volume: str, size: int = 224, device: str | None = None, sw_batch_size: int = 8, network: str = "full"
) -> dict:
    """The bundle's inference config, end to end, on one synthetic CT-like or one ACDC volume.

    ``network="full"`` merges ``full_size.json`` (the paper's widths) and infers at ``size``²;
    ``"default"`` keeps what ``inference.json`` alone runs (the CPU preset, at its own ROI size).
    """
    import nibabel as nib
    import numpy as np
    import torch
    from monai.bundle import ConfigParser

    dev = _device(device)
    work = Path(tempfile.mkdtemp(prefix="mgrad_bench_"))
    configs = [str(REPO / "bundle" / "configs" / "inference.json")]
    if network == "full":
        configs.append(str(REPO / "bundle" / "configs" / "full_size.json"))
    if volume == "ct":
        rng = np.random.RandomState(0)
        hu = rng.normal(40, 200, size=(512, 512, 100)).astype(np.int16)
        image = work / "ct_volume.nii.gz"
        nib.save(nib.Nifti1Image(hu, np.diag([0.8, 0.8, 2.5, 1.0])), str(image))
        configs.append(str(REPO / "bundle" / "configs" / "synapse.json"))
    else:
        image = REPO.parent / "shared" / "data" / "acdc" / "validation" / "patient002_frame01.nii.gz"
        if not image.exists():
            return {"skipped": f"{image} not found"}
    parser = ConfigParser()
    parser.read_config(configs)
    net = parser.get_parsed_content("network_def")
    torch.save(net.state_dict(), work / "model.pt")
    parser["bundle_root"] = str(work)
    parser["ckpt_path"] = str(work / "model.pt")
    parser["device"] = f"$torch.device('{dev}')"
    if network == "full":
        parser["roi_size"] = [size, size]
    parser["inferer#sw_batch_size"] = sw_batch_size
    parser["dataset#data"] = [{"image": str(image)}]
    parser["output_dir"] = str(work / "out")
    evaluator = parser.get_parsed_content("evaluator")
    network = parser.get_parsed_content("network")
    inside = [0.0]

    def pre(*_):
        _sync(dev)
        inside.append(time.perf_counter())

    def post(*_):
        _sync(dev)
        inside[0] += time.perf_counter() - inside.pop()

    network.register_forward_pre_hook(pre)
    network.register_forward_hook(post)
    total = _seconds(evaluator.run, dev)
    slices = nib.load(str(image)).shape[-1]
    return {
        "slices": slices,
        "slices_per_s": slices / total,
        "outside_share": 1 - inside[0] / total,
        "seconds": total,
        "peak_rss_gb": _peak_rss_gb(),
    }


# ---------------------------------------------------------------- the table (parent process)


def _run(kind: str, threads: int | None, huge_pages: bool = True, **kwargs) -> dict:
    env = dict(os.environ)
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    # PyTorch reads this once, at its first allocation: it must be in the environment at start-up
    env["THP_MEM_ALLOC_ENABLE"] = "1" if huge_pages else "0"
    args = [f"--{k}={v}" for k, v in kwargs.items()]
    cmd = [sys.executable, __file__, f"measure_{kind}", *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        return {"error": proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else f"exit {proc.returncode}"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(
    parts: str | tuple = "eval,train,infer3d",
    size: int = 224,
    batch: int = 8,
    classes: int = 9,
    threads: int | None = None,
    device: str | None = None,
    json_out: str | None = None,
    rounds: int = 3,
) -> None:
    """Run the measurements, each in a subprocess, and print the table.

    Args:
        parts: comma-separated subset of eval, train, infer3d (the peak is always measured).
        size: in-plane size (divisible by 16).
        batch: the larger eval batch and the training batch.
        classes: output classes.
        threads: OMP_NUM_THREADS for the subprocesses (default: torch's choice).
        device: "cuda" or "cpu" (default: CUDA when available).
        json_out: also write every raw result to this JSON file.
        rounds: how many times each eval configuration runs (interleaved); the table gives the best.
    """
    # fire hands "eval,train" over as a tuple
    chosen = set(parts.split(",")) if isinstance(parts, str) else {str(p) for p in parts}
    dev = {"device": device} if device else {}
    results: dict[str, dict] = {"peak": _run("peak", threads, **dev)}
    facts = results["peak"]  # the machine's, from the first peak run
    peak = facts.get("gflops", float("nan"))
    peak_note = ""
    lines: list[str] = []

    if "eval" in chosen:
        # This machine's speed drifts by 10-30 % over minutes, for the network and the matmul
        # alike: every configuration (and the peak) runs once per round, the rounds interleaved,
        # and the table gives each one's best and how far its worst round fell behind it.
        # bf16 autocast only where the device has native bf16 kernels (it ran 8.7x slower emulated)
        configs = {"plain": {"net": "plain"}, "optimized": {"net": "optimized"}, "basicunet": {"net": "basicunet"}}
        if facts.get("fast_bf16", False):
            configs["optimized bf16"] = {"net": "optimized", "amp": "bfloat16"}
            configs["basicunet bf16"] = {"net": "basicunet", "amp": "bfloat16"}
        runs: dict[tuple, list] = {(name, b): [] for b in (1, batch) for name in configs}
        for rnd in range(1, rounds + 1):
            if rnd > 1:
                results[f"peak/round{rnd}"] = _run("peak", threads, **dev)
                peak = max(peak, results[f"peak/round{rnd}"].get("gflops", float("nan")))
            for (name, b), done in runs.items():
                done.append(_run("eval", threads, batch=b, window=batch, size=size, classes=classes, **configs[name], **dev))
                print(f"measured eval {name} batch {b}, round {rnd}", file=sys.stderr, flush=True)
        peak_note = f" (best of {rounds} rounds)" if rounds > 1 else ""
        lines += [
            f"Eval forward, {size}x{size}, {classes} classes, best of {rounds} round(s); bf16 rows: autocast, vs BasicUNet in bf16, % of the fp32 peak",
            "| network | batch | ms/slice | worst round | GFLOP/s | % of peak | vs BasicUNet |",
            "|---|---|---|---|---|---|---|",
        ]
        for b in (1, batch):
            timed = {name: [r for r in runs[name, b] if "s_per_slice" in r] for name in configs}
            times = {name: sorted(r["s_per_slice"] for r in timed[name]) for name in configs}
            for name in configs:
                yardstick = "basicunet bf16" if "bf16" in name else "basicunet"
                base = times[yardstick][0] if times[yardstick] else float("nan")
                results[f"eval/{name}/b{b}"] = {"rounds": runs[name, b]}
                if not times[name]:
                    lines.append(f"| {name} | {b} | error: {runs[name, b][0].get('error')} | | | | |")
                    continue
                best, worst = times[name][0], times[name][-1]
                results[f"eval/{name}/b{b}"].update(s_per_slice=best, worst_s_per_slice=worst, flops_per_slice=timed[name][0]["flops_per_slice"])
                gf = timed[name][0]["flops_per_slice"] / best / 1e9
                lines.append(
                    f"| {name} | {b} | {best * 1e3:.0f} | {worst * 1e3:.0f} | {gf:.0f} | {100 * gf / peak:.0f}% | {best / base:.2f} |"
                )
        lines.append("")

    if "train" in chosen:
        lines += [
            f"Training step, 3 passes, batch {batch}, {size}x{size}, {classes} classes; two steps in a row: seconds and ratio of the second (as training repeats it), the first beside it",
            "| network | seconds | first step (s) | peak RSS (GB) | time vs BasicUNet |",
            "|---|---|---|---|---|",
        ]
        rows = {}
        # (row, its measure_train arguments, the BasicUNet row it is compared with: same conditions)
        plain = "BasicUNet, 3 plain steps"
        variants = (
            ("MGRAD-UNet (default: auto)", {}, plain),
            ("MGRAD-UNet, no checkpointing", {"checkpointing": "none"}, plain),
            ("MGRAD-UNet, selective checkpointing", {"checkpointing": "selective"}, plain),
            ("MGRAD-UNet, full checkpointing", {"checkpointing": "full"}, plain),
            ("MGRAD-UNet, default, without huge pages", {"huge_pages": False}, plain),
            (plain, {"net": "basicunet"}, plain),
        )
        if facts.get("channels_last_default", False):
            # what the channels-last default buys where it applies
            variants += (("MGRAD-UNet, default, NCHW", {"channels_last": False}, plain),)
        if facts.get("fast_bf16", False):
            bf16 = f"{plain}, bf16 autocast"
            variants += (
                ("MGRAD-UNet, default, bf16 autocast", {"amp": "bfloat16"}, bf16),
                (bf16, {"net": "basicunet", "amp": "bfloat16"}, bf16),
            )
        if facts.get("cpu", False) and shutil.which(os.environ.get("CXX", "c++")):
            # what memory taken afresh costs: freed blocks kept and reused (native code, built here)
            cached = f"{plain}, caching allocator"
            variants += (
                ("MGRAD-UNet, default, caching allocator", {"caching_allocator_gb": "inf"}, cached),
                ("MGRAD-UNet, default, caching allocator holding <= 1 GB free", {"caching_allocator_gb": 1}, cached),
                (cached, {"net": "basicunet", "caching_allocator_gb": "inf"}, cached),
            )
        for name, kw, _ in variants:
            r = _run("train", threads, **{"net": "mgrad", **kw}, batch=batch, size=size, classes=classes, **dev)
            results[f"train/{name}"] = rows[name] = r
            print(f"measured train {name}", file=sys.stderr, flush=True)
        for name, _, yardstick in variants:
            r = rows[name]
            base = rows[yardstick].get("seconds", float("nan"))
            if "error" in r:
                lines.append(f"| {name} | error: {r['error']} | | | |")
            else:
                label = f"{name}, ran {r['recompute_mode']}" if name.startswith("MGRAD-UNet") and "default" in name else name
                lines.append(f"| {label} | {r['seconds']:.1f} | {r['first_seconds']:.1f} | {r['peak_rss_gb']:.2f} | {r['seconds'] / base:.2f} |")
        lines.append("")
        # what the time-ratio target leaves for everything but the convolutions
        ops = {name: _run("ops", threads, net=net, batch=batch, size=size, classes=classes, **dev) for name, net in (("MGRAD-UNet", "mgrad"), ("BasicUNet", "basicunet"))}
        print("measured ops", file=sys.stderr, flush=True)
        results["ops"] = ops
        lines += [
            "Where the step's time goes (no recomputation, the step after a first one; every convolution call of it, forward and backward, then replayed by itself on warm memory, best of 3)",
            "| network | step (s) | in convolutions (s) | convolutions alone (s) | GFLOP/s alone | outside convolutions (s) | their traffic (GB) |",
            "|---|---|---|---|---|---|---|",
        ]
        cols = {"seconds": ".1f", "conv_in_step_s": ".1f", "conv_alone_s": ".1f", "gflops_alone": ".0f", "outside_s": ".1f", "other_gb": ".1f"}
        for name, r in ops.items():
            cells = [f"error: {r['error']}", "", "", "", "", ""] if "error" in r else [format(r[c], f) for c, f in cols.items()]
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
        mg, bu = ops["MGRAD-UNet"], ops["BasicUNet"]
        if "error" not in mg and "error" not in bu:
            lines.append("| ratio | " + " | ".join(f"{mg[c] / bu[c]:.2f}" for c in cols) + " |")
            budget = 2.1 * bu["seconds"]
            lines += ["", (
                f"At 2.1x BasicUNet's step ({budget:.1f} s), MGRAD-UNet's convolutions alone ({mg['conv_alone_s']:.1f} s) leave"
                f" {budget - mg['conv_alone_s']:.1f} s for everything else; outside its convolutions it spent {mg['outside_s']:.1f} s"
                f" (BasicUNet {bu['outside_s']:.1f} s)."
            )]  # fmt: skip
        lines.append("")

    if "infer3d" in chosen:
        lines += ["3D inference through the bundle (random weights; full: full_size.json at the size above, default: the CPU preset at 128x128)", "| network | volume | slices | slices/s | outside forward | seconds | peak RSS (GB) |", "|---|---|---|---|---|---|---|"]
        for network, vol in (("full", "ct"), ("full", "acdc"), ("default", "ct"), ("default", "acdc")):
            r = _run("infer3d", threads, volume=vol, size=size, network=network, **dev)
            results[f"infer3d/{network}/{vol}"] = r
            print(f"measured infer3d {network} {vol}", file=sys.stderr, flush=True)
            if "slices" in r:
                lines.append(f"| {network} | {vol} | {r['slices']} | {r['slices_per_s']:.2f} | {100 * r['outside_share']:.1f}% | {r['seconds']:.1f} | {r['peak_rss_gb']:.2f} |")
            else:
                lines.append(f"| {network} | {vol} | {r} | | | | |")
    header = [
        f"machine: {facts.get('machine', '?')}, native bf16: {'yes' if facts.get('fast_bf16') else 'no'}",
        f"fp32 matmul peak: {peak:.0f} GFLOP/s{peak_note} (first round: torch.mm {facts.get('mm_gflops', float('nan')):.0f},"
        f" as a oneDNN 1x1 convolution {facts.get('conv1x1_gflops', float('nan')):.0f})",
    ]
    print("\n".join([*header, "", *lines]))
    if json_out:
        Path(json_out).write_text(json.dumps(results, indent=2))


def _measure_cli(fn):
    def run(**kwargs):
        print(json.dumps(fn(**kwargs)))

    return run


if __name__ == "__main__":
    if len(sys.argv) == 1 or sys.argv[1].startswith("-"):
        sys.argv.insert(1, "main")
    fire.Fire(
        {
            "main": main,
            "measure_peak": _measure_cli(measure_peak),
            "measure_eval": _measure_cli(measure_eval),
            "measure_train": _measure_cli(measure_train),
            "measure_ops": _measure_cli(measure_ops),
            "measure_infer3d": _measure_cli(measure_infer3d),
        }
    )
