"""Losses: eq. 9 as the published code computes it, the aggregated loss against brute force."""

import itertools

import pytest
import torch
import torch.nn.functional as F

from mgrad_net.losses import AggregatedLoss, MGRADLoss, SegmentationLoss, WeightedSideLoss, subset_matrix
from mgrad_net.outputs import MGRADOutput


def published_seg_loss(logits, target, w_dice=0.7, w_ce=0.3):
    """Eq. 9 written out independently: TransUNet-style batch-pooled squared Dice + CE."""
    k = logits.shape[1]
    prob = torch.softmax(logits, 1)
    onehot = F.one_hot(target[:, 0].long(), k).movedim(-1, 1).float()
    dice = 0.0
    for c in range(k):
        p, t = prob[:, c], onehot[:, c]
        dice += 1 - (2 * (p * t).sum() + 1e-5) / ((p * p).sum() + (t * t).sum() + 1e-5)
    return w_dice * dice / k + w_ce * F.cross_entropy(logits, target[:, 0].long())


def test_subset_matrix_lists_every_nonempty_subset_once():
    m = subset_matrix(5)
    assert m.shape == (31, 5)
    assert len({tuple(r.tolist()) for r in m}) == 31 and m.sum(1).min() == 1


def test_segmentation_loss_matches_published_formula():
    logits, target = torch.randn(3, 4, 16, 16), torch.randint(0, 4, (3, 1, 16, 16))
    torch.testing.assert_close(SegmentationLoss()(logits, target), published_seg_loss(logits, target))
    torch.testing.assert_close(
        SegmentationLoss(lambda_dice=0.3, lambda_ce=0.7)(logits, target), published_seg_loss(logits, target, 0.3, 0.7)
    )


def test_index_and_one_hot_targets_give_the_same_loss():
    logits, target = torch.randn(2, 3, 8, 8), torch.randint(0, 3, (2, 1, 8, 8))
    onehot = F.one_hot(target[:, 0], 3).movedim(-1, 1)
    loss = SegmentationLoss()
    torch.testing.assert_close(loss(logits, target), loss(logits, onehot))
    side = [torch.randn(2, 3, 8, 8) for _ in range(5)]
    torch.testing.assert_close(AggregatedLoss()(side, target), AggregatedLoss()(side, onehot))


def test_target_with_wrong_channel_count_is_rejected():
    with pytest.raises(ValueError, match="expected 1 \\(class indices\\) or 3"):
        SegmentationLoss()(torch.randn(1, 3, 8, 8), torch.zeros(1, 2, 8, 8))


@pytest.mark.parametrize(
    "batch,per_call,options",
    [(True, 8, {}), (False, 8, {}), (True, 31, {}), (False, 1, {}), (True, 5, {}), (True, None, {}),
     (True, 31, {"include_background": False, "squared_pred": False}),
     (False, 31, {"include_background": False, "lambda_dice": 0.2, "lambda_ce": 0.8, "smooth": 1.0})],
)  # fmt: skip
def test_aggregated_loss_equals_brute_force_over_31_subsets(batch, per_call, options):
    """The closed form, block by block, against MONAI's DiceCELoss on each subset sum, option by option."""
    side = [torch.randn(2, 4, 16, 16, requires_grad=True) for _ in range(5)]
    target = torch.randint(0, 4, (2, 1, 16, 16))
    seg = SegmentationLoss(batch=batch, **options)
    aggregated = AggregatedLoss(seg, subsets_per_call=per_call)
    if per_call is None:
        aggregated.call_elements = 3 * side[0].numel()  # sized for three subsets per block
    batched = aggregated(side, target)
    brute = sum(
        seg(sum(side[i] for i in subset), target) for k in range(1, 6) for subset in itertools.combinations(range(5), k)
    )
    torch.testing.assert_close(batched, brute)
    g_batched = torch.autograd.grad(batched, side)
    g_brute = torch.autograd.grad(brute, side)
    for a, b in zip(g_batched, g_brute):
        torch.testing.assert_close(a, b)
    with torch.no_grad():  # no gradient formed, the same value
        torch.testing.assert_close(aggregated(side, target), batched.detach())


def test_aggregated_loss_of_volumes_and_of_soft_one_hot_targets():
    """3D side outputs, and a one-hot target given as floats: still DiceCELoss, subset by subset."""
    side = [torch.randn(1, 3, 6, 7, 5, dtype=torch.float64, requires_grad=True) for _ in range(3)]
    target = F.one_hot(torch.randint(0, 3, (1, 6, 7, 5)), 3).movedim(-1, 1).double()
    seg = SegmentationLoss()
    loss = AggregatedLoss(seg)(side, target)
    brute = sum(seg(sum(side[i] for i in s), target) for k in range(1, 4) for s in itertools.combinations(range(3), k))
    assert loss.dtype == torch.float64
    torch.testing.assert_close(loss, brute)
    for a, b in zip(torch.autograd.grad(loss, side), torch.autograd.grad(brute, side)):
        torch.testing.assert_close(a, b)


def test_aggregated_loss_under_bf16_autocast_is_float32_with_bf16_gradients():
    side = [torch.randn(2, 4, 16, 16).bfloat16().requires_grad_() for _ in range(5)]
    target = torch.randint(0, 4, (2, 1, 16, 16))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = AggregatedLoss()(side, target)
    reference = AggregatedLoss()([s.float() for s in side], target)
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, reference)
    grads = torch.autograd.grad(loss, side)
    assert all(g.dtype == torch.bfloat16 for g in grads)
    floats = torch.autograd.grad(AggregatedLoss()([s.float() for s in side], target), side)
    for a, b in zip(grads, floats):
        torch.testing.assert_close(a, b.bfloat16())


def test_weighted_side_loss_is_weighted_sum():
    side = [torch.randn(1, 2, 8, 8) for _ in range(5)]
    target = torch.randint(0, 2, (1, 1, 8, 8))
    w = (0.1, 0.2, 0.3, 0.4, 0.5)
    seg = SegmentationLoss()
    expected = sum(wi * seg(s, target) for wi, s in zip(w, side))
    torch.testing.assert_close(WeightedSideLoss(w)(side, target), expected)
    with pytest.raises(ValueError, match="5 weights but got 2"):
        WeightedSideLoss(w)(side[:2], target)


def _output(k=3, side=5):
    t = lambda: torch.randn(2, k, 16, 16)  # noqa: E731
    return MGRADOutput(t(), t(), [t() for _ in range(side)], [], [], [])


def test_total_loss_combines_both_predictions_and_the_side_loss():
    out, target = _output(), torch.randint(0, 3, (2, 1, 16, 16))
    seg = SegmentationLoss()
    sup = seg(out.p1, target) + seg(out.p2, target)
    torch.testing.assert_close(MGRADLoss(side_loss="none")(out, target), sup)
    torch.testing.assert_close(MGRADLoss()(out, target), sup + AggregatedLoss()(out.side, target))
    torch.testing.assert_close(MGRADLoss(side_loss="weighted")(out, target), sup + WeightedSideLoss()(out.side, target))
    # a network built without side outputs: only the supervised part
    bare = _output(side=0)
    torch.testing.assert_close(MGRADLoss()(bare, target), seg(bare.p1, target) + seg(bare.p2, target))


def test_total_loss_of_plain_logits_is_the_segmentation_loss():
    logits, target = torch.randn(2, 3, 8, 8), torch.randint(0, 3, (2, 1, 8, 8))
    torch.testing.assert_close(MGRADLoss()(logits, target), SegmentationLoss()(logits, target))
    with pytest.raises(ValueError, match="side_loss"):
        MGRADLoss(side_loss="sum")
