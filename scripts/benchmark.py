"""Size, speed and memory of MGRAD-UNet beside MONAI's BasicUNet, measured side by side in one run.

Each configuration runs in its own subprocess (clean peak-memory figures, no caches shared between
them, ``THP_MEM_ALLOC_ENABLE=0`` as the bundle's commands run unless ``--huge_pages``); the parent
prints the tables:

- the machine and its fp32 matmul peak: the best of MKL's ``torch.mm`` and the same GEMM as a
  oneDNN 1×1 convolution (MKL takes its AVX2 path on AMD CPUs, below what oneDNN reaches);
- ``eval``: parameters and FLOPs per slice (``torch.utils.flop_counter``); the eval forward at
  batch 1 and ``--batch`` (ms/slice, GFLOP/s, % of the peak, ratio to BasicUNet) of MGRAD-UNet as
  trained (``plain``), as the bundle infers (``optimized``: ``optimize_for_inference``, BatchNorm
  folded, channels-last) and of BasicUNet at a matched parameter count (``BASIC_FEATURES``);
- ``train``: the bundle's trainer, ``mgrad_net.engines.FeedbackTrainer``, on an in-memory batch at
  full width: one step (``--passes`` passes) after a warm-up step, peak resident memory and the
  ratio to BasicUNet in the same trainer (a network without ``feedback`` gets one plain step per
  pass: the same optimizer steps per batch), MGRAD-UNet with ``checkpointing`` "none" and "full";
- ``throughput``: the same trainer with the CPU preset (``PRESET``) beside BasicUNet at its
  parameter count (``PRESET_BASIC_FEATURES``): slice-passes per second, GFLOP/s (forward and
  backward of a pass) and % of the fp32 peak; NCHW, channels-last, and bf16 autocast (NCHW and
  channels-last) where the CPU has native bf16; channels-last also with the trainer's
  ``compile_loss`` (the first step pays the compiling);
- ``infer3d``: the bundle's inference config end to end (transforms, SliceInferer, inversion,
  NIfTI writing) on a 512×512×100 CT-like volume and an ACDC volume, full size and CPU preset.

    python scripts/benchmark.py                                 # everything, full size
    python scripts/benchmark.py --parts=eval,throughput         # a subset
    python scripts/benchmark.py --size=64 --batch=2 --rounds=1  # a quick look

Not part of the test suite. Results and the optimisations tried are in ``scripts/benchmark.md``.
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import fire

REPO = Path(__file__).resolve().parents[1]
BASIC_FEATURES = (56, 112, 224, 448, 896, 56)  # BasicUNet at full-size MGRAD-UNet's parameter count
PRESET = {"features": (16, 32, 64, 128, 256), "decoder_channels": 16}  # the bundle's CPU preset
PRESET_BASIC_FEATURES = (14, 28, 56, 112, 224, 14)  # 1.49 M parameters, the preset 1.51 M
PRESET_CLASSES = 4


def _peak_gb(dev=None) -> float:
    """Peak memory of this process: allocated GPU memory on CUDA, resident memory on a CPU."""
    if dev is not None and dev.type == "cuda":
        import torch

        return torch.cuda.max_memory_allocated(dev) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def _device(device: str | None):
    import torch

    return torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))


def _now(dev) -> float:
    """``time.perf_counter()`` once the device's queued work is done."""
    if dev.type == "cuda":
        import torch

        torch.cuda.synchronize()
    return time.perf_counter()


def _seconds(fn, dev) -> float:
    """Wall time of one call of ``fn``, with the device's queued work finished on either side."""
    start = _now(dev)
    fn()
    return _now(dev) - start


def _network(
    net: str, classes: int, dev, preset: bool = False, checkpointing: str = "none", channels_last: bool = False
):
    """``"basicunet"``, or else MGRAD-UNet; full size or the CPU preset."""
    import torch
    from monai.networks.nets import BasicUNet

    from mgrad_net.networks import MGRADUNet

    if net != "basicunet":
        kwargs = {**(PRESET if preset else {}), "checkpointing": checkpointing, "channels_last": channels_last}
        return MGRADUNet(in_channels=1, out_channels=classes, **kwargs).to(dev)
    features = PRESET_BASIC_FEATURES if preset else BASIC_FEATURES
    model = BasicUNet(spatial_dims=2, in_channels=1, out_channels=classes, features=features)
    # channels-last weights: oneDNN then runs every convolution channels-last, whatever the input's format
    return model.to(dev, memory_format=torch.channels_last if channels_last else torch.preserve_format)


# ---------------------------------------------------------------- measurements (in a subprocess)


def measure_peak(device: str | None = None, n: int = 2048, repeats: int = 10) -> dict:
    """fp32 GFLOP/s of an n×n×n product, best of ``repeats``, through ``torch.mm`` and as a 1×1
    convolution (n pixels × n channels), and what the machine is."""
    import platform

    import torch
    import torch.nn.functional as F

    dev = _device(device)

    def best_of(fn) -> float:
        fn()  # warm-up
        return 2 * n**3 / min(_seconds(fn, dev) for _ in range(repeats)) / 1e9

    a, b = torch.randn(n, n, device=dev), torch.randn(n, n, device=dev)
    mm = best_of(lambda: torch.mm(a, b))
    x, w = torch.randn(1, n, n, 1, device=dev), torch.randn(n, n, 1, 1, device=dev)
    conv = best_of(lambda: F.conv2d(x, w))
    if dev.type == "cuda":
        machine, bf16 = torch.cuda.get_device_name(dev), torch.cuda.is_bf16_supported()
    else:
        with open("/proc/cpuinfo") as f:
            name = next(
                (line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), platform.processor()
            )
        machine = f"{name}, {os.cpu_count()} cores, ATen {torch.backends.cpu.get_cpu_capability()}"
        # native bf16 instructions (AVX512-BF16, AMX), the configs' amp default; without them bf16 is emulated
        from mgrad_net.engines import native_mixed_precision

        bf16 = native_mixed_precision(dev)
    return {"gflops": max(mm, conv), "mm_gflops": mm, "conv1x1_gflops": conv, "machine": machine, "fast_bf16": bf16}


def measure_eval(
    net: str, batch: int, size: int = 224, classes: int = 9, repeats: int = 2, device: str | None = None,
    amp: str | None = None, window: int = 8,
) -> dict:  # fmt: skip
    """Eval forward time and FLOPs per slice, and parameters, of ``plain``, ``optimized`` or
    ``basicunet``. Each timed repeat covers at least ``window`` slices, so that batch sizes are
    compared over windows of equal length on a machine whose speed swings from call to call."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from mgrad_net.inference import optimize_for_inference

    dev = _device(device)
    model = _network(net, classes, dev).eval()
    x = torch.randn(batch, 1, size, size, device=dev)
    with FlopCounterMode(display=False) as counter, torch.inference_mode():
        model(x[:1])
    if net == "optimized":
        optimize_for_inference(model)
        x = x.contiguous(memory_format=torch.channels_last)
    calls = -(-window // batch)
    with torch.inference_mode(), torch.autocast(dev.type, dtype=getattr(torch, amp or "bfloat16"), enabled=bool(amp)):
        model(x)  # warm-up: kernel selection, allocator
        best = min(_seconds(lambda: [model(x) for _ in range(calls)], dev) for _ in range(repeats))
    return {
        "s_per_slice": best / (calls * batch), "flops_per_slice": counter.get_total_flops(),
        "params": sum(p.numel() for p in model.parameters()), "peak_gb": _peak_gb(dev),
    }  # fmt: skip


def measure_train(
    net: str, batch: int = 8, size: int = 224, classes: int = 9, passes: int = 3, steps: int = 2,
    checkpointing: str = "none", channels_last: bool = False, amp: str | None = None, preset: bool = False,
    compile_loss: bool = False, device: str | None = None,
) -> dict:  # fmt: skip
    """``steps`` iterations of ``FeedbackTrainer`` (``passes`` passes a batch; for BasicUNet, which
    the trainer gives one plain step an iteration, ``passes`` iterations make a step) over one
    in-memory batch, with the bundle's loss and optimizer; ``amp``
    (``"bfloat16"``) as the trainer's ``amp`` with that dtype; ``compile_loss`` as the trainer's.

    ``seconds`` is the median of the steps after the first (a step as training repeats it: the
    first pays once for the optimizer's state, oneDNN's kernel choice and memory not yet held);
    ``flops_per_slice_pass`` counts one pass, forward and backward, on one slice."""
    import torch
    from ignite.engine import Events
    from monai.data import DataLoader
    from torch.utils.flop_counter import FlopCounterMode

    from mgrad_net.engines import FeedbackTrainer
    from mgrad_net.losses import MGRADLoss

    dev = _device(device)
    torch.manual_seed(0)
    loss = MGRADLoss()
    image = torch.randn(batch, 1, size, size)
    label = torch.randint(0, classes, (batch, 1, size, size)).float()
    model = _network(net, classes, dev, preset, checkpointing, channels_last).train()
    # a network without feedback takes one plain step a batch whatever feedback_passes says: the
    # batch comes `passes` times in a row instead, and those iterations make one step
    per_step = 1 if callable(getattr(model, "feedback", None)) else passes
    trainer = FeedbackTrainer(
        device=dev, max_epochs=1, network=model, loss_function=loss, feedback_passes=passes,
        train_data_loader=DataLoader([{"image": i, "label": t} for i, t in zip(image, label)] * steps * per_step,
                                     batch_size=batch),
        optimizer=torch.optim.AdamW(model.parameters(), 1e-4, weight_decay=1e-4),
        amp=bool(amp), amp_kwargs={"dtype": getattr(torch, amp)} if amp else None, compile_loss=compile_loss,
    )  # fmt: skip
    times: list[float] = []  # each step's seconds; while a step runs, minus its start
    trainer.add_event_handler(Events.ITERATION_STARTED, lambda _: times.append(-_now(dev)))
    trainer.add_event_handler(Events.ITERATION_COMPLETED, lambda _: times.append(times.pop() + _now(dev)))
    trainer.run()
    times = [sum(times[i : i + per_step]) for i in range(0, len(times), per_step)]
    rss = _peak_gb(dev)
    with FlopCounterMode(display=False) as counter:  # a copy without checkpointing: no recomputation counted
        loss(_network(net, classes, dev, preset)(image[:1].to(dev)), label[:1].to(dev)).backward()
    seconds = statistics.median(times[1:]) if len(times) > 1 else times[0]
    flops = counter.get_total_flops()
    return {
        "seconds": seconds, "first_seconds": times[0], "step_seconds": times, "peak_gb": rss,
        "slice_passes_per_s": batch * passes / seconds, "flops_per_slice_pass": flops,
        "gflops": flops * batch * passes / seconds / 1e9,
    }  # fmt: skip


def measure_infer3d(
    volume: str, size: int = 224, device: str | None = None, sw_batch_size: int = 8, network: str = "full"
) -> dict:
    """The bundle's inference config, end to end, on a synthetic CT-like (``"ct"``) or an ACDC
    volume; ``network="full"`` merges ``full_size.json`` and infers at ``size``², ``"default"``
    runs what ``inference.json`` alone runs (the CPU preset at its own ROI size)."""
    import nibabel as nib
    import numpy as np
    import torch
    from monai.bundle import ConfigParser

    dev = _device(device)
    configs = [str(REPO / "bundle" / "configs" / "inference.json")]
    if network == "full":
        configs.append(str(REPO / "bundle" / "configs" / "full_size.json"))
    image = REPO.parent / "shared" / "data" / "acdc" / "validation" / "patient002_frame01.nii.gz"
    if volume != "ct" and not image.exists():
        return {"skipped": f"{image} not found"}
    work = Path(tempfile.mkdtemp(prefix="mgrad_bench_"))
    if volume == "ct":
        hu = np.random.RandomState(0).normal(40, 200, size=(512, 512, 100)).astype(np.int16)
        image = work / "ct_volume.nii.gz"
        nib.save(nib.Nifti1Image(hu, np.diag([0.8, 0.8, 2.5, 1.0])), str(image))
        configs.append(str(REPO / "experiments" / "synapse" / "override.json"))
    parser = ConfigParser()
    parser.read_config(configs)
    torch.save(parser.get_parsed_content("network_def").state_dict(), work / "model.pt")
    parser["bundle_root"], parser["ckpt_path"], parser["output_dir"] = (
        str(work),
        str(work / "model.pt"),
        str(work / "out"),
    )
    parser["device"] = f"$torch.device('{dev}')"
    if network == "full":
        parser["roi_size"] = [size, size]
    parser["inferer#sw_batch_size"] = sw_batch_size
    parser["dataset#data"] = [{"image": str(image)}]
    evaluator = parser.get_parsed_content("evaluator")
    model = parser.get_parsed_content("network")
    inside = []  # seconds of each forward call; while one runs, minus its start
    model.register_forward_pre_hook(lambda *_: inside.append(-_now(dev)))
    model.register_forward_hook(lambda *_: inside.append(inside.pop() + _now(dev)))
    total = _seconds(evaluator.run, dev)
    slices = nib.load(str(image)).shape[-1]
    shutil.rmtree(work, ignore_errors=True)
    return {
        "slices": slices, "slices_per_s": slices / total, "outside_share": 1 - sum(inside) / total,
        "seconds": total, "peak_gb": _peak_gb(dev),
    }  # fmt: skip


# ---------------------------------------------------------------- the tables (parent process)


def _run(kind: str, env: dict, **kwargs) -> dict:
    """``measure_<kind>(**kwargs)`` in a fresh subprocess: its result, or ``{"error": ...}``."""
    cmd = [sys.executable, __file__, f"measure_{kind}", *(f"--{k}={v}" for k, v in kwargs.items())]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        return {"error": proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else f"exit {proc.returncode}"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _rounds(
    kind: str, configs: dict[str, dict], rounds: int, env: dict, peaks: list, key: str, **dev
) -> dict[str, dict]:
    """Each configuration once per round, the rounds interleaved (the machine's speed drifts by
    10-30 % over minutes) and the peak measured again in each; per configuration the round with
    the smallest ``key``, with ``worst`` (the largest) beside it and every round under ``rounds``."""
    runs: dict[str, list] = {name: [] for name in configs}
    for rnd in range(rounds):
        peaks.append(_run("peak", env, **dev))
        for name, kw in configs.items():
            runs[name].append(_run(kind, env, **kw, **dev))
            print(f"measured {kind} {name}, round {rnd + 1}", file=sys.stderr, flush=True)
    best = {}
    for name, done in runs.items():
        ok = sorted((r for r in done if key in r), key=lambda r: r[key])
        best[name] = {**ok[0], "worst": ok[-1][key], "rounds": done} if ok else done[0]
    return best


def _table(title: str, head: list[str], rows: list[list]) -> list[str]:
    """A Markdown table under its title, and an empty line."""
    return [
        title,
        *("| " + " | ".join(str(c) for c in cells) + " |" for cells in [head, ["---"] * len(head), *rows]),
        "",
    ]


def main(
    parts: str | tuple = "eval,train,throughput,infer3d", size: int = 224, batch: int = 8, classes: int = 9,
    passes: int = 3, preset_size: int | None = None, preset_batch: int = 12, rounds: int = 3,
    threads: int | None = None, device: str | None = None, huge_pages: bool = False, json_out: str | None = None,
) -> None:  # fmt: skip
    """Run the measurements, each in a subprocess, and print the tables.

    Args:
        parts: comma-separated subset of eval, train, throughput, infer3d (the peak is always measured).
        size: in-plane size of eval, train and the full-size 3D rows (divisible by 16).
        batch: the larger eval batch and the training batch.
        classes: output classes of eval and train (the preset has 4).
        passes: feedback passes per batch, T (BasicUNet: plain steps per batch).
        preset_size: in-plane size of the throughput part (default 128, or ``size`` if smaller).
        preset_batch: batch of the throughput part.
        rounds: rounds of the eval and throughput configurations (interleaved; the best counts).
        threads: OMP_NUM_THREADS for the subprocesses (default: torch's choice).
        device: "cuda" or "cpu" (default: CUDA when available).
        huge_pages: ``THP_MEM_ALLOC_ENABLE`` of the subprocesses (PyTorch reads it at start-up).
        json_out: also write every raw result to this JSON file.
    """
    chosen = set(parts.split(",")) if isinstance(parts, str) else {str(p) for p in parts}  # fire: "a,b" is a tuple
    env = {**os.environ, "THP_MEM_ALLOC_ENABLE": "1" if huge_pages else "0"}
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    dev = {"device": device} if device else {}
    peaks = [_run("peak", env, **dev)]
    facts = peaks[0]
    bf16 = bool(facts.get("fast_bf16"))  # bf16 rows only where native: emulated, it ran 8.7x slower
    results: dict = {"peaks": peaks}
    lines: list[str] = []

    def peak() -> float:
        return max((p.get("gflops", float("nan")) for p in peaks), default=float("nan"))

    if "eval" in chosen:
        nets = {"plain": {}, "optimized": {}, "basicunet": {}}
        if bf16:
            nets.update({"optimized bf16": {"amp": "bfloat16"}, "basicunet bf16": {"amp": "bfloat16"}})
        configs = {
            (n, b): {"net": n.split()[0], "batch": b, "window": batch, "size": size, "classes": classes, **kw}
            for b in dict.fromkeys((1, batch)) for n, kw in nets.items()
        }  # fmt: skip
        res = _rounds(
            "eval", {f"{n}/b{b}": kw for (n, b), kw in configs.items()}, rounds, env, peaks, "s_per_slice", **dev
        )
        results["eval"] = res
        mg, bu = res["plain/b1"], res["basicunet/b1"]
        if "params" in mg and "params" in bu:
            cells = [("parameters", "params", 1, ",.0f"), ("GFLOPs per slice", "flops_per_slice", 1e9, ".1f")]
            lines += _table(
                f"Size, {size}x{size} slices, {classes} classes", ["", "MGRAD-UNet", "BasicUNet (matched)", "ratio"],
                [[label, format(mg[k] / d, f), format(bu[k] / d, f), f"{mg[k] / bu[k]:.2f}"]
                 for label, k, d, f in cells],
            )  # fmt: skip
        rows = []
        for n, b in configs:
            r, base = res[f"{n}/b{b}"], res[f"basicunet{' bf16' * ('bf16' in n)}/b{b}"].get("s_per_slice", float("nan"))
            if "s_per_slice" not in r:
                rows.append([n, b, f"error: {r.get('error')}", "", "", "", ""])
                continue
            gf = r["flops_per_slice"] / r["s_per_slice"] / 1e9
            ms = (f"{r[k] * 1e3:.0f}" for k in ("s_per_slice", "worst"))
            rows.append([n, b, *ms, f"{gf:.0f}", f"{100 * gf / peak():.0f}%", f"{r['s_per_slice'] / base:.2f}"])
        lines += _table(
            f"Eval forward, {size}x{size}, {classes} classes, best of {rounds} round(s); plain: as trained, "
            "optimized: as the bundle infers; bf16: autocast, against BasicUNet in bf16",
            ["network", "batch", "ms/slice", "worst round", "GFLOP/s", "% of peak", "vs BasicUNet"], rows,
        )  # fmt: skip

    def train_table(title: str, res: dict, yardstick) -> list[str]:
        rows = []
        for name, r in res.items():
            if "seconds" not in r:
                rows.append([name, f"error: {r.get('error')}", *[""] * 7])
                continue
            base = res[yardstick(name)].get("seconds", float("nan"))
            rows.append([name, *(f"{r[k]:.2f}" for k in ("seconds", "worst", "first_seconds", "slice_passes_per_s")),
                         f"{r['gflops']:.0f}", f"{100 * r['gflops'] / peak():.0f}%", f"{r['peak_gb']:.2f}",
                         f"{r['seconds'] / base:.2f}"])  # fmt: skip
        head = [
            "network",
            "step (s)",
            "worst round (s)",
            "first step (s)",
            "slice-passes/s",
            "GFLOP/s",
            "% of peak",
            "peak memory (GB)",
            "vs BasicUNet",
        ]
        return _table(title, head, rows)

    if "train" in chosen:
        basic = f"BasicUNet, {passes} plain steps"
        configs = {
            "MGRAD-UNet, checkpointing none": {},
            "MGRAD-UNet, checkpointing full": {"checkpointing": "full"},
            basic: {"net": "basicunet"},
        }
        common = {"net": "mgrad", "batch": batch, "size": size, "classes": classes, "passes": passes}
        res = results["train"] = _rounds(
            "train", {n: {**common, **kw} for n, kw in configs.items()}, 1, env, peaks, "seconds", **dev
        )
        lines += train_table(
            f"Training step, FeedbackTrainer, {passes} passes (BasicUNet: {passes} plain steps), batch {batch}, "
            f"{size}x{size}, {classes} classes; the step after a warm-up step",
            res, lambda _: basic,
        )  # fmt: skip

    if "throughput" in chosen:
        psize = preset_size or min(128, size)
        common = {
            "batch": preset_batch,
            "size": psize,
            "classes": PRESET_CLASSES,
            "passes": passes,
            "preset": True,
            "steps": 4,
        }
        variants = {
            "": {},
            ", channels-last": {"channels_last": True},
            ", channels-last, compiled loss": {"channels_last": True, "compile_loss": True},
            **(
                {
                    ", bf16 autocast": {"amp": "bfloat16"},
                    ", channels-last, bf16 autocast": {"channels_last": True, "amp": "bfloat16"},
                    ", channels-last, bf16 autocast, compiled loss": {
                        "channels_last": True, "amp": "bfloat16", "compile_loss": True,
                    },
                }
                if bf16
                else {}
            ),
        }  # fmt: skip
        configs = {
            f"{n}{v}": {"net": n.lower(), **common, **kw}
            for v, kw in variants.items()
            for n in ("MGRAD-UNet", "BasicUNet")
        }
        res = results["throughput"] = _rounds("train", configs, rounds, env, peaks, "seconds", **dev)
        lines += train_table(
            f"Training throughput, the CPU preset (features {PRESET['features']}, "
            f"decoder {PRESET['decoder_channels']}) beside BasicUNet {PRESET_BASIC_FEATURES}, FeedbackTrainer, "
            f"{passes} passes, batch {preset_batch}, {psize}x{psize}, {PRESET_CLASSES} classes; "
            f"median of 3 steps after a warm-up, best of {rounds} round(s); % of the fp32 peak",
            res, lambda name: name.replace("MGRAD-UNet", "BasicUNet"),
        )  # fmt: skip

    if "infer3d" in chosen:
        rows = []
        for network, vol in (("full", "ct"), ("full", "acdc"), ("default", "ct"), ("default", "acdc")):
            r = results[f"infer3d/{network}/{vol}"] = _run(
                "infer3d", env, volume=vol, size=size, network=network, **dev
            )
            print(f"measured infer3d {network} {vol}", file=sys.stderr, flush=True)
            if "slices" not in r:
                rows.append([network, vol, r.get("error") or r.get("skipped"), "", "", "", ""])
                continue
            rows.append([network, vol, r["slices"], f"{r['slices_per_s']:.2f}", f"{100 * r['outside_share']:.1f}%",
                         f"{r['seconds']:.1f}", f"{r['peak_gb']:.2f}"])  # fmt: skip
        lines += _table(
            f"3D inference through the bundle (random weights; full: full_size.json at {size}x{size}, "
            "default: the CPU preset at 128x128)",
            ["network", "volume", "slices", "slices/s", "outside forward", "seconds", "peak memory (GB)"], rows,
        )  # fmt: skip

    nan = float("nan")
    print(
        f"machine: {facts.get('machine', '?')}, native bf16: {'yes' if bf16 else 'no'}, "
        f"THP_MEM_ALLOC_ENABLE={env['THP_MEM_ALLOC_ENABLE']}"
    )
    print(f"fp32 matmul peak: {peak():.0f} GFLOP/s, best of {len(peaks)} "
          f"(first: torch.mm {facts.get('mm_gflops', nan):.0f}, "
          f"as a oneDNN 1x1 convolution {facts.get('conv1x1_gflops', nan):.0f})\n")  # fmt: skip
    print("\n".join(lines))
    if json_out:
        Path(json_out).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    if len(sys.argv) == 1 or sys.argv[1].startswith("-"):
        sys.argv.insert(1, "main")

    def printed(fn):
        return lambda **kwargs: print(json.dumps(fn(**kwargs)))

    fire.Fire(
        {
            "main": main,
            **{fn.__name__: printed(fn) for fn in (measure_peak, measure_eval, measure_train, measure_infer3d)},
        }
    )
