"""SwinUNETRRecA (#25): MONAI's SwinUNETR with and without Recurrent-Attention, as a network and in the bundle."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from monai.losses import DiceCELoss
from monai.networks.nets import SwinUNETR
from monai.networks.nets.swin_unetr import WindowAttention

from mgrad_net.checkpoints import load_pretrained
from mgrad_net.data import synthetic_disks
from mgrad_net.errors import CheckpointError
from mgrad_net.peers.swin_unetr_reca import RecAWindowAttention, SwinUNETRRecA
from tests.bundle_utils import CONFIGS, assert_segmentations_in_inputs_geometry, config_files, run_bundle

# small enough for a CPU test; two blocks per stage, so the memory reaches a second block
TINY = dict(in_channels=1, out_channels=3, spatial_dims=2, feature_size=12, depths=(2, 2, 2, 2), num_heads=(1, 2, 4, 8))


def _monai(seed: int = 0, **kwargs) -> SwinUNETR:
    torch.manual_seed(seed)
    return SwinUNETR(**{**TINY, **kwargs}).eval()


def _reca(state: dict, **kwargs) -> SwinUNETRRecA:
    net = SwinUNETRRecA(**{**TINY, **kwargs}).eval()
    net.load_state_dict(state)  # strict: the same keys and shapes as MONAI's
    return net


def _out(net, x):
    with torch.no_grad():
        return net(x)


def _count(net) -> int:
    return sum(p.numel() for p in net.parameters())


X = torch.rand(2, 1, 64, 64, generator=torch.Generator().manual_seed(0))


def test_reca_false_is_monais_swinunetr():
    ref = _monai()
    torch.manual_seed(0)
    net = SwinUNETRRecA(**TINY, reca=False).eval()
    assert type(net.swinViT.layers1[0].blocks[0].attn) is WindowAttention  # nothing converted
    # the same initialisation from the same seed, the same keys and shapes, the same outputs
    own, theirs = net.state_dict(), ref.state_dict()
    assert own.keys() == theirs.keys()
    assert all(torch.equal(own[k], theirs[k]) for k in own)
    net.load_state_dict(_monai(seed=1).state_dict())
    assert torch.equal(_out(net, X), _out(_monai(seed=1), X))


@pytest.mark.parametrize("mode", ["published", "aligned"])
def test_reca_true_has_monais_parameters_and_other_outputs(mode):
    ref = _monai()
    net = _reca(ref.state_dict(), reca=True, reca_mode=mode)
    assert _count(net) == _count(ref)
    assert isinstance(net.swinViT.layers3[0].blocks[1].attn, RecAWindowAttention)
    diff = (_out(net, X) - _out(ref, X)).abs().max().item()
    assert diff > 1e-3, diff


def test_without_memory_reca_computes_what_monai_does():
    # one block per stage: no block ever receives a memory, so the rewritten forward is MONAI's
    ref = _monai(depths=(1, 1, 1, 1))
    net = _reca(ref.state_dict(), depths=(1, 1, 1, 1), reca=True)
    torch.testing.assert_close(_out(net, X), _out(ref, X), rtol=0, atol=1e-6)


def test_aligned_differs_from_published_only_where_windows_shift():
    ref = _monai()
    published, aligned = (_reca(ref.state_dict(), reca_mode=m) for m in ("published", "aligned"))
    assert (_out(published, X) - _out(aligned, X)).abs().max() > 1e-3  # window 7 on 32x32 tokens: shifted
    # a window as large as every stage (32 tokens at 64 px): no shift, so nothing to align
    ref = _monai(window_size=32)
    published, aligned = (_reca(ref.state_dict(), window_size=32, reca_mode=m) for m in ("published", "aligned"))
    torch.testing.assert_close(_out(published, X), _out(aligned, X), rtol=0, atol=0)
    assert (_out(published, X) - _out(ref, X)).abs().max() > 1e-3


def test_window_attention_adds_the_memory_to_the_queries():
    """Checked against MONAI's WindowAttention whose qkv output gets the memory on its query part."""
    torch.manual_seed(0)
    dim, heads, n, windows = 8, 2, 16, 4
    ref = WindowAttention(dim, heads, (4, 4), qkv_bias=True).eval()
    reca = RecAWindowAttention(dim, heads, (4, 4), qkv_bias=True).eval()
    reca.load_state_dict(ref.state_dict())
    x, memory = torch.randn(2 * windows, n, dim), torch.randn(2 * windows, n, dim)
    mask = torch.where(torch.rand(windows, n, n) < 0.3, -100.0, 0.0)
    ref.qkv.register_forward_hook(lambda m, i, out: torch.cat([out[..., :dim] + memory, out[..., dim:]], -1))
    out, q_hat = reca(x, mask, memory)
    torch.testing.assert_close(out, ref(x, mask), rtol=0, atol=1e-6)
    torch.testing.assert_close(q_hat, reca.qkv(x)[..., :dim] + memory)  # Q̂ₜ = Qₜ + Q̂ₜ₋₁, handed on
    out, q_hat = reca(x, None, None)  # the first block of a stage: no memory
    torch.testing.assert_close(q_hat, reca.qkv(x)[..., :dim])


def test_a_size_off_the_rule_is_an_error_naming_it():
    net = SwinUNETRRecA(**TINY)
    with pytest.raises(ValueError, match=r"multiple of 32 .*spatial shape \[48, 64\]"):
        net(torch.rand(1, 1, 48, 64))
    with pytest.raises(ValueError, match=r"expects \(batch, 1, 2 spatial sizes\), got shape \[1, 2, 64, 64\]"):
        net(torch.rand(1, 2, 64, 64))


def test_load_from_takes_a_loaded_state_dict_and_says_what_it_loaded():
    ref = _monai(seed=3)
    net = SwinUNETRRecA(**TINY, reca=False).eval()
    loaded, skipped = net.load_from(ref.state_dict())  # MONAI's SwinUNETR's state dict: every tensor fits
    assert len(loaded) == len(ref.state_dict()) and not skipped
    assert torch.equal(_out(net, X), _out(ref, X))
    encoder = {k[len("swinViT.") :]: v for k, v in ref.state_dict().items() if k.startswith("swinViT.")}
    loaded, skipped = SwinUNETRRecA(**TINY).load_from(encoder)  # the Swin encoder alone
    assert len(loaded) == len(ref.swinViT.state_dict())
    assert skipped and not any(k.startswith("swinViT.") for k in skipped)  # the decoder left as initialised
    with pytest.raises(ValueError, match="none of the given tensors"):
        SwinUNETRRecA(**TINY).load_from({"unrelated": torch.zeros(3)})


def test_local_weights_are_read_outside_the_network(tmp_path):
    ref = _monai(seed=3)
    path = tmp_path / "weights.pt"
    torch.save({"model": {f"module.{k}": v for k, v in ref.state_dict().items()}}, path)  # a DDP bundle checkpoint
    net = SwinUNETRRecA(**TINY, reca=False)
    assert load_pretrained(net, str(path)) is net and torch.equal(_out(net.eval(), X), _out(ref, X))
    assert load_pretrained(net, "") is net  # no path: as initialised
    with pytest.raises(CheckpointError, match="nothing is downloaded"):
        load_pretrained(SwinUNETRRecA(**TINY), tmp_path / "missing.pt")
    torch.save({"unrelated": torch.zeros(3)}, path)
    with pytest.raises(CheckpointError, match="none of the given tensors"):
        load_pretrained(SwinUNETRRecA(**TINY), path)


@pytest.mark.parametrize("reca", [False, True])
def test_overfits_a_few_synthetic_slices(reca):
    items = synthetic_disks(4, size=64, seed=0)
    x = torch.from_numpy(np.stack([i["image"] for i in items]))
    y = torch.from_numpy(np.stack([i["label"] for i in items]))
    torch.manual_seed(0)
    net = SwinUNETRRecA(**{**TINY, "out_channels": 2}, reca=reca)
    opt = torch.optim.AdamW(net.parameters(), lr=3e-3)
    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True)
    dice = 0.0
    for step in range(1, 151):
        net.train()
        opt.zero_grad()
        loss_fn(net(x), y).backward()
        opt.step()
        if step % 10 == 0:
            pred = _out(net.eval(), x).argmax(1, keepdim=True) == 1
            dice = 2 * (pred & (y == 1)).sum().item() / (pred.sum().item() + (y == 1).sum().item())
            if dice > 0.9:
                break
    assert dice > 0.9, f"foreground Dice {dice:.3f} after {step} steps"


# ---------------------------------------------------------------- the bundle overrides

ROI = ["--roi_size", "[64,64]"]


@pytest.mark.integration
@pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated:DeprecationWarning")
@pytest.mark.parametrize("name, reca", [("swinunetr", False), ("swinunetr_reca", True)])
def test_override_trains_infers_in_the_inputs_geometry_and_exports(tmp_path, name, reca):
    """One epoch on the embedded synthetic data, inference on its test cases, TorchScript export
    (traced, as MONAI's ckpt_export does; MONAI's SwinUNETR does not script in 2D)."""
    config, ckpt_dir = f"comparison/{name}", tmp_path / "models" / name
    run_bundle("training", ["train", config], tmp_path, *ROI, "--max_epochs", "1", "--train#slices_per_volume", "2",
               "--ckpt_dir", str(ckpt_dir), "--output_dir", str(tmp_path / "eval" / name), tiny=False)  # fmt: skip
    weights = ckpt_dir / "model.pt"
    assert weights.is_file() and not (tmp_path / "models" / "model.pt").exists()  # its own folder
    net = SwinUNETRRecA(1, 4, feature_size=12, depths=(2, 2, 6, 2), num_heads=(1, 2, 4, 8), reca=reca).eval()
    net.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
    assert _count(net) == 1_695_806  # the preset the model card states

    run_bundle("inference", ["inference", config], tmp_path, *ROI, "--ckpt_dir", str(ckpt_dir),
               "--output_dir", str(tmp_path / "segs"), tiny=False)  # fmt: skip
    assert_segmentations_in_inputs_geometry(tmp_path, tmp_path / "segs")

    ts = tmp_path / "model.ts"
    cmd = [sys.executable, "-m", "monai.bundle", "ckpt_export", "network_def", "--filepath", str(ts),
           "--ckpt_file", str(weights), "--meta_file", str(CONFIGS / "metadata.json"),
           "--config_file", json.dumps(config_files("inference", config)),
           "--bundle_root", str(tmp_path), "--input_shape", "[1, 1, 64, 64]", "--use_trace", "True"]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-4000:]
    traced = torch.jit.load(str(ts), map_location="cpu")
    x = torch.rand(3, 1, 64, 64, generator=torch.Generator().manual_seed(1))  # another batch size
    torch.testing.assert_close(_out(traced, x), _out(net, x), rtol=0, atol=1e-4)
