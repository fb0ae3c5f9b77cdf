"""MGRADUNet: size, output contract, feedback (eq. 7), gradients, export, input errors, and the
switches that must not change what it computes (checkpointing, channels-last, in-place activations)."""

import copy
import gc

import pytest
import torch
from torch.nn.modules.batchnorm import _BatchNorm

from mgrad_net.losses import MGRADLoss
from mgrad_net.networks import MGRADUNet
from mgrad_net.networks.decoders import upsample_levels
from mgrad_net.outputs import MGRADOutput
from tests.conftest import tiny_net


def n_params(net: torch.nn.Module) -> int:
    return sum(p.numel() for p in net.parameters())


@pytest.mark.parametrize(
    "in_channels, out_channels, expected",
    [(1, 9, 24_096_511), (3, 9, 24_097_663), (1, 4, 24_094_236)],
)
def test_parameter_count_matches_published_model_without_dead_module(in_channels, out_channels, expected):
    assert n_params(MGRADUNet(in_channels=in_channels, out_channels=out_channels)) == expected


def test_ablations_change_exactly_the_ablated_parameters():
    full = n_params(tiny_net(out_channels=3))
    no_side = n_params(tiny_net(out_channels=3, side_outputs=False))
    assert full - no_side == 5 * (8 * 3 + 3)  # five 1×1 side convolutions
    no_rfb = tiny_net(out_channels=3, use_rfb=False)
    assert n_params(no_rfb) < full
    assert not any("branches" in name for name, _ in no_rfb.named_parameters())


@pytest.mark.parametrize(
    "spatial_dims, shape",
    [(2, (2, 1, 64, 48)), (3, (1, 1, 32, 32, 16))],
)
def test_output_shapes_train_and_eval(spatial_dims, shape):
    net = tiny_net(spatial_dims=spatial_dims, out_channels=3)
    x = torch.randn(*shape)
    out = net.train()(x)
    assert isinstance(out, MGRADOutput)
    expected = (shape[0], 3, *shape[2:])
    assert out.p1.shape == out.p2.shape == expected
    assert [s.shape for s in out.side] == [expected] * 5
    for level, (m, g, r) in enumerate(zip(out.msd, out.grad, out.features)):
        level_shape = (shape[0], 8, *(d // 2**level for d in shape[2:]))
        assert m.shape == g.shape == r.shape == level_shape
    with torch.no_grad():
        y = net.eval()(x)
    assert isinstance(y, torch.Tensor) and y.shape == expected


def test_side_outputs_ablation_returns_no_side_maps():
    out = tiny_net(out_channels=2, side_outputs=False).train()(torch.randn(1, 1, 32, 32))
    assert out.side == []


def test_eval_output_is_p1_plus_p2_of_train_result():
    net = tiny_net(out_channels=4)
    x = torch.randn(2, 1, 32, 32)
    out = net.train()(x)
    net.eval()
    for m in net.modules():  # same normalisation statistics as the train pass: only the mode differs
        if isinstance(m, _BatchNorm):
            m.train()
    y = net(x)
    torch.testing.assert_close(y, out.p1 + out.p2, rtol=0, atol=0)
    torch.testing.assert_close(out.logits, out.p1 + out.p2, rtol=0, atol=0)


def test_feedback_is_lambda_times_g_minus_m_and_shifts_features_exactly():
    net = tiny_net(out_channels=3, feedback_weight=0.5).train()
    x = torch.randn(2, 1, 32, 32)
    first = net(x)
    fb = net.feedback(first)
    assert len(fb) == 5
    for f, m, g in zip(fb, first.msd, first.grad):
        assert not f.requires_grad
        torch.testing.assert_close(f, 0.5 * (g - m).detach(), rtol=0, atol=0)
    second = net(x, feedback=fb)
    for r0, r1, f in zip(first.features, second.features, fb):
        torch.testing.assert_close(r1, r0 + f, rtol=0, atol=0)
        assert f.abs().max() > 0
    assert not torch.equal(first.p2, second.p2)


def _assert_every_parameter_has_gradient(net):
    missing = [n for n, p in net.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert missing == []
    zero = [n for n, p in net.named_parameters() if p.grad.abs().sum() == 0]
    assert zero == []


def test_every_parameter_gets_a_gradient_without_feedback():
    net = tiny_net(out_channels=3).train()
    x, y = torch.randn(2, 1, 32, 32), torch.randint(0, 3, (2, 1, 32, 32))
    MGRADLoss()(net(x), y).backward()
    _assert_every_parameter_has_gradient(net)


def test_every_parameter_gets_a_gradient_with_feedback():
    net = tiny_net(out_channels=3).train()
    x, y = torch.randn(2, 1, 32, 32), torch.randint(0, 3, (2, 1, 32, 32))
    fb = net.feedback(net(x))
    net.zero_grad()
    MGRADLoss()(net(x, feedback=fb), y).backward()
    _assert_every_parameter_has_gradient(net)


def test_inference_passes_feed_back_at_test_time():
    net = tiny_net(out_channels=3).eval()
    x = torch.randn(1, 1, 32, 32)
    with torch.no_grad():
        one = net(x)
        first = net.forward_all(x)
        manual = net.forward_all(x, net.feedback(first))
        net.inference_passes = 2
        two = net(x)
    torch.testing.assert_close(one, first.p1 + first.p2)
    torch.testing.assert_close(two, manual.p1 + manual.p2)
    assert not torch.equal(one, two)


def test_torchscript_trace_and_script_match_eager():
    net = tiny_net(out_channels=4).eval()
    x = torch.randn(2, 1, 32, 32)
    other = torch.randn(1, 1, 64, 48)  # a traced graph must generalise to another size
    with torch.no_grad():
        traced = torch.jit.trace(net, x)
        scripted = torch.jit.script(net)
        for inp in (x, other):
            ref = net(inp)
            torch.testing.assert_close(traced(inp), ref, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(scripted(inp), ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "shape, words",
    [
        ((1, 1, 30, 32), ["divisible by 16", "[1, 1, 30, 32]"]),
        ((1, 1, 32), ["4-D input", "[1, 1, 32]"]),
        ((1, 1, 32, 32, 32), ["4-D input", "[1, 1, 32, 32, 32]"]),
        ((1, 3, 32, 32), ["1 input channel", "got 3"]),
    ],
)
def test_bad_input_shapes_raise_value_error_naming_expected_and_actual(shape, words):
    net = tiny_net(out_channels=2).eval()
    with pytest.raises(ValueError) as err:
        net(torch.randn(*shape))
    for w in words:
        assert w in str(err.value)


def test_bad_input_raises_value_error_in_scripted_network_too():
    scripted = torch.jit.script(tiny_net(out_channels=2).eval())
    with pytest.raises(Exception, match="divisible by 16"):
        scripted(torch.randn(1, 1, 40, 32))


def test_bad_constructor_arguments_raise():
    with pytest.raises(ValueError, match="5 encoder widths"):
        MGRADUNet(features=(4, 8, 16, 32))
    with pytest.raises(ValueError, match="inference_passes"):
        tiny_net(inference_passes=0)


def test_monai_inferers_use_the_eval_network_unchanged():
    from monai.inferers import SliceInferer, SlidingWindowInferer

    net = tiny_net(out_channels=3).eval()
    volume = torch.randn(1, 1, 48, 40, 5)  # five axial slices, in-plane larger than the ROI
    with torch.no_grad():
        by_slice = SliceInferer(roi_size=(32, 32), spatial_dim=2, sw_batch_size=4, overlap=0.5)(volume, net)
        assert by_slice.shape == (1, 3, 48, 40, 5)
        whole = torch.randn(2, 1, 64, 64)
        windowed = SlidingWindowInferer(roi_size=(64, 64), sw_batch_size=2)(whole, net)
        torch.testing.assert_close(windowed, net(whole))


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
        assert len(upsample_levels(r)) == 4


def _two_feedback_passes(net, x, y):
    """Two passes, each with its backward, the second fed back by the first: (logits, grads, buffers)."""
    out, feedback, grads = None, None, []
    for _ in range(2):
        net.zero_grad()
        out = net(x, feedback=feedback)
        MGRADLoss()(out, y).backward()
        grads.append(torch.cat([p.grad.flatten() for p in net.parameters()]))
        feedback = net.feedback(out)
    return out.logits, grads, [b.clone() for b in net.buffers()]


def test_full_checkpointing_keeps_outputs_gradients_and_statistics():
    x, y = torch.randn(2, 1, 32, 32), torch.randint(0, 3, (2, 1, 32, 32))
    plain = tiny_net(out_channels=3).train()
    full = copy.deepcopy(plain)
    full.checkpointing = "full"
    (logits, grads, buffers), (f_logits, f_grads, f_buffers) = (_two_feedback_passes(n, x, y) for n in (plain, full))
    torch.testing.assert_close(f_logits, logits, rtol=0, atol=0)
    for a, b in zip(f_grads, grads):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    # the recomputation in backward must not update BatchNorm's running statistics a second time
    for a, b in zip(f_buffers, buffers):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def _held_bytes(net, x, y) -> int:
    """Bytes allocated by one training pass of ``net`` and its loss and still held when backward
    starts (what autograd keeps, and the outputs), from PyTorch's memory profiler."""
    gc.collect()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        loss = MGRADLoss()(net(x), y)
    held = sum(e.self_cpu_memory_usage for e in prof.events())
    loss.backward()
    return held


def test_full_checkpointing_holds_less_for_backward_and_only_in_training():
    x, y = torch.randn(2, 1, 64, 64), torch.randint(0, 3, (2, 1, 64, 64))
    plain = tiny_net(out_channels=3).train()
    full = copy.deepcopy(plain)
    full.checkpointing = "full"
    assert _held_bytes(full, x, y) < 0.6 * _held_bytes(plain, x, y)
    with torch.no_grad():  # nothing to recompute without gradients: the same pass
        torch.testing.assert_close(full.eval()(x), plain.eval()(x), rtol=0, atol=0)


def test_unknown_checkpointing_mode_is_rejected():
    with pytest.raises(ValueError, match="checkpointing must be one of"):
        tiny_net(checkpointing="selective")


def _nchw_and_channels_last_passes(mode: str, passes: int, dtype: torch.dtype):
    """``passes`` feedback passes, each with its backward, of the same weights held NCHW and held
    channels-last: per network, (logits of the last pass, flattened gradients, buffers)."""
    torch.manual_seed(0)
    x, y = torch.randn(2, 1, 32, 32, dtype=dtype), torch.randint(0, 3, (2, 1, 32, 32))
    nchw = tiny_net(out_channels=3, checkpointing=mode).train()
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
        assert out.logits.is_contiguous(memory_format=torch.channels_last) == net.channels_last
        results.append((out.logits, torch.cat([p.grad.flatten() for p in net.parameters()]), list(net.buffers())))
    return results


@pytest.mark.parametrize("mode", ["none", "full"])
def test_channels_last_keeps_outputs_and_gradients(mode):
    # float32, oneDNN's channels-last kernels: other summation orders, equal within rounding
    (logits, grads, buffers), (cl_logits, cl_grads, cl_buffers) = _nchw_and_channels_last_passes(mode, 1, torch.float32)
    torch.testing.assert_close(cl_logits, logits, rtol=1e-4, atol=5e-5)
    assert (cl_grads - grads).norm() <= 1e-4 * grads.norm()
    for a, b in zip(cl_buffers, buffers):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    # A feedback pass adds λ·(G − M) to features that ReLU left at exactly 0, so float32 rounding
    # lands values on either side of ReLU's and |·|'s kinks: in float64 the layouts must agree
    # through the feedback pass.
    (logits, grads, buffers), (cl_logits, cl_grads, cl_buffers) = _nchw_and_channels_last_passes(mode, 2, torch.float64)
    torch.testing.assert_close(cl_logits, logits, rtol=1e-10, atol=1e-12)
    assert (cl_grads - grads).norm() <= 1e-10 * grads.norm()
    for a, b in zip(cl_buffers, buffers):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_channels_last_in_3d_and_off_unless_asked():
    x = torch.randn(1, 1, 32, 32, 16)
    nchw = tiny_net(spatial_dims=3, out_channels=2).eval()
    cl = tiny_net(spatial_dims=3, out_channels=2, channels_last=True).eval()
    cl.load_state_dict(nchw.state_dict())
    conv_weights = [m.weight for m in cl.modules() if isinstance(m, torch.nn.Conv3d)]
    assert all(w.is_contiguous(memory_format=torch.channels_last_3d) for w in conv_weights)
    with torch.inference_mode():
        torch.testing.assert_close(cl(x), nchw(x), rtol=1e-4, atol=1e-5)
    # the class holds no machine policy: channels-last only when a config asks for it
    assert not tiny_net().channels_last and not nchw.channels_last
    with pytest.raises(ValueError, match="spatial_dims 2 or 3"):
        tiny_net(spatial_dims=1, channels_last=True)
