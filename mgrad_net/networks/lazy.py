"""Lazy recomputation: keep each convolution's output, rebuild everything else when backward asks.

PyTorch's selective checkpointing (what ``checkpointing="selective"`` uses) keeps the same
tensors, but recomputes a whole checkpointed block at the first backward step that needs any
of it, so all of that block's intermediates exist at once: at full size that made the backward
pass peak 2.8 GB above the forward's end. Here every cheap operation between two convolutions
(norm → activation, differences, sums, gates, interpolation) is its own autograd function that
saves only its inputs, and its output carries a *recipe*: how to rebuild it from kept tensors
or other recipes. While :func:`lazy_recompute` is active, autograd stores the recipe instead of
a tensor that has one (a convolution saving its input, for instance) and rebuilds the tensor
when the backward step that needs it runs: one tensor at a time, freed right after.

Three kinds of function keep backward from rebuilding more than it must: BatchNorm → ReLU
(:func:`lazy_norm_act`) keeps the batch statistics for its backward, which needs besides them
only the convolution's output and the sign of its own (rebuilt) output; linear functions
(sums, concatenation, interpolation) need none of their inputs in backward; convolutions cheap
enough to run twice (:func:`lazy_conv`, the RFB branches' 1×1 and 1×k) keep nothing at all.

Outputs, and every rebuilt tensor, equal those of a plain forward pass bit for bit; gradients
equal within float rounding, because autograd sums some of them in another order. BatchNorm's
running statistics are updated once, in the forward pass.

With glibc, the first lazy pass fixes the C allocator's mmap threshold at 4 MB for the rest of the
process, and every lazy backward pass ends by handing freed heap back to the system
(``malloc_trim``): the rebuilt tensors come and go in many sizes, and glibc's defaults let them
fragment its heap (``scripts/benchmark.md``: 3-pass step 6.39 → 4.95–5.19 GB).
"""

from __future__ import annotations

import collections
import contextlib
import ctypes
import functools
from typing import Callable, Deque, Iterator, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
from torch.nn.modules.batchnorm import _BatchNorm

__all__ = [
    "Recipe",
    "add_into",
    "frozen_norm_stats",
    "lazy_active",
    "lazy_act_of_sum",
    "lazy_cat",
    "lazy_conv",
    "lazy_module",
    "lazy_norm_act",
    "lazy_op",
    "lazy_recompute",
    "lazy_sum",
    "strip_recipes",
    "sum_terms",
]

_ATTR = "_mgrad_recipe"
# Backward usually asks for the same tensor twice in a row (as a convolution's saved input, then
# as an input of the function that produced it): the last few rebuilt tensors are kept to answer
# the second time, and let go when the backward pass ends. 8: a full-size 3-pass step (batch 8,
# 224², AVX-512 CPU) took 72.6-73.9 s and 5.27 GB against 75.4-78.8 s and 4.93 GB with 4; 12 and 16
# gave 71.8 s / 5.59 GB and 70.0 s / 5.84 GB, too near the 6 GB the default must stay under.
_RECENT: Deque[torch.Tensor] = collections.deque(maxlen=8)


class _State:
    active = False
    release_queued = False


def lazy_active() -> bool:
    """Whether the blocks should build recipes (inside :func:`lazy_recompute`)."""
    return _State.active


@contextlib.contextmanager
def _plain() -> Iterator[None]:
    # what a lazy function evaluates is computed plainly, even when it would itself be lazy-aware
    previous, _State.active = _State.active, False
    try:
        yield
    finally:
        _State.active = previous


def _release_recent() -> None:
    _RECENT.clear()
    _State.release_queued = False


@functools.lru_cache(maxsize=None)
def _glibc() -> Optional[ctypes.CDLL]:
    try:
        libc = ctypes.CDLL(None)
        libc.malloc_trim, libc.mallopt  # glibc only
        return libc
    except (AttributeError, OSError, TypeError):
        return None


_M_MMAP_THRESHOLD = -3  # glibc's malloc.h


@functools.lru_cache(maxsize=None)
def _fix_mmap_threshold() -> None:
    # glibc raises its mmap threshold (up to 32 MB) each time a mapped block is freed, so from the
    # second pass on, most rebuilt tensors come from the heap, where blocks of changing sizes
    # fragment it: a 3-pass step peaked 0.7-1.1 GB above its first pass. A fixed threshold maps
    # every block of 4 MB or more and unmaps it when freed: 5.19 GB instead of 5.81 GB with huge
    # pages (no slower), 5.19 instead of 6.84 GB without them (slower: each block is faulted in
    # again). Process-wide and for good, as glibc offers no way back to the dynamic threshold.
    libc = _glibc()
    if libc is not None:
        libc.mallopt(_M_MMAP_THRESHOLD, 4 * 2**20)


def _end_of_backward() -> None:
    _release_recent()
    # what the pass freed below the mmap threshold stays in glibc's heap; hand it back (after a
    # full-size pass 3.0-3.3 GB resident without, 1.17 GB with; 3-pass peak 6.39 -> 5.81 GB)
    libc = _glibc()
    if libc is not None:
        libc.malloc_trim(0)


class frozen_norm_stats:
    """Context in which the normalisation layers of ``module`` normalise as in training but leave
    their running statistics as they were: a recomputation must not count a batch twice."""

    def __init__(self, module: nn.Module) -> None:
        self.norms = [m for m in module.modules() if isinstance(m, _BatchNorm) and m.track_running_stats]
        self.saved: list = []

    def __enter__(self) -> None:
        self.saved = [(m.momentum, m.num_batches_tracked.clone()) for m in self.norms]
        for m in self.norms:
            m.momentum = 0.0  # running = (1 - 0)·running + 0·batch

    def __exit__(self, *exc: object) -> None:
        for m, (momentum, tracked) in zip(self.norms, self.saved):
            m.momentum = momentum
            m.num_batches_tracked.copy_(tracked)


class Recipe:
    """How to rebuild one tensor: ``fn(*inputs)``, each input a kept tensor or another recipe."""

    __slots__ = ("fn", "inputs", "autocast")

    def __init__(
        self, fn: Callable[..., torch.Tensor], inputs: Sequence[Union[torch.Tensor, "Recipe"]], autocast: torch.autocast
    ) -> None:
        self.fn = fn
        self.inputs = tuple(inputs)
        self.autocast = autocast

    def materialize(self) -> torch.Tensor:
        """The tensor, rebuilt (or found among the last few rebuilt), and kept there for a while."""
        out = self.rebuild()
        if getattr(out, _ATTR, None) is not self:
            setattr(out, _ATTR, self)
            _RECENT.append(out)
        return out

    def rebuild(self) -> torch.Tensor:
        """The tensor, rebuilt (or found among the last few rebuilt), not kept."""
        for t in _RECENT:
            if getattr(t, _ATTR, None) is self:
                return t
        if not _State.release_queued:
            # runs when this backward pass ends
            torch.autograd.Variable._execution_engine.queue_callback(_end_of_backward)
            _State.release_queued = True
        with torch.no_grad(), self.autocast:
            if self.fn is _sum:
                # one term at a time, none of them kept: a decoder level sums four full-resolution
                # tensors, and holding them all was the backward pass's peak
                terms = iter(self.inputs)
                first = next(terms)
                total = first.rebuild() if isinstance(first, Recipe) else first
                for n, i in enumerate(terms):
                    t = i.rebuild() if isinstance(i, Recipe) else i
                    total = total + t if n == 0 else add_into(total, t)  # the first term may be kept
                return total
            return self.fn(*[i.materialize() if isinstance(i, Recipe) else i for i in self.inputs])


def _autocast_of(t: torch.Tensor) -> torch.autocast:
    """The autocast state the forward pass ran ``t``'s device under, to recompute the same dtypes."""
    device = t.device.type
    return torch.autocast(device, dtype=torch.get_autocast_dtype(device), enabled=torch.is_autocast_enabled(device))


def _as_input(t: torch.Tensor) -> Union[torch.Tensor, Recipe]:
    r = getattr(t, _ATTR, None)
    return t if r is None else r


def _unpack(x: Union[torch.Tensor, Recipe]) -> torch.Tensor:
    return x.materialize() if isinstance(x, Recipe) else x


@contextlib.contextmanager
def lazy_recompute() -> Iterator[None]:
    """While active, the blocks build recipes for what they compute between convolutions, and
    autograd saves a tensor that carries a recipe as that recipe."""
    _release_recent()
    _fix_mmap_threshold()
    previous, _State.active = _State.active, True
    try:
        with torch.autograd.graph.saved_tensors_hooks(_as_input, _unpack):
            yield
    finally:
        _State.active = previous


def strip_recipes(t: torch.Tensor) -> torch.Tensor:
    """``t`` without its recipe: what saves it from now on keeps it. For tensors that stay alive
    anyway (a network's outputs), which rebuilding would only duplicate."""
    if hasattr(t, _ATTR):
        delattr(t, _ATTR)
    return t


class _Recomputed(torch.autograd.Function):
    """``fn(*inputs)`` that saves only its inputs (recipes where they have one) and runs ``fn``
    again, with gradients, in backward."""

    @staticmethod
    def forward(ctx, fn: Callable[..., torch.Tensor], recompute: Callable[..., torch.Tensor], *inputs: torch.Tensor):
        ctx.recompute = recompute
        ctx.autocast = _autocast_of(inputs[0])
        ctx.save_for_backward(*inputs)
        with torch.no_grad(), _plain():
            return fn(*inputs)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        inputs = [
            t.detach().requires_grad_(needs) for t, needs in zip(ctx.saved_tensors, ctx.needs_input_grad[2:])
        ]
        with torch.enable_grad(), ctx.autocast:
            out = ctx.recompute(*inputs)
        wanted = [t for t in inputs if t.requires_grad]
        grads = iter(torch.autograd.grad(out, wanted, grad, allow_unused=True) if wanted else ())
        return (None, None, *[next(grads) if t.requires_grad else None for t in inputs])


class _Linear(torch.autograd.Function):
    """``fn(*inputs)`` for an ``fn`` linear in its inputs: backward needs none of them, only ``vjp``."""

    @staticmethod
    def forward(ctx, fn: Callable[..., torch.Tensor], vjp: Callable[..., Sequence[torch.Tensor]], *inputs: torch.Tensor):
        ctx.vjp = vjp
        ctx.shapes = [t.shape for t in inputs]
        with torch.no_grad(), _plain():
            return fn(*inputs)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return (None, None, *ctx.vjp(grad, ctx.shapes))


def _linear_vjp(fn: Callable[..., torch.Tensor]) -> Callable[..., Sequence[torch.Tensor]]:
    """The vector-Jacobian product of a linear ``fn``, taken at zero-stride zero inputs (no memory)."""

    def vjp(grad: torch.Tensor, shapes: Sequence[torch.Size]) -> Sequence[torch.Tensor]:
        zeros = [grad.new_zeros(()).expand(shape).requires_grad_() for shape in shapes]
        with torch.enable_grad():
            return torch.autograd.grad(fn(*zeros), zeros, grad)

    return vjp


def _record(out: torch.Tensor, fn: Callable[..., torch.Tensor], inputs: Sequence[torch.Tensor]) -> torch.Tensor:
    """``out`` with the recipe ``fn(*inputs)``, the inputs' own recipes standing in for them."""
    setattr(out, _ATTR, Recipe(fn, [_as_input(t) for t in inputs], _autocast_of(inputs[0])))
    return out


def lazy_op(fn: Callable[..., torch.Tensor], *inputs: torch.Tensor, linear: bool = False) -> torch.Tensor:
    """``fn(*inputs)`` for a cheap, parameter-free ``fn``, rebuilt in backward instead of saved.

    ``linear``: ``fn`` is linear in its inputs (sums, interpolation), so its backward runs without
    rebuilding them.
    """
    if linear:
        return _record(_Linear.apply(fn, _linear_vjp(fn), *inputs), fn, inputs)
    return _record(_Recomputed.apply(fn, fn, *inputs), fn, inputs)


def lazy_sum(*terms: torch.Tensor) -> torch.Tensor:
    """``terms[0] + terms[1] + …`` (summed left to right), rebuilt in backward instead of saved."""
    return _record(_Linear.apply(_sum, lambda g, shapes: [g] * len(shapes), *terms), _sum, terms)


def lazy_cat(*parts: torch.Tensor) -> torch.Tensor:
    """``torch.cat(parts, dim=1)``, rebuilt in backward instead of saved."""
    return _record(_Linear.apply(_cat, lambda g, shapes: g.split([s[1] for s in shapes], dim=1), *parts), _cat, parts)


def add_into(total: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """``total + t``, written into ``total`` (a temporary of the caller's) unless the sum would
    have a wider dtype (autocast mixes bf16 and float32 operands). A fresh activation-sized tensor
    costs more than the addition that fills it (page faults; on a VM whose host reclaims freed
    memory, the host backing it again), and a sum's backward needs none of its operands."""
    return total.add_(t) if torch.result_type(total, t) == total.dtype else total + t


def sum_terms(terms: List[torch.Tensor]) -> torch.Tensor:
    """``terms[0] + terms[1] + …``, summed left to right, into the first sum's result."""
    if len(terms) == 1:
        return terms[0]
    total = terms[0] + terms[1]
    for t in terms[2:]:
        total = add_into(total, t)
    return total


def _sum(*terms: torch.Tensor) -> torch.Tensor:
    return sum_terms(list(terms))


def _cat(*parts: torch.Tensor) -> torch.Tensor:
    return torch.cat(parts, dim=1)


class _Conv(torch.autograd.Function):
    """A convolution whose output is rebuilt in backward; its own backward needs only the input
    (a recipe, itself rebuilt) and the weight."""

    @staticmethod
    def forward(ctx, conv: nn.Module, x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]):
        ctx.conv = conv
        ctx.has_bias = bias is not None
        ctx.save_for_backward(x, weight)
        with torch.no_grad():
            out = conv._conv_forward(x, weight, bias)
        ctx.dtype = out.dtype  # autocast may have run it in lower precision
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, weight = ctx.saved_tensors
        conv = ctx.conv
        gx, gw, gb = torch.ops.aten.convolution_backward(
            grad.to(ctx.dtype), x.to(ctx.dtype), weight.to(ctx.dtype), [weight.shape[0]] if ctx.has_bias else None,
            list(conv.stride), list(conv.padding), list(conv.dilation), False, [0] * len(conv.stride), conv.groups,
            [ctx.needs_input_grad[1], ctx.needs_input_grad[2], ctx.has_bias and ctx.needs_input_grad[3]],
        )  # fmt: skip
        return (
            None,
            None if gx is None else gx.to(x.dtype),
            None if gw is None else gw.to(weight.dtype),
            None if gb is None else gb.to(weight.dtype),
        )


def lazy_conv(conv: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``conv(x)`` (a zero-padded ``nn.ConvNd``) whose output is rebuilt in backward, not kept:
    for convolutions cheap enough that one more forward costs less than their memory."""
    if conv.padding_mode != "zeros" or isinstance(conv.padding, str):
        raise ValueError(f"lazy_conv needs numeric zero padding, got {conv.padding!r} ({conv.padding_mode}).")
    out = _Conv.apply(conv, x, conv.weight, conv.bias)
    return _record(out, lambda x: conv._conv_forward(x, conv.weight, conv.bias), [x])


class _BatchNormReLU(torch.autograd.Function):
    """BatchNorm (training) then, if ``relu``, ReLU, saving only the input and the batch statistics."""

    @staticmethod
    def forward(ctx, bn: _BatchNorm, relu: bool, c: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor):
        factor = 0.0
        if bn.track_running_stats:
            bn.num_batches_tracked.add_(1)
            factor = 1.0 / float(bn.num_batches_tracked) if bn.momentum is None else bn.momentum
        y, mean, invstd = torch.ops.aten.native_batch_norm(
            c, weight, bias, bn.running_mean, bn.running_var, True, factor, bn.eps
        )
        if relu:
            y = y.relu_()
        ctx.eps, ctx.relu = bn.eps, relu
        ctx.save_for_backward(c, weight, bias, mean, invstd)
        return y

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        c, weight, bias, mean, invstd = ctx.saved_tensors
        if ctx.relu:
            # the output, most often just rebuilt for the convolution that consumed it
            y = ctx.recipe.materialize()
            grad = torch.ops.aten.threshold_backward(grad, y, 0)
            del y
        ctx.recipe = None  # the graph's nodes outlive their backward step; the recipe holds ``c``
        gc, gw, gb = torch.ops.aten.native_batch_norm_backward(
            grad, c, weight, None, None, mean, invstd, True, ctx.eps, [ctx.needs_input_grad[2], True, True]
        )
        return None, None, gc, gw, gb


def _normalize(c: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float, relu: bool) -> torch.Tensor:
    """BatchNorm of ``c`` with its batch statistics (and ReLU), as the forward pass computed it: the
    same kernel recomputes the statistics, so the rebuilt tensor is bit-identical (an evaluation-mode
    pass with the kept statistics is one read of ``c`` less but rounds differently, which moved the
    test network's gradients by up to 0.2 %)."""
    y = torch.ops.aten.native_batch_norm(c, weight, bias, None, None, True, 0.0, eps)[0]
    return y.relu_() if relu else y


def _fast_path(adn: nn.Module) -> Optional[Tuple[_BatchNorm, bool]]:
    """(BatchNorm, ReLU or not) when ``adn`` is MONAI's ADN holding just those, the BatchNorm
    normalising with batch statistics (not frozen in eval mode), else ``None``."""
    children = dict(adn.named_children())
    bn, act = children.pop("N", None), children.pop("A", None)
    if children or not isinstance(bn, _BatchNorm) or bn.weight is None or not bn.training:
        return None
    if act is not None and type(act) is not nn.ReLU:
        return None
    return bn, act is not None


def lazy_module(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``module(x)`` saving only ``x`` and ``module``'s parameters; running statistics are updated
    here, once. In backward ``module`` runs again, with its parameters as arguments."""
    named = dict(module.named_parameters())
    names, params = list(named), list(named.values())

    def recompute(x: torch.Tensor, *weights: torch.Tensor) -> torch.Tensor:
        # the parameters come in as arguments so that backward can differentiate with respect to them
        with frozen_norm_stats(module):
            return torch.func.functional_call(module, dict(zip(names, weights)), (x,))

    return _record(_Recomputed.apply(lambda x, *_: module(x), recompute, x, *params), recompute, [x, *params])


def lazy_act_of_sum(act: nn.Module, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``act(a + b)``, rebuilt in backward instead of saved; ``act`` may have parameters (PReLU)."""
    if next(act.parameters(), None) is None:
        return lazy_op(lambda a, b: act(a + b), a, b)
    return lazy_module(act, lazy_sum(a, b))


def lazy_norm_act(adn: nn.Module, c: torch.Tensor) -> torch.Tensor:
    """``adn(c)``, MONAI's norm → activation after a convolution, keeping only ``c`` (and, for
    BatchNorm → ReLU, the batch statistics)."""
    fast = _fast_path(adn)
    if fast is None:
        return lazy_module(adn, c)
    bn, relu = fast
    out = _BatchNormReLU.apply(bn, relu, c, bn.weight, bn.bias)
    _record(out, functools.partial(_normalize, eps=bn.eps, relu=relu), [c, bn.weight, bn.bias])
    out.grad_fn.recipe = getattr(out, _ATTR)
    return out
