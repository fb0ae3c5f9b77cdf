"""MedSegDiff (#26): the FF-Parser, the training step in the bundle's trainer, seeded sampling, the
override through ``python -m monai.bundle``."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from monai.inferers import DiffusionInferer
from monai.networks.utils import one_hot

from mgrad_net.data import synthetic_disks
from mgrad_net.engines import FeedbackTrainer
from mgrad_net.peers.medsegdiff import (
    DiffusionSegmentationLoss,
    FFParser,
    MedSegDiff,
    SegmentationDiffusionPrepareBatch,
)
from tests.bundle_utils import assert_segmentations_in_inputs_geometry, run_bundle

TINY = {
    "spatial_dims": 2,
    "in_channels": 1,
    "out_channels": 2,
    "spatial_size": 32,
    "features": (8, 16),
    "norm_num_groups": 4,
}


def _disks(n: int = 4, size: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    items = synthetic_disks(n, size=size, seed=0)
    return torch.from_numpy(np.stack([i["image"] for i in items])), torch.from_numpy(
        np.stack([i["label"] for i in items])
    )


# ---------------------------------------------------------------- the FF-Parser


def test_ff_parser_with_an_all_ones_map_is_the_identity():
    parser = FFParser(2, 3, (16, 12))
    x = torch.randn(2, 3, 16, 12)
    torch.testing.assert_close(parser(x), x, rtol=0, atol=1e-5)


def test_ff_parser_keeping_only_the_zero_frequency_gives_each_channels_mean():
    parser = FFParser(2, 3, (16, 16))
    with torch.no_grad():
        parser.attentive_map.zero_()
        parser.attentive_map[:, 0, 0] = 1.0
    x = torch.randn(2, 3, 16, 16)
    torch.testing.assert_close(parser(x), x.mean(dim=(2, 3), keepdim=True).expand_as(x), rtol=0, atol=1e-5)


def test_ff_parser_damping_a_frequency_removes_that_frequency_only():
    parser = FFParser(2, 1, (16, 16))
    with torch.no_grad():
        parser.attentive_map[0, 0, 4] = 0.0  # the horizontal frequency 4
    i, j = torch.meshgrid(torch.arange(16.0), torch.arange(16.0), indexing="ij")
    low, high = torch.cos(2 * torch.pi * 1 * j / 16), torch.cos(2 * torch.pi * 4 * j / 16)
    out = parser((low + high)[None, None])
    torch.testing.assert_close(out[0, 0], low, rtol=0, atol=1e-5)


def test_a_size_other_than_the_maps_is_an_error_naming_both():
    with pytest.raises(ValueError, match=r"\(24, 24\).*\(32, 32\)"):
        MedSegDiff(**TINY).segment(torch.zeros(1, 1, 24, 24))


# ---------------------------------------------------------------- training


def _trainer(net: MedSegDiff, loader, lr: float = 3e-3) -> FeedbackTrainer:
    aux = net.aux_head
    return FeedbackTrainer(
        device=torch.device("cpu"), max_epochs=1, train_data_loader=loader, network=net,
        optimizer=torch.optim.AdamW(net.parameters(), lr=lr),
        loss_function=DiffusionSegmentationLoss() if aux else torch.nn.MSELoss(),
        inferer=DiffusionInferer(net.noise_scheduler), prepare_batch=SegmentationDiffusionPrepareBatch(1000, 2, aux),
    )  # fmt: skip


def test_one_training_step_in_the_bundles_trainer_lowers_the_loss_on_a_fixed_batch():
    torch.manual_seed(0)
    net = MedSegDiff(**TINY)
    x, y = _disks()
    x0 = one_hot(y.long(), 2, dim=1) * 2 - 1
    noise, t = torch.randn_like(x0), torch.full((4,), 300)

    def fixed_loss() -> float:
        with torch.no_grad():
            return torch.nn.functional.mse_loss(
                DiffusionInferer(net.noise_scheduler)(x0, net, noise, t, x, mode="concat"), noise
            ).item()

    before = fixed_loss()
    trainer = _trainer(net, [{"image": x, "label": y}])
    trainer.run()
    first = trainer.state.output[0]  # MONAI decollates the output per sample
    assert trainer.state.iteration == 1 and torch.isfinite(torch.as_tensor(first["loss"]))
    assert first["image"].shape == x0.shape[1:]  # what the step noised: the one-hot label map
    assert fixed_loss() < before


def test_the_auxiliary_head_trains_with_the_noise_head_in_the_bundles_trainer():
    """With ``aux_head`` the network returns cat([ε, x_0]); one step lowers both terms on a fixed batch."""
    torch.manual_seed(0)
    net = MedSegDiff(**TINY, aux_head=True)
    x, y = _disks()
    x0 = one_hot(y.long(), 2, dim=1) * 2 - 1
    noise, t = torch.randn_like(x0), torch.full((4,), 700)

    def fixed_losses() -> tuple[float, float]:
        with torch.no_grad():
            out = DiffusionInferer(net.noise_scheduler)(x0, net, noise, t, x, mode="concat")
        assert out.shape == (4, 4, 32, 32)
        mse = torch.nn.functional.mse_loss
        return mse(out[:, :2], noise).item(), mse(out[:, 2:], x0).item()

    before = fixed_losses()
    trainer = _trainer(net, [{"image": x, "label": y}] * 3)
    trainer.run()
    after = fixed_losses()
    assert after[0] < before[0] and after[1] < before[1], (before, after)
    with pytest.raises(ValueError, match="aux_head"):  # a network without the head: the loss says what is missing
        DiffusionSegmentationLoss()(noise, torch.cat([noise, x0], dim=1))


def test_each_sampling_step_blends_the_heads_x0_estimates_by_aux_blend():
    """One DDIM step (from t = 999 onto ᾱ = 1) returns the step's x_0 estimate, clipped: the head's
    with aux_blend 1, the noise head's with 0, their mean with 0.5."""
    torch.manual_seed(0)
    net = MedSegDiff(**TINY, aux_head=True, num_inference_steps=1).eval()
    x, _ = _disks(2)
    noise = torch.randn((1, 2, 32, 32), generator=torch.Generator().manual_seed(net.seed)).expand(2, -1, -1, -1)
    with torch.no_grad():
        out = net.unet(torch.cat([noise, x], dim=1), torch.full((2,), 999))
    alpha = net.sampler.alphas_cumprod[999]
    from_eps = (noise - (1 - alpha).sqrt() * out[:, :2]) / alpha.sqrt()
    for blend, x0 in [(1.0, out[:, 2:]), (0.0, from_eps), (0.5, (out[:, 2:] + from_eps) / 2)]:
        net.aux_blend = blend
        torch.testing.assert_close(net(x), x0.clamp(-1, 1), rtol=0, atol=1e-4)
    with pytest.raises(ValueError, match="aux_blend"):
        MedSegDiff(**TINY, aux_head=True, aux_blend=1.5)


def test_prepare_batch_noises_the_one_hot_label_scaled_to_plus_minus_one():
    x, y = _disks(2)
    x0, target, args, kwargs = SegmentationDiffusionPrepareBatch(1000, 3)({"image": x, "label": y})
    assert x0.shape == (2, 3, 32, 32) and set(x0.unique().tolist()) == {-1.0, 1.0}
    torch.testing.assert_close(x0[:, 1:2], (y * 2 - 1).to(x0.dtype))
    assert target is kwargs["noise"] and kwargs["condition"] is x and kwargs["mode"] == "concat" and args == ()
    assert kwargs["timesteps"].shape == (2,) and 0 <= kwargs["timesteps"].min() and kwargs["timesteps"].max() < 1000
    x0, target, _, kwargs = SegmentationDiffusionPrepareBatch(1000, 3, aux_target=True)({"image": x, "label": y})
    torch.testing.assert_close(target, torch.cat([kwargs["noise"], x0], dim=1))  # the auxiliary head's target too


# the paper's variant takes about 40 s to converge: it runs with the integration group (CI); the bundle's
# (with the auxiliary head) in seconds, in the test command
@pytest.mark.parametrize(
    "aux_head", [pytest.param(False, marks=pytest.mark.integration), True], ids=["paper", "aux_head"]
)
def test_overfits_a_few_synthetic_slices_with_the_default_steps(aux_head):
    torch.manual_seed(0)
    net = MedSegDiff(**TINY, aux_head=aux_head)
    assert net.num_inference_steps == 10 and net.num_ensemble == 1  # the defaults the bundle samples with
    x, y = _disks()
    trainer = _trainer(net, [{"image": x, "label": y}] * 50)
    dice, steps = 0.0, 0
    for _ in range(50):  # here first above 0.9 after 1,100 steps, 0.97 at 1,500 (about 35 s on 2 cores)
        trainer.run()  # 50 more steps on the same four slices
        steps += trainer.state.iteration
        pred = net.eval()(x).argmax(1, keepdim=True) == 1
        dice = 2 * (pred & (y == 1)).sum().item() / (pred.sum().item() + (y == 1).sum().item())
        if dice > 0.9:
            break
    assert dice > 0.9, f"foreground Dice {dice:.3f} after {steps} steps"


# ---------------------------------------------------------------- sampling


class _Oracle(torch.nn.Module):
    """A noise predictor that knows ``x_0``: for its input ``x_t`` at ``t`` it returns the exact noise
    ``(x_t − √ᾱ_t x_0) / √(1 − ᾱ_t)`` (with ``aux``, followed by ``x_0`` itself) and records ``t`` and
    that noise."""

    def __init__(self, x0: torch.Tensor, alphas: torch.Tensor, aux: bool) -> None:
        super().__init__()
        self.x0, self.alphas, self.aux, self.calls = x0, alphas.double(), aux, []

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor, context=None) -> torch.Tensor:
        t = int(timesteps[0])
        a = self.alphas[t]
        eps = (x[:, : self.x0.shape[1]] - a.sqrt() * self.x0) / (1 - a).sqrt()
        self.calls.append((t, eps))
        return torch.cat([eps, self.x0], dim=1) if self.aux else eps


@pytest.mark.parametrize("aux_head", [False, True], ids=["noise", "aux_head"])
@pytest.mark.parametrize("steps", [1, 2, 3, 10, 16])
def test_each_sampling_step_moves_the_sample_to_the_noise_level_of_the_next_call(steps, aux_head):
    """With an oracle network, deterministic DDIM keeps the noise ε of the starting sample: every call
    then gets ``x_t = √ᾱ_t x_0 + √(1 − ᾱ_t) ε`` for the very t it is called with, and the result is x_0.
    (MONAI 1.6's DDIM alone moved the sample to 999 − 1000 // N and called the network at its
    linspace timesteps: for N = 2 at t = 0 on a sample with the noise of t = 499.)"""
    net = MedSegDiff(**{**TINY, "num_inference_steps": steps}, aux_head=aux_head, aux_blend=0.5).eval()
    image = torch.rand(2, 1, 32, 32, dtype=torch.float64)
    x0 = (one_hot(_disks(2)[1].long(), 2, dim=1) * 2 - 1).double()
    net.unet = _Oracle(x0, net.sampler.alphas_cumprod, aux_head)
    out = net(image)
    (t0, eps0), *later = net.unet.calls
    for t, eps in later:  # the noise the sample carries, read at the level of the call's timestep
        torch.testing.assert_close(eps, eps0, rtol=0, atol=1e-6, msg=f"call at t = {t}")
    torch.testing.assert_close(out, x0, rtol=0, atol=1e-6)
    expected = [(2000 * (steps - i) + steps) // (2 * steps) - 1 for i in range(steps)]  # trailing: T − 1 first
    assert [t for t, _ in net.unet.calls] == expected
    assert expected[0] == 999 and (steps != 2 or expected == [999, 499])


def test_seeded_sampling_is_deterministic_whatever_the_rng_state_or_batch():
    torch.manual_seed(0)
    net = MedSegDiff(**{**TINY, "num_inference_steps": 4, "num_ensemble": 2}).eval()
    x, _ = _disks(3)
    first = net(x[:1])
    torch.manual_seed(123)  # the global RNG plays no part
    assert torch.equal(net(x[:1]), first)  # bit for bit
    torch.testing.assert_close(net(x)[:1], first, rtol=0, atol=1e-4)  # the same image in another batch (other kernels)
    assert first.shape == (1, 2, 32, 32) and first.abs().max() <= 1  # per-class scores in [-1, 1]
    net.seed = 1
    assert not torch.allclose(net(x[:1]), first)  # the seed does matter
    net.seed, net.num_ensemble = 0, 1
    assert not torch.allclose(net(x[:1]), first)  # so does the ensemble: two members averaged


# ---------------------------------------------------------------- the bundle override

ROI = ["--roi_size", "[64,64]"]


@pytest.mark.integration
def test_override_trains_an_epoch_and_infers_in_the_inputs_geometry(tmp_path):
    """One epoch on the embedded synthetic data through ``python -m monai.bundle`` (validation
    samples with DDIM), then inference merged after inference.json alone."""
    ckpt_dir, output_dir = tmp_path / "models" / "medsegdiff", tmp_path / "eval" / "medsegdiff"
    proc = run_bundle("training", ["train", "comparison/medsegdiff"], tmp_path, *ROI, "--max_epochs", "1",
                      "--train#slices_per_volume", "2", "--network_def#num_inference_steps", "2",
                      "--ckpt_dir", str(ckpt_dir), "--output_dir", str(output_dir), tiny=False)  # fmt: skip
    weights = ckpt_dir / "model.pt"
    assert proc.stdout.splitlines()[-5:] == [  # the run's last words: where its outputs went, and on what data
        "outputs:", f"  weights: {weights}", f"  training log: {tmp_path / 'eval' / 'medsegdiff' / 'training_log.csv'}",
        f"  tensorboard: {tmp_path / 'eval' / 'medsegdiff'}",
        f"(from the embedded synthetic phantoms in {tmp_path}/data/synthetic, not your data: "
        "pass --dataset_dir)"]  # fmt: skip
    assert weights.is_file() and not (tmp_path / "models" / "model.pt").exists()  # its own folder
    net = MedSegDiff(2, 1, 4, spatial_size=64, aux_head=True)  # the config's: with the auxiliary head
    net.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
    assert sum(p.numel() for p in MedSegDiff(2, 1, 4, spatial_size=192, aux_head=True).parameters()) == 1_743_068
    log = (tmp_path / "eval" / "medsegdiff" / "training_log.csv").read_text().splitlines()
    assert len(log) == 2 and log[0].startswith("epoch")

    run_bundle("inference", ["inference", "comparison/medsegdiff"], tmp_path, *ROI, "--ckpt_dir", str(ckpt_dir),
               "--output_dir", str(tmp_path / "segs"), "--network_def#num_inference_steps", "2",
               tiny=False)  # fmt: skip
    assert_segmentations_in_inputs_geometry(tmp_path, tmp_path / "segs")
