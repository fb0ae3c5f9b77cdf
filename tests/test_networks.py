"""MGRADUNet: size, output contract, feedback (eq. 7), gradients, export and input errors."""

import pytest
import torch
from torch.nn.modules.batchnorm import _BatchNorm

from mgrad_net.losses import MGRADLoss
from mgrad_net.networks import MGRADOutput, MGRADUNet, blocks, decoders
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
    net.cpu_micro_batch = 0  # whole-batch statistics below, as in the train pass
    for m in net.modules():  # same normalisation statistics as the train pass: only the mode differs
        if isinstance(m, _BatchNorm):
            m.train()
    y = net(x)
    torch.testing.assert_close(y, out.p1 + out.p2, rtol=0, atol=0)


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


_ELEMENTWISE = {
    "abs_diff": (lambda a, b, c: blocks.abs_diff(a, b), 2),
    "add": (lambda a, b, c: blocks.add([a, b, c]), 3),
    "positive_attention": (lambda a, b, c: decoders.positive_attention(a, b), 2),
    "reverse_attention": (lambda a, b, c: decoders.reverse_attention(a, b, c), 3),
    "up_add": (lambda a, b, c: decoders.up_add(a[..., ::2, ::2], b, mode="bilinear"), 2),
}


@pytest.mark.parametrize("name", sorted(_ELEMENTWISE))
@pytest.mark.parametrize("bf16_input", [None, 0, 1])
def test_elementwise_functions_in_place_without_autograd_equal_recorded_ones(name, bf16_input):
    # without autograd they overwrite their own temporaries: same values bit for bit, same dtype
    # (autocast hands them bf16 and float32 operands together), and their inputs untouched
    fn, n = _ELEMENTWISE[name]
    gen = torch.Generator().manual_seed(0)
    inputs = [torch.randn(2, 3, 8, 8, generator=gen) for _ in range(3)]
    if bf16_input is not None:
        inputs[bf16_input] = inputs[bf16_input].bfloat16()
    before = [t.clone() for t in inputs]
    recorded = fn(*[t.requires_grad_(i < n) for i, t in enumerate(inputs)])
    assert recorded.grad_fn is not None
    for mode in (torch.no_grad, torch.inference_mode):
        with mode():
            out = fn(*inputs)
        assert out.dtype == recorded.dtype
        assert torch.equal(out, recorded.detach())
    for t, b in zip(inputs, before):
        assert torch.equal(t.detach(), b)
