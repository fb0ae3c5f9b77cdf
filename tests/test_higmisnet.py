"""Hi-gMISnet (#27): the Haar DWT, the dual-mode attention gate, the parallel generators, the
adversarial step with its differentiable reciprocal loss, and the bundle override."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from ignite.engine import Events
from monai.bundle import ConfigParser
from monai.engines import SupervisedTrainer
from monai.networks.nets import PatchDiscriminator
from monai.networks.nets.attentionunet import AttentionBlock

from mgrad_net.config import run_training
from mgrad_net.data import synthetic_disks
from mgrad_net.engines import FeedbackTrainer
from mgrad_net.peers.higmisnet import (
    AdversarialStep,
    DualModeAttentionGate,
    HaarDWT,
    HiGMISnet,
    HiGMISnetLoss,
    SchedulerGroup,
    reciprocal_loss,
    soft_and,
    soft_or,
)
from tests.bundle_utils import assert_segmentations_in_inputs_geometry, config_files, run_bundle

TINY = dict(spatial_dims=2, in_channels=1, features=(4, 8, 8, 16, 16, 24))
PRESET_PARAMETERS = 1_446_618  # experiments/comparison/higmisnet/override.json's two generators, 4 classes


def _disks(count: int = 4, size: int = 32, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    items = synthetic_disks(count, size=size, seed=seed)
    return torch.from_numpy(np.stack([i["image"] for i in items])), torch.from_numpy(
        np.stack([i["label"] for i in items])
    )


def _gan(classes: int = 2, lr: float = 1e-3, d_lr: float = 1e-4, **kwargs):
    """A tiny segmenter, its two discriminators and four optimizers, as the comparison's override builds them."""
    torch.manual_seed(0)
    net = HiGMISnet(**TINY, out_channels=classes, **kwargs)
    ds = [PatchDiscriminator(spatial_dims=2, in_channels=1 + classes, channels=8, num_layers_d=2) for _ in range(2)]
    opts = [torch.optim.Adam(m.parameters(), lr=r, betas=(0.5, 0.999))
            for m, r in ((net.foreground, lr), (net.background, lr), (ds[0], d_lr), (ds[1], d_lr))]  # fmt: skip
    return net, ds, opts


def _trainer(net, ds, opts, x, y, epochs: int = 1) -> SupervisedTrainer:
    step = AdversarialStep(ds[0], ds[1], opts[1], opts[2], opts[3])
    batches = [{"image": x, "label": y}]
    return FeedbackTrainer(device=torch.device("cpu"), max_epochs=epochs, train_data_loader=batches, network=net,
                           optimizer=opts[0], loss_function=HiGMISnetLoss(), iteration_update=step)  # fmt: skip


def _snapshot(*modules) -> list[torch.Tensor]:
    return [p.detach().clone() for m in modules for p in m.parameters()]


def _changed(before: list[torch.Tensor], module) -> bool:
    return any(not torch.equal(b, p) for b, p in zip(before, module.parameters()))


# ---------------------------------------------------------------- the blocks


def test_haar_dwt_is_exact_and_inverts():
    dwt = HaarDWT()
    x = torch.randn(2, 3, 32, 48, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    y = dwt(x)
    assert y.shape == (2, 12, 16, 24)
    torch.testing.assert_close(dwt.inverse(y), x, rtol=0, atol=1e-12)  # exact inverse
    torch.testing.assert_close(y.square().sum(), x.square().sum())  # orthonormal: energy kept
    # the definition on one 2x2 block [[a, b], [c, d]] of every channel, band-major output
    a, b, c, d = x[..., 0::2, 0::2], x[..., 0::2, 1::2], x[..., 1::2, 0::2], x[..., 1::2, 1::2]
    bands = [(a + b + c + d) / 2, (a - b + c - d) / 2, (a + b - c - d) / 2, (a - b - c + d) / 2]
    torch.testing.assert_close(y, torch.cat(bands, dim=1))
    torch.testing.assert_close(dwt.ll(x), bands[0])
    assert not list(dwt.parameters()) and not dwt.state_dict()  # fixed, nothing to learn or save
    with pytest.raises(ValueError, match="even spatial sizes"):
        dwt(torch.rand(1, 1, 31, 32))


def _identity_gate() -> DualModeAttentionGate:
    """A gate with 1-channel halves whose θ, φ are identities (their BN at its initial running
    statistics, eval mode) and ψ(z) = 10 z (a conv alone, as the notebook's)."""
    gate = DualModeAttentionGate(2, skip_channels=2, gate_channels=2, inter_channels=2).eval()
    with torch.no_grad():
        for block in (gate.additive, gate.subtractive):
            for conv in (block.W_x[0].conv, block.W_g[0].conv):
                conv.weight.fill_(1.0)
                conv.bias.zero_()
            block.psi[0].conv.weight.fill_(10.0)
            block.psi[0].conv.bias.zero_()
    return gate


def test_dual_mode_gate_halves_behave_as_stated():
    gate = _identity_gate()
    x = torch.zeros(1, 2, 8, 8)
    g = torch.zeros(1, 2, 8, 8)
    x[:, :, :, :4] = 1.0  # skip features on the left half
    g[:, :, :4, :] = 1.0  # gating signal on the top half
    with torch.no_grad():
        _, maps = gate(x, g)
    alpha, beta = torch.sigmoid(maps.additive)[0, 0], torch.sigmoid(maps.subtractive)[0, 0]
    top_left, top_right, bottom_left, bottom_right = (alpha[:4, :4], alpha[:4, 4:], alpha[4:, :4], alpha[4:, 4:])
    # additive: σ(ψ(ReLU(θx + φg))): high wherever skip or gate is on, highest where both are, 0.5 where neither
    s = torch.sigmoid(torch.tensor(10.0 / (1 + 1e-5) ** 0.5))  # θ and φ each pass one eval-mode BN, ψ none
    torch.testing.assert_close(bottom_right, torch.full((4, 4), 0.5))
    assert bool((top_right > 0.99).all() and (bottom_left > 0.99).all() and (top_left >= top_right).all())
    torch.testing.assert_close(bottom_left, torch.full((4, 4), float(s)))
    # subtractive: 1 − σ(ψ(ReLU(θx − φg))): skip features the gate does not support are suppressed
    b_tl, b_tr, b_bl, b_br = beta[:4, :4], beta[:4, 4:], beta[4:, :4], beta[4:, 4:]
    torch.testing.assert_close(b_bl, torch.full((4, 4), float(1 - s)))  # x on, g off: suppressed (≈ 0)
    assert bool((b_bl < 0.01).all())
    for region in (b_tl, b_tr, b_br):  # θx ≤ φg: ReLU gives 0, β = 1 − σ(0) = 0.5
        torch.testing.assert_close(region, torch.full((4, 4), 0.5))


def test_gate_psi_is_the_notebooks_conv_then_sigmoid():
    # the deep-supervised maps are σ(conv(ReLU(θx ± φg))): no BatchNorm before the sigmoid (MONAI's
    # AttentionBlock has one there, the notebook has none)
    gate = DualModeAttentionGate(2, skip_channels=6, gate_channels=8, inter_channels=4)
    for block in (gate.additive, gate.subtractive):
        assert [type(m).__name__ for m in block.psi] == ["Convolution", "Sigmoid"]
        assert not any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in block.psi.modules())
    assert not any(".psi.1." in k for k in gate.state_dict())


def test_additive_half_is_monais_attention_block():
    torch.manual_seed(0)
    gate = DualModeAttentionGate(2, skip_channels=6, gate_channels=8, inter_channels=4).eval()
    x, g = torch.randn(2, 6, 16, 16), torch.randn(2, 8, 16, 16)
    with torch.no_grad():
        _, maps = gate(x, g)
        assert isinstance(gate.additive, AttentionBlock)
        torch.testing.assert_close(x[:, :3] * torch.sigmoid(maps.additive), gate.additive(g[:, :4], x[:, :3]))
        # the subtractive half uses the same block type's θ, φ, ψ with θx − φg, then 1 − σ
        s = gate.subtractive
        expected = 1 - s.psi(torch.relu(s.W_x(x[:, 3:]) - s.W_g(g[:, 4:])))
        torch.testing.assert_close(torch.sigmoid(maps.subtractive), expected)


# ---------------------------------------------------------------- the segmenter


def test_eval_output_is_deterministic_per_class_logits():
    net, _, _ = _gan(classes=4)
    x = torch.rand(3, 1, 32, 32, generator=torch.Generator().manual_seed(1))
    net.train()
    a, b = net(x).logits, net(x).logits
    assert not torch.equal(a, b)  # training mode: dropout draws anew
    net.eval()
    with torch.no_grad():
        out = net(x)
        assert out.shape == (3, 4, 32, 32)
        assert torch.equal(out, net(x))  # dropout off
        torch.testing.assert_close(net(x[:1]), out[:1])  # batch norm on running statistics: no batch dependence
        # the combination: log p_c + log(1 − q_c), the soft "foreground AND NOT background"
        fg, bg = net.foreground(x).logits, net.background(x).logits
        torch.testing.assert_close(out.exp(), torch.softmax(fg, 1) * (1 - torch.sigmoid(bg)))
    with pytest.raises(ValueError, match="multiples of 32"):
        net(torch.rand(1, 1, 48, 40))


def test_reciprocal_term_is_differentiable_and_reaches_both_generators():
    # the soft operators are the logical ones on {0, 1}
    p, q = torch.tensor([0.0, 0.0, 1.0, 1.0]), torch.tensor([0.0, 1.0, 0.0, 1.0])
    assert soft_and(p, q).tolist() == [0, 0, 0, 1] and soft_or(p, q).tolist() == [0, 1, 1, 1]

    net, _, _ = _gan(classes=3)
    x, y = _disks(2)
    y = y + (x > 0.9).long() * (y > 0)  # a second foreground class
    out = net.train()(x)
    target = torch.nn.functional.one_hot(y[:, 0], 3).permute(0, 3, 1, 2).float()
    fg, bg = torch.softmax(out.foreground.logits, 1), torch.sigmoid(out.background.logits)
    loss = reciprocal_loss(x, fg, bg, target, HiGMISnetLoss().ssim)
    assert torch.isfinite(loss) and loss > 0
    loss.backward(retain_graph=True)
    for generator in (net.foreground, net.background):
        grads = [p.grad for p in generator.parameters()]
        assert all(g is not None for g in grads)
        assert sum(float(g.abs().sum()) for g in grads) > 0
    # the notebook's version, on rounded predictions, passes nothing back
    rounded = reciprocal_loss(x, fg.round(), bg.round(), target, HiGMISnetLoss().ssim)
    net.zero_grad()
    rounded.backward()
    assert all(p.grad is None or not p.grad.any() for p in net.parameters())


def test_one_adversarial_step_changes_discriminators_and_generators():
    net, ds, opts = _gan()
    x, y = _disks(2)
    before = {
        name: _snapshot(m)
        for name, m in [("fg", net.foreground), ("bg", net.background), ("d_fg", ds[0]), ("d_bg", ds[1])]
    }
    trainer = _trainer(net, ds, opts, x, y)
    trainer.run()
    for name, module in [("fg", net.foreground), ("bg", net.background), ("d_fg", ds[0]), ("d_bg", ds[1])]:
        assert _changed(before[name], module), name
    for opt in opts:  # each optimizer took exactly one step
        assert {int(s["step"]) for s in opt.state_dict()["state"].values()} == {1}
    losses = trainer.state.gan_losses
    assert set(losses) == {"d_fg", "d_bg", "adv_fg", "adv_bg", "seg_fg", "seg_bg", "deep_fg", "deep_bg", "reciprocal"}
    assert all(np.isfinite(v) for v in losses.values())
    assert all(p.requires_grad for d in ds for p in d.parameters())  # the discriminators are unfrozen again
    assert len(trainer.state.output) == 2 and trainer.state.output[0]["pred"].shape == (2, 32, 32)  # decollated


def test_segmenter_overfits_a_few_synthetic_slices():
    net, ds, opts = _gan(lr=3e-3, d_lr=3e-4)
    x, y = _disks(4, size=32)
    dice = 0.0
    for epochs in range(10, 121, 10):
        _trainer(net, ds, opts, x, y, epochs=10).run()
        with torch.no_grad():
            pred = net.eval()(x).argmax(1, keepdim=True) == 1
        dice = 2 * (pred & (y == 1)).sum().item() / (pred.sum().item() + (y == 1).sum().item())
        if dice > 0.9:
            break
    assert dice > 0.9, f"foreground Dice {dice:.3f} after {epochs} steps"


def test_scheduler_group_steps_saves_and_resizes_all():
    params = [torch.nn.Parameter(torch.zeros(1)) for _ in range(2)]
    opts = [torch.optim.Adam([p], lr=lr) for p, lr in zip(params, (1.0, 0.1))]
    group = SchedulerGroup([torch.optim.lr_scheduler.PolynomialLR(o, total_iters=4, power=1.0) for o in opts])
    group.total_iters = 2
    for o in opts:
        o.step()
    group.step()
    assert group.get_last_lr() == pytest.approx([0.5, 0.05]) and group._last_lr[0] == pytest.approx(0.5)
    state = group.state_dict()
    group.step()
    assert group.get_last_lr() == pytest.approx([0.0, 0.0])
    group.load_state_dict(state)
    assert [s.last_epoch for s in group.schedulers] == [1, 1]


# ---------------------------------------------------------------- the bundle override

ROI = ["--roi_size", "[64,64]"]
GAN_KEYS = ("model", "optimizer", "optimizer_bg", "discriminator_fg", "discriminator_bg", "optimizer_d_fg",
            "optimizer_d_bg", "lr_scheduler", "trainer", "best", "budget")  # fmt: skip
OPTIMIZERS = ("optimizer", "optimizer_bg", "optimizer_d_fg", "optimizer_d_bg")


def _equal_states(a, b) -> bool:
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_equal_states(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_equal_states(x, y) for x, y in zip(a, b))
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and torch.equal(a.cpu(), b.cpu())
    return a == b


@pytest.mark.integration
def test_override_trains_an_epoch_infers_and_resumes_every_optimizer(tmp_path):
    """One epoch of the adversarial training on the embedded synthetic data through
    ``python -m monai.bundle``, evaluation, inference in the inputs' geometry, then ``--resume``:
    every network, optimizer and the schedule come back as saved."""
    ckpt_dir, output_dir = tmp_path / "models" / "higmisnet", tmp_path / "eval" / "higmisnet"
    dirs = ["--ckpt_dir", str(ckpt_dir), "--output_dir", str(output_dir)]
    run_bundle("training", ["train", "comparison/higmisnet"], tmp_path, *ROI, "--max_epochs", "1",
               "--train#slices_per_volume", "2", *dirs, tiny=False)  # fmt: skip
    weights = ckpt_dir / "model.pt"
    assert weights.is_file() and not (tmp_path / "models" / "model.pt").exists()  # its own folder
    net = HiGMISnet(2, 1, 4, features=(6, 12, 24, 48, 72, 144)).eval()
    net.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
    assert sum(p.numel() for p in net.parameters()) == PRESET_PARAMETERS  # the preset the config states
    saved = torch.load(
        ckpt_dir / "checkpoint_epoch=1.pt", map_location="cpu", weights_only=True
    )  # plain tensors and numbers
    assert set(saved) == set(GAN_KEYS)
    assert all(saved[k]["state"] for k in OPTIMIZERS)  # every optimizer has stepped and is saved
    log = (output_dir / "training_log.csv").read_text().splitlines()
    assert len(log) == 2 and log[0].startswith("epoch")

    run_bundle(
        "evaluating", ["train", "evaluate", "comparison/higmisnet"], tmp_path, *ROI, *dirs, tiny=False
    )  # as compare_models.py runs it
    summary = json.loads((output_dir / "summary.json").read_text())
    assert 0 <= summary["mean"]["dice"] <= 1

    configs = ["inference", "comparison/higmisnet"]  # merges after inference.json alone (training hooks: top-level)
    run_bundle("inference", configs, tmp_path, *ROI, "--ckpt_dir", str(ckpt_dir),
               "--output_dir", str(tmp_path / "segs"), tiny=False)  # fmt: skip
    assert_segmentations_in_inputs_geometry(tmp_path, tmp_path / "segs")

    # --resume, in process: the states the resumed run starts its next epoch with
    parser = ConfigParser()
    parser.read_config(config_files("train", "comparison/higmisnet"))
    parser.update(
        {
            "bundle_root": str(tmp_path),
            "ckpt_dir": str(ckpt_dir),
            "output_dir": str(output_dir),
            "roi_size": [64, 64],
            "train#slices_per_volume": 2,
            "max_epochs": 2,
            "resume": True,
        }
    )
    trainer, saver = parser.get_parsed_content("train#trainer"), parser.get_parsed_content("train#checkpoint_saver")
    assert isinstance(trainer.step, AdversarialStep)
    stop = parser.get_parsed_content(
        "train#handlers#0"
    )  # StopOnNonFiniteLoss's last_good.pt: every network and optimizer
    assert type(stop).__name__ == "StopOnNonFiniteLoss"
    assert set(stop.save_dict) == set(GAN_KEYS) - {"trainer", "best", "budget"}
    fresh = {k: saver.save_dict[k].state_dict() for k in OPTIMIZERS}
    assert not any(s["state"] for s in fresh.values())  # before loading: nothing (the check can fail)
    resumed = {}

    @trainer.on(Events.EPOCH_STARTED)
    def _capture(engine):
        resumed.update({k: saver.save_dict[k].state_dict() for k in GAN_KEYS if k not in ("trainer", "best", "budget")})
        resumed["epoch"] = engine.state.epoch
        engine.terminate()

    run_training(trainer, saver, resume=True, start_from=parser.get_parsed_content("start_from"))
    assert resumed["epoch"] == 2
    for key in (*OPTIMIZERS, "discriminator_fg", "discriminator_bg", "lr_scheduler"):
        assert _equal_states(resumed[key], saved[key]), key
    assert _equal_states(resumed["model"], saved["model"])
