"""Inference-time forms of a trained network (mgrad_net.inference): each computes what the plain network does."""

from __future__ import annotations

import copy

import pytest
import torch

from mgrad_net.inference import fold_batch_norm, optimize_for_inference
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
