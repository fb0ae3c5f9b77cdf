"""Optimisations that must not change what MGRAD-UNet computes: each is compared with the plain network."""

from __future__ import annotations

import copy
import gc

import pytest
import torch

from mgrad_net.inference import fold_batch_norm, optimize_for_inference
from mgrad_net.losses import MGRADLoss
from mgrad_net.networks import MGRADOutput, MGRADUNet
from mgrad_net.networks.mgrad_unet import default_channels_last
from mgrad_net.networks.decoders import upsample_levels
from tests.conftest import tiny_net


def _trained_stats(net, shape):
    """Give BatchNorm non-trivial running statistics, as a trained network has."""
    net.train()
    with torch.no_grad():
        for _ in range(3):
            net(torch.randn(*shape) * 2 + 0.5)
    return net.eval()


@pytest.mark.parametrize("spatial_dims, shape", [(2, (2, 1, 64, 48)), (3, (1, 1, 32, 32, 16))])
def test_batchnorm_folding_and_channels_last_keep_outputs(spatial_dims, shape):
    net = _trained_stats(tiny_net(spatial_dims=spatial_dims, out_channels=3), shape)
    x = torch.randn(*shape)
    with torch.inference_mode():
        ref = net(x)
        folded = fold_batch_norm(copy.deepcopy(net))
        assert not any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in folded.modules())
        torch.testing.assert_close(folded(x), ref, rtol=1e-4, atol=1e-5)
        fast = optimize_for_inference(copy.deepcopy(net))
        torch.testing.assert_close(fast(x), ref, rtol=1e-4, atol=1e-5)


def test_folding_needs_eval_mode():
    with pytest.raises(ValueError, match="eval-mode"):
        fold_batch_norm(tiny_net(out_channels=2).train())


def test_inplace_activations_keep_outputs_and_gradients():
    x, y = torch.randn(2, 1, 32, 32), torch.randint(0, 3, (2, 1, 32, 32))
    torch.manual_seed(1)
    inplace = tiny_net(out_channels=3)
    torch.manual_seed(1)
    copying = tiny_net(out_channels=3, act=("relu", {"inplace": False}))
    assert any(getattr(m, "inplace", False) for m in inplace.modules())
    assert not any(getattr(m, "inplace", False) for m in copying.modules())
    for net in (inplace, copying):
        net.train()
        MGRADLoss()(net(x), y).backward()
    for a, b in zip(inplace.parameters(), copying.parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=0, atol=0)


def test_shared_upsampling_gives_what_each_decoder_computes_alone():
    net = tiny_net(out_channels=3).eval()
    x = torch.randn(1, 1, 32, 32)
    with torch.no_grad():
        out = net.forward_all(x)
        r = out.features
        p1, m = net.msd(r)  # each decoder upsampling for itself
        p2, g = net.grad(r, m)
        torch.testing.assert_close(p1, out.p1, rtol=0, atol=0)
        torch.testing.assert_close(p2, out.p2, rtol=0, atol=0)
        assert len(upsample_levels(r, net.mode)) == 4


@pytest.mark.parametrize("mode", [True, "full", "selective"])
def test_checkpointing_keeps_outputs_and_gradients(mode):
    x, y = torch.randn(2, 1, 32, 32), torch.randint(0, 3, (2, 1, 32, 32))
    plain = tiny_net(out_channels=3, checkpointing="none").train()
    recomputed = copy.deepcopy(plain)
    recomputed.checkpointing = mode
    outs = []
    for net in (plain, recomputed):
        out = net(x)
        assert isinstance(out, MGRADOutput)
        MGRADLoss()(out, y).backward()
        outs.append(out)
    torch.testing.assert_close(outs[0].p1 + outs[0].p2, outs[1].p1 + outs[1].p2, rtol=0, atol=0)
    for a, b in zip(plain.parameters(), recomputed.parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=0, atol=0)
    # the recomputation must not update BatchNorm's running statistics a second time
    for a, b in zip(plain.buffers(), recomputed.buffers()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def _lazy_and_plain_step(net_kwargs: dict, autocast: bool = False, frozen_norms: bool = False):
    """Two feedback passes, each with its backward, of the same network without recomputation and
    with ``checkpointing="lazy"``: their (p1 + p2, losses, gradients, buffers) in that order."""
    torch.manual_seed(0)
    x, y = torch.randn(2, 1, 32, 32), torch.randint(0, 3, (2, 1, 32, 32))
    plain = tiny_net(out_channels=3, checkpointing="none", **net_kwargs).train()
    if frozen_norms:  # fine-tuning with BatchNorm in eval mode: running statistics, none updated
        for m in plain.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.eval()
    lazy = copy.deepcopy(plain)
    lazy.checkpointing = "lazy"
    results = []
    for net in (plain, lazy):
        logits, losses, feedback = [], [], None
        for _ in range(2):
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                out = net(x, feedback=feedback)
                loss = MGRADLoss()(out, y)
            loss.backward()
            feedback = net.feedback(out)
            logits.append((out.p1 + out.p2).detach())
            losses.append(loss.detach())
        results.append((logits, losses, [p.grad for p in net.parameters()], list(net.buffers())))
    return results


@pytest.mark.parametrize(
    "norm, act, frozen",
    [
        ("batch", "relu", False),
        ("batch", "relu", True),
        ("instance", "leakyrelu", False),
        (("group", {"num_groups": 2}), "prelu", False),
    ],
)
def test_lazy_recomputation_keeps_outputs_and_gradients(norm, act, frozen):
    (logits, losses, grads, buffers), (l_logits, l_losses, l_grads, l_buffers) = _lazy_and_plain_step(
        {"norm": norm, "act": act}, frozen_norms=frozen
    )
    for a, b in zip(logits + losses, l_logits + l_losses):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    # rebuilt tensors feed the same kernels, but autograd sums a tensor's gradients in another order
    for a, b in zip(grads, l_grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    for a, b in zip(buffers, l_buffers):  # running statistics updated once, in the forward pass
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_lazy_recomputation_under_autocast_rebuilds_in_the_same_precision():
    (logits, losses, grads, _), (l_logits, l_losses, l_grads, _) = _lazy_and_plain_step({}, autocast=True)
    assert l_logits[0].dtype == torch.bfloat16
    for a, b in zip(logits + losses, l_logits + l_losses):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert all(g.dtype == torch.float32 for g in l_grads)
    # bf16 rounds a rebuilt tensor's last bit differently at times: the gradients must still be far
    # closer to the plain bf16 ones than bf16 itself is to fp32
    (_, _, fp32_grads, _), _ = _lazy_and_plain_step({}, autocast=False)
    flat, l_flat, ref = (torch.cat([g.flatten() for g in gs]) for gs in (grads, l_grads, fp32_grads))
    assert (flat - l_flat).norm() < 0.25 * (flat - ref).norm()


def _nchw_and_channels_last_passes(mode: str, passes: int, dtype: torch.dtype):
    """``passes`` feedback passes, each with its backward, of the same weights held NCHW and held
    channels-last: per network, (p1 + p2 of the last pass, flattened gradients, buffers)."""
    torch.manual_seed(0)
    x, y = torch.randn(2, 1, 32, 32, dtype=dtype), torch.randint(0, 3, (2, 1, 32, 32))
    nchw = tiny_net(out_channels=3, checkpointing=mode, channels_last=False).train()
    cl = tiny_net(out_channels=3, checkpointing=mode, channels_last=True).train()
    cl.load_state_dict(nchw.state_dict())
    results = []
    for net in (nchw.to(dtype), cl.to(dtype)):
        convs = [m.weight for m in net.modules() if isinstance(m, torch.nn.Conv2d)]
        layout = torch.channels_last if net.channels_last else torch.contiguous_format
        assert all(w.is_contiguous(memory_format=layout) for w in convs)
        out, feedback = None, None
        for _ in range(passes):
            out = net(x, feedback=feedback)
            MGRADLoss()(out, y).backward()
            feedback = net.feedback(out)
        logits = out.p1 + out.p2
        assert logits.is_contiguous(memory_format=torch.channels_last) == net.channels_last
        results.append((logits, torch.cat([p.grad.flatten() for p in net.parameters()]), list(net.buffers())))
    return results


@pytest.mark.parametrize("mode", ["none", "lazy"])
def test_channels_last_keeps_outputs_and_gradients(mode):
    # float32, oneDNN's channels-last kernels: other summation orders, equal within rounding
    (logits, grads, buffers), (cl_logits, cl_grads, cl_buffers) = _nchw_and_channels_last_passes(mode, 1, torch.float32)
    torch.testing.assert_close(cl_logits, logits, rtol=1e-4, atol=5e-5)
    assert (cl_grads - grads).norm() <= 1e-4 * grads.norm()
    for a, b in zip(cl_buffers, buffers):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    # A feedback pass adds λ·(G − M) to features that ReLU left at exactly 0, so float32 rounding
    # lands values on either side of ReLU's and |·|'s kinks: the gradients of some tensors then move
    # by a few percent between any two float32 runs (NCHW's own drift from float64 is of that
    # order at other seeds). In float64 the layouts must agree through the feedback pass.
    (logits, grads, buffers), (cl_logits, cl_grads, cl_buffers) = _nchw_and_channels_last_passes(mode, 2, torch.float64)
    torch.testing.assert_close(cl_logits, logits, rtol=1e-10, atol=1e-12)
    assert (cl_grads - grads).norm() <= 1e-10 * grads.norm()
    for a, b in zip(cl_buffers, buffers):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_channels_last_in_3d_and_its_default():
    x = torch.randn(1, 1, 32, 32, 16)
    nchw = tiny_net(spatial_dims=3, out_channels=2, channels_last=False).eval()
    cl = tiny_net(spatial_dims=3, out_channels=2, channels_last=True).eval()
    cl.load_state_dict(nchw.state_dict())
    conv_weights = [m.weight for m in cl.modules() if isinstance(m, torch.nn.Conv3d)]
    assert all(w.is_contiguous(memory_format=torch.channels_last_3d) for w in conv_weights)
    with torch.inference_mode():
        torch.testing.assert_close(cl(x), nchw(x), rtol=1e-4, atol=1e-5)
    # unless told, channels-last only where it was measured faster: 2D, AVX-512 CPU, no CUDA
    assert tiny_net().channels_last == default_channels_last(2)
    assert not tiny_net(spatial_dims=3).channels_last
    with pytest.raises(ValueError, match="spatial_dims 2 or 3"):
        tiny_net(spatial_dims=1, channels_last=True)


def _held_bytes(net, x, y) -> int:
    """Bytes allocated by one training pass of ``net`` and its loss and still held when backward
    starts (what autograd keeps, and the outputs), from PyTorch's memory profiler."""
    gc.collect()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        loss = MGRADLoss()(net(x), y)
    held = sum(e.self_cpu_memory_usage for e in prof.events())
    loss.backward()
    return held


def test_auto_recomputation_is_lazy_for_large_activations_only():
    x, y = torch.randn(2, 1, 32, 32), torch.randint(0, 3, (2, 1, 32, 32))
    first_stage = 2 * 4 * 32 * 32  # batch x features[0] x spatial
    base = tiny_net(out_channels=3, features=(4, 8, 16, 32, 64)).train()
    held = {}
    for name, mode, threshold, runs in [
        ("none", "none", first_stage, "none"),
        ("selective", "selective", first_stage, "selective"),
        ("lazy", "lazy", first_stage, "lazy"),
        ("auto, large", "auto", first_stage, "lazy"),
        ("auto, small", "auto", first_stage + 1, "none"),
    ]:
        net = copy.deepcopy(base)
        net.checkpointing = mode
        net.auto_selective_elements = threshold
        assert net.recompute_mode(x) == runs
        held[name] = _held_bytes(net, x, y)
    assert held["selective"] < 0.8 * held["none"]
    assert held["lazy"] < 0.8 * held["selective"]
    assert held["auto, large"] == held["lazy"]
    assert held["auto, small"] == held["none"]
    assert MGRADUNet().checkpoint_mode == "auto"
    with torch.no_grad():
        assert base.recompute_mode(x) == "none"  # nothing to recompute without gradients


def test_unknown_checkpointing_mode_is_rejected():
    with pytest.raises(ValueError, match="checkpointing must be one of"):
        tiny_net(checkpointing="sometimes")


def test_cpu_micro_batches_keep_each_samples_output():
    net = _trained_stats(tiny_net(out_channels=3), (4, 1, 32, 32))
    x = torch.randn(5, 1, 32, 32)
    with torch.inference_mode():
        net.cpu_micro_batch = 0
        whole = net(x)
        for chunk in (1, 2, 3):
            net.cpu_micro_batch = chunk
            torch.testing.assert_close(net(x), whole, rtol=1e-5, atol=1e-6)
        scripted = torch.jit.script(net)
        torch.testing.assert_close(scripted(x), whole, rtol=1e-5, atol=1e-6)
