"""FeedbackStep / FeedbackTrainer: the T-pass feedback step in a real MONAI SupervisedTrainer, a
network's own step in its place, and that it learns."""

import pytest
import torch
from ignite.engine import Events
from monai.data import DataLoader
from monai.engines import SupervisedEvaluator, SupervisedTrainer
from monai.handlers import MeanDice, from_engine
from monai.networks.nets import BasicUNet
from monai.transforms import AsDiscreted, Compose

from mgrad_net.data import synthetic_disks
from mgrad_net.engines import FeedbackStep, FeedbackTrainer
from mgrad_net.losses import MGRADLoss
from mgrad_net.outputs import MGRADOutput
from tests.conftest import tiny_net

CPU = torch.device("cpu")


def _loader(count=4, batch_size=2, seed=0):
    return DataLoader(synthetic_disks(count, seed=seed), batch_size=batch_size)


def _trainer(net, passes, epochs=1, loader=None, lr=1e-3, **kwargs):
    return FeedbackTrainer(
        device=CPU,
        max_epochs=epochs,
        train_data_loader=loader or _loader(),
        network=net,
        optimizer=torch.optim.AdamW(net.parameters(), lr),
        loss_function=MGRADLoss(),
        feedback_passes=passes,
        **kwargs,
    )


class _Recorder:
    """Records what the network received and returned in each forward, and each optimizer step."""

    def __init__(self, net, trainer):
        self.feedbacks, self.outputs, self.steps = [], [], 0
        net.register_forward_pre_hook(self._pre, with_kwargs=True)
        net.register_forward_hook(lambda m, a, out: self.outputs.append(out))
        trainer.optimizer.register_step_post_hook(self._step)

    def _pre(self, module, args, kwargs):
        self.feedbacks.append(kwargs.get("feedback"))

    def _step(self, *_):
        self.steps += 1


def test_three_passes_each_step_the_optimizer_and_feed_back_the_previous_pass():
    net = tiny_net(out_channels=2)
    trainer = _trainer(net, passes=3)
    rec = _Recorder(net, trainer)
    trainer.run()
    iterations = 2
    assert rec.steps == 3 * iterations
    assert len(rec.feedbacks) == 3 * iterations
    for it in range(iterations):
        first, second, third = rec.feedbacks[3 * it : 3 * it + 3]
        assert first is None
        for fb, prev in ((second, rec.outputs[3 * it]), (third, rec.outputs[3 * it + 1])):
            assert isinstance(prev, MGRADOutput)
            for f, m, g in zip(fb, prev.msd, prev.grad):
                torch.testing.assert_close(f, net.feedback_weight * (g - m).detach(), rtol=0, atol=0)
    assert len(trainer.state.pass_losses) == 3


def test_one_pass_is_plain_training():
    net = tiny_net(out_channels=2)
    trainer = _trainer(net, passes=1)
    rec = _Recorder(net, trainer)
    trainer.run()
    assert rec.steps == 2 and rec.feedbacks == [None, None]


def test_engine_output_holds_what_monai_handlers_expect():
    net = tiny_net(out_channels=2)
    trainer = _trainer(net, passes=2)
    trainer.run()
    out = trainer.state.output  # decollated per sample
    assert len(out) == 2
    for item in out:
        assert item["image"].shape == (1, 32, 32)
        assert item["label"].shape == (1, 32, 32)
        assert item["pred"].shape == (2, 32, 32)
        assert torch.isfinite(torch.as_tensor(item["loss"]))
    mean = torch.stack(trainer.state.pass_losses).mean()
    torch.testing.assert_close(torch.as_tensor(out[0]["loss"]), mean)


def _assert_two_passes_train(**trainer_kwargs):
    net = tiny_net(out_channels=2)
    before = [p.detach().clone() for p in net.parameters()]
    trainer = _trainer(net, passes=2, **trainer_kwargs)
    trainer.run()
    assert all(torch.isfinite(loss) for loss in trainer.state.pass_losses)
    assert any(not torch.equal(b, p) for b, p in zip(before, net.parameters()))


def test_amp_trains_on_the_available_device():
    _assert_two_passes_train(amp=True)


@pytest.mark.parametrize("passes", [1, 3])
def test_a_network_without_feedback_takes_one_plain_step_a_batch_whatever_feedback_passes(passes):
    # feedback_passes means nothing to a baseline or a peer: a config that leaves it at MGRAD-UNet's 3
    # (full_size.json) must not train such a network three times on each batch
    net = BasicUNet(spatial_dims=2, in_channels=1, out_channels=2, features=(4, 4, 8, 8, 16, 4))
    trainer = _trainer(net, passes=passes)
    rec = _Recorder(net, trainer)
    trainer.run()
    assert rec.steps == 2 and rec.feedbacks == [None, None]  # two batches: two forwards, two steps
    assert len(trainer.state.pass_losses) == 1


def test_feedback_step_runs_in_monai_supervised_trainer_as_in_feedback_trainer():
    results = []
    for make in (
        lambda net, **kw: SupervisedTrainer(iteration_update=FeedbackStep(passes=3), **kw),
        lambda net, **kw: FeedbackTrainer(feedback_passes=3, **kw),
    ):
        torch.manual_seed(0)
        net = tiny_net(out_channels=2)
        trainer = make(
            net, device=CPU, max_epochs=1, train_data_loader=_loader(), network=net,
            optimizer=torch.optim.AdamW(net.parameters(), 1e-3), loss_function=MGRADLoss(),
        )  # fmt: skip
        rec = _Recorder(net, trainer)
        trainer.run()
        assert rec.steps == 6
        results.append([p.detach().clone() for p in net.parameters()])
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_a_network_brings_its_own_step():
    calls = []

    def own_step(engine, batchdata):  # e.g. a diffusion loss or an adversarial step
        calls.append(engine.state.iteration)
        return {"loss": torch.tensor(0.0)}

    net = tiny_net(out_channels=2)
    trainer = _trainer(net, passes=3, iteration_update=own_step)
    rec = _Recorder(net, trainer)
    trainer.run()
    assert calls == [1, 2] and rec.steps == 0 and trainer.step is own_step


def test_invalid_pass_count_is_rejected():
    with pytest.raises(ValueError, match="feedback_passes"):
        _trainer(tiny_net(out_channels=2), passes=0)


def test_tiny_network_learns_synthetic_disks_with_feedback_training():
    net = tiny_net(out_channels=2)
    train = DataLoader(synthetic_disks(64, seed=1), batch_size=8, shuffle=True)
    held_out = DataLoader(synthetic_disks(16, seed=2), batch_size=8)
    trainer = _trainer(net, passes=3, epochs=6, loader=train, lr=3e-3)
    post = Compose([AsDiscreted(keys="pred", argmax=True, to_onehot=2), AsDiscreted(keys="label", to_onehot=2)])
    evaluator = SupervisedEvaluator(
        device=CPU,
        val_data_loader=held_out,
        network=net,
        postprocessing=post,
        key_val_metric={"dice": MeanDice(include_background=False, output_transform=from_engine(["pred", "label"]))},
    )
    history = []
    trainer.add_event_handler(Events.EPOCH_COMPLETED, lambda e: history.append(float(e.state.output[0]["loss"])))
    trainer.run()
    evaluator.run()
    assert history[-1] < history[0]
    assert evaluator.state.metrics["dice"] > 0.9


@pytest.mark.compile
def test_compile_switch_trains_the_compiled_network():
    """About 6 minutes on 2 CPU cores (inductor compiles forward and backward, with and without feedback)."""
    _assert_two_passes_train(compile=True)


@pytest.mark.compile
def test_compile_loss_switch_gives_the_eager_losses_and_gradients():
    """The trainer's ``compile_loss``: the loss compiled, its values and gradients those of the eager loss.
    lr 0 keeps the weights, so every pass compares like with like (AdamW's first steps would turn
    rounding-level differences of the gradients into differences of the weights of about lr)."""
    runs = []
    for compile_loss in (False, True):
        torch.manual_seed(0)
        net = tiny_net(out_channels=2)
        trainer = _trainer(net, passes=2, lr=0.0, compile_loss=compile_loss)
        losses = []
        trainer.add_event_handler(Events.ITERATION_COMPLETED, lambda e: losses.extend(e.state.pass_losses))
        trainer.run()
        runs.append((trainer, torch.stack(losses), [p.grad.clone() for p in net.parameters() if p.grad is not None]))
    (eager, eager_losses, eager_grads), (compiled, compiled_losses, compiled_grads) = runs
    assert isinstance(compiled.loss_function, torch._dynamo.eval_frame.OptimizedModule)
    assert not isinstance(eager.loss_function, torch._dynamo.eval_frame.OptimizedModule)
    assert len(eager_losses) == 4 and not torch.allclose(eager_losses[0], eager_losses[2])  # two batches
    torch.testing.assert_close(compiled_losses, eager_losses, rtol=1e-5, atol=1e-6)
    assert len(compiled_grads) == len(eager_grads) > 0
    for a, b in zip(compiled_grads, eager_grads):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-5)


def _budgeted_run(minutes, epoch_seconds, epochs=10):
    """A real trainer under a ``TrainingBudget`` and a polynomial LR schedule, as train.json wires
    them. Each epoch's training time is set to ``epoch_seconds(epoch)`` as the epoch ends, before
    the budget reads it (ignite's own measurement replaced: the test holds on a loaded machine)."""
    from monai.handlers import LrScheduleHandler

    from mgrad_net.engines import TrainingBudget

    net = tiny_net(out_channels=2)
    trainer = _trainer(net, passes=1, epochs=epochs, loader=_loader(count=6, batch_size=2))
    scheduler = torch.optim.lr_scheduler.PolynomialLR(trainer.optimizer, total_iters=epochs, power=0.9)
    budget = TrainingBudget(minutes, lr_scheduler=scheduler)
    rates = []

    @trainer.on(Events.EPOCH_COMPLETED)
    def _clock(engine):
        engine.state.times["EPOCH_COMPLETED"] = epoch_seconds(engine.state.epoch)
        rates.append(trainer.optimizer.param_groups[0]["lr"])  # the rate the epoch trained at

    budget.attach(trainer)
    LrScheduleHandler(scheduler, print_lr=False).attach(trainer)
    trainer.run()
    return trainer, scheduler, budget, rates


def test_training_budget_cuts_max_epochs_and_the_schedule_to_the_epochs_that_fit():
    trainer, scheduler, budget, _ = _budgeted_run(3 / 60, lambda epoch: 1.0)  # 3 s of 1-second epochs
    assert trainer.state.max_epochs == 3 == trainer.state.epoch == scheduler.total_iters
    assert budget.spent == pytest.approx(3.0)
    # the schedule ends with the budget: after the last epoch's step the rate is 0 (poly decay)
    assert trainer.optimizer.param_groups[0]["lr"] == pytest.approx(0.0, abs=1e-12)


def test_a_slow_first_epoch_does_not_shorten_the_budgeted_run():
    # 20 s: the first epoch takes 10 (warm-up), the others 2; estimated from the first alone, 2 epochs would fit
    trainer, scheduler, budget, rates = _budgeted_run(20 / 60, lambda epoch: 10.0 if epoch == 1 else 2.0)
    assert trainer.state.epoch == trainer.state.max_epochs == 6 == scheduler.total_iters
    assert budget.spent == pytest.approx(20.0)  # the whole budget used
    # once the estimate settles (after epoch 2) the rate is the closed-form poly decay over the 6 epochs
    base = scheduler.base_lrs[0]
    assert rates[:2] == pytest.approx([base, base * 0.5**0.9])  # epoch 2 at the first estimate's (2 epochs)
    assert rates[2:] == pytest.approx([base * (1 - e / 6) ** 0.9 for e in range(2, 6)])
    assert trainer.optimizer.param_groups[0]["lr"] == pytest.approx(0.0, abs=1e-12)


def test_an_epoch_slowed_by_other_work_does_not_set_the_pace():
    # 20 s of 1-second epochs, the third slowed to 10 s (a test run beside it): the pace stays 1 s an epoch
    trainer, scheduler, budget, _ = _budgeted_run(20 / 60, lambda epoch: 10.0 if epoch == 3 else 1.0, epochs=30)
    assert trainer.state.epoch == trainer.state.max_epochs == 11 == scheduler.total_iters
    assert budget.spent == pytest.approx(20.0)
    assert trainer.optimizer.param_groups[0]["lr"] == pytest.approx(0.0, abs=1e-12)


def test_training_budget_stops_after_the_epoch_that_spends_it_when_epochs_slow_down():
    trainer, _, budget, _ = _budgeted_run(3.5 / 60, lambda epoch: 1.0 if epoch == 1 else 3.0)
    assert trainer.state.epoch == 2 and budget.spent == pytest.approx(4.0)


def test_training_budget_never_raises_max_epochs_over_the_commands():
    trainer, _, budget, _ = _budgeted_run(100 / 60, lambda epoch: 1.0, epochs=4)
    assert trainer.state.epoch == trainer.state.max_epochs == 4 and budget.fit > 4


def test_no_training_budget_leaves_the_schedule_alone():
    trainer, scheduler, _, _ = _budgeted_run(0, lambda epoch: 1.0, epochs=3)
    assert trainer.state.epoch == trainer.state.max_epochs == 3
    assert scheduler.total_iters == 3


@pytest.mark.parametrize("enabled", [True, False])
def test_evaluator_autocast_runs_the_forward_in_bf16_on_a_cpu_and_hands_float32_on(enabled):
    from mgrad_net.engines import EvaluatorAutocast

    net = tiny_net(out_channels=2).eval()
    inside = []  # the dtype a convolution produced, as the network ran
    net.encoder[0].register_forward_hook(lambda m, a, out: inside.append(out.dtype))
    seen = []  # the prediction postprocessing receives
    post = Compose([lambda d: seen.append(d["pred"].dtype) or d])
    evaluator = SupervisedEvaluator(
        device=CPU, val_data_loader=_loader(count=2, batch_size=1), network=net, postprocessing=post
    )
    EvaluatorAutocast(CPU, enabled).attach(evaluator)
    evaluator.run()
    assert inside == [torch.bfloat16 if enabled else torch.float32] * 2
    assert seen == [torch.float32] * 2
    assert not torch.is_autocast_enabled("cpu")  # left after the forward, not at the run's end
