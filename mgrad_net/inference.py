"""Inference-time forms of a trained network that compute the same function faster.

- :func:`fold_batch_norm`: each eval-mode BatchNorm that follows a convolution is folded into the
  convolution's weights and bias (y = γ·(Wx + b − μ)/σ + β = W'x + b'), one pass over memory
  fewer per layer.
- :func:`optimize_for_inference`: eval mode, BatchNorm folding and the channels-last memory
  format, which oneDNN's convolutions prefer on CPUs.

Outputs equal the original network's within float rounding (the tests bound the difference).
Training needs the unfolded network: apply these to an inference copy or an inference-only run.
"""

from __future__ import annotations

import torch
import torch.nn as nn
from monai.networks.blocks import Convolution

__all__ = ["fold_batch_norm", "optimize_for_inference"]


@torch.no_grad()
def _fold(conv: nn.modules.conv._ConvNd, bn: nn.modules.batchnorm._BatchNorm) -> None:
    scale = bn.weight / torch.sqrt(bn.running_var + bn.eps) if bn.affine else 1 / torch.sqrt(bn.running_var + bn.eps)
    shift = bn.bias - bn.running_mean * scale if bn.affine else -bn.running_mean * scale
    conv.weight.mul_(scale.reshape(-1, *([1] * (conv.weight.dim() - 1))))
    if conv.bias is None:
        conv.bias = nn.Parameter(shift.clone())
    else:
        conv.bias.copy_(conv.bias * scale + shift)


def fold_batch_norm(network: nn.Module) -> nn.Module:
    """Fold, in place, every BatchNorm that directly follows a convolution in a MONAI ``Convolution``
    block; the network must be in eval mode (running statistics). Returns ``network``."""
    if network.training:
        raise ValueError("fold_batch_norm needs an eval-mode network: BatchNorm must use its running statistics.")
    for block in network.modules():
        if not isinstance(block, Convolution) or not hasattr(block, "adn"):
            continue
        bn = getattr(block.adn, "N", None)
        if isinstance(bn, nn.modules.batchnorm._BatchNorm) and bn.track_running_stats:
            _fold(block.conv, bn)
            block.adn.N = nn.Identity()
    return network


def optimize_for_inference(network: nn.Module, fold_bn: bool = True, channels_last: bool = True) -> nn.Module:
    """Put ``network`` in eval mode, fold its BatchNorms, use channels-last weights; in place."""
    network.eval()
    if fold_bn:
        fold_batch_norm(network)
    if channels_last:
        dims = next((p.dim() for p in network.parameters() if p.dim() >= 4), 4)
        fmt = torch.channels_last_3d if dims == 5 else torch.channels_last
        network.to(memory_format=fmt)
    return network
