"""The one training loop (train.py) on a hand-made problem: the schedule's values, micro-batches
equal one big batch, the NaN guard, resume after a kill.
Run: python -m pytest -q tests/test_train.py   (CPU, seconds)"""

import os

import pytest
import torch

from common import load_state
from train import Plan, fit, lr_at, make_optimizer

X = torch.linspace(-1, 1, 16)[:, None].repeat(1, 3) * torch.tensor([1.0, -2.0, 0.5])
Y = X @ torch.tensor([0.3, 0.1, -0.4]) + 0.2


def test_lr_schedule_by_hand():
    assert lr_at(0, 100, 1.0, 10) == pytest.approx(0.1)  # warmup: (step + 1) / warmup
    assert lr_at(9, 100, 1.0, 10) == pytest.approx(1.0)
    assert lr_at(10, 100, 1.0, 10) == pytest.approx(1.0)  # the cosine starts at the peak...
    assert lr_at(55, 100, 1.0, 10) == pytest.approx(0.55)  # ...is halfway at the middle...
    assert lr_at(100, 100, 1.0, 10) == pytest.approx(0.1)  # ...and ends at 10% of it
    # restart=100: [0, 100) and [100, 200) are two such schedules, each with its warmup
    assert lr_at(55, 200, 1.0, 10, restart=100) == pytest.approx(0.55)
    assert lr_at(100, 200, 1.0, 10, restart=100) == pytest.approx(0.1)
    assert lr_at(109, 200, 1.0, 10, restart=100) == pytest.approx(1.0)
    assert lr_at(155, 200, 1.0, 10, restart=100) == pytest.approx(0.55)


def _train(tmp_path, name, accum, steps=5, loss_hook=None):
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 1)
    opt = make_optimizer(model, 0.1)
    part = len(X) // accum

    def batch_fn(step, micro):  # micro-batch `micro` of the step's batch (the whole set)
        return (X[micro * part:(micro + 1) * part], Y[micro * part:(micro + 1) * part]), "mse"

    def loss_fn(b):  # this micro-batch's share of the step's mean squared error
        loss = ((model(b[0])[:, 0] - b[1]) ** 2).sum() / len(X)
        return loss_hook(loss) if loss_hook else loss

    path = str(tmp_path / f"{name}.pt")
    settings = {"accum": accum}
    fit(batch_fn, loss_fn, opt, list(model.parameters()), {"model": model}, Plan(steps, 0.1, 1, accum=accum, ckpt_every=1),
        path, "test_state", settings, load_state(path, "test_state", settings))
    return model


def test_a_restart_is_a_second_run_with_fresh_moments(tmp_path):
    """Plan(restart=3) over 5 steps = 3 steps, then a new optimizer and a 2-step run from there:
    the same weights (the schedule restarts, and so do AdamW's moments)."""
    def run(model, steps, restart=0, first=0):
        opt = make_optimizer(model, 0.1)
        fit(lambda step, micro: ((X[step + first:], Y[step + first:]), "mse"),  # data by absolute step
            lambda b: ((model(b[0])[:, 0] - b[1]) ** 2).mean(), opt, list(model.parameters()), {"model": model},
            Plan(steps, 0.1, 2, restart=restart, ckpt_every=100), str(tmp_path / f"{steps}{restart}{first}.pt"),
            "test_state", {})
        return opt
    torch.manual_seed(0)
    one, two = torch.nn.Linear(3, 1), torch.nn.Linear(3, 1)
    two.load_state_dict(one.state_dict())
    opt = run(one, 5, restart=3)
    run(two, 3)
    run(two, 2, first=3)
    assert torch.allclose(one.weight, two.weight, atol=1e-7) and torch.allclose(one.bias, two.bias, atol=1e-7)
    assert all(float(st["step"]) == 2 for st in opt.state.values())  # counted from the restart


def test_resume_at_the_restart_equals_an_uninterrupted_run(tmp_path):
    """Killed in the first step after the restart: the state saved just before it holds the first
    phase's moments, and the resumed run clears them there, as the uninterrupted one did."""
    def run(name, hook=lambda: None):
        torch.manual_seed(0)
        model = torch.nn.Linear(3, 1)
        path, settings = str(tmp_path / f"{name}.pt"), {}

        def loss_fn(b):
            hook()
            return ((model(b[0])[:, 0] - b[1]) ** 2).mean()
        fit(lambda step, micro: ((X[step:], Y[step:]), "mse"), loss_fn, make_optimizer(model, 0.1),
            list(model.parameters()), {"model": model}, Plan(5, 0.1, 2, restart=3, ckpt_every=1), path, "test_state",
            settings, load_state(path, "test_state", settings))
        return model
    full, calls = run("full"), []

    def die_in_step_3():
        calls.append(1)
        if len(calls) == 4:
            raise KeyboardInterrupt
    with pytest.raises(KeyboardInterrupt):
        run("cut", die_in_step_3)
    assert torch.load(str(tmp_path / "cut.pt"), weights_only=True)["step"] == 3
    cut = run("cut")
    assert torch.equal(full.weight, cut.weight) and torch.equal(full.bias, cut.bias)


def test_micro_batches_equal_one_batch(tmp_path):
    a, b = _train(tmp_path, "one", 1), _train(tmp_path, "four", 4)
    assert torch.allclose(a.weight, b.weight, atol=1e-6) and torch.allclose(a.bias, b.bias, atol=1e-6)
    assert not torch.allclose(a.bias, torch.nn.Linear(3, 1).bias)  # it trained


def test_nan_loss_stops_with_one_line(tmp_path):
    with pytest.raises(ValueError, match=r"loss is nan at step 0 \(mse\)"):
        _train(tmp_path, "nan", 1, loss_hook=lambda loss: loss * float("nan"))


def test_resume_after_a_kill_equals_an_uninterrupted_run(tmp_path):
    full = _train(tmp_path, "full", 2)
    calls = []

    def die_in_step_3(loss):
        calls.append(1)
        if len(calls) == 2 * 3 + 1:  # the first micro-batch of step 3 (0-based)
            raise KeyboardInterrupt
        return loss

    with pytest.raises(KeyboardInterrupt):
        _train(tmp_path, "cut", 2, loss_hook=die_in_step_3)
    assert torch.load(os.path.join(tmp_path, "cut.pt"), weights_only=True)["step"] == 3
    cut = _train(tmp_path, "cut", 2)
    assert torch.equal(full.weight, cut.weight) and torch.equal(full.bias, cut.bias)


def test_evaluation_time_is_not_training_time(tmp_path):
    """The learning curve's x axis: evaluate(step, seconds) sees training seconds only, and the
    seconds fit returns leave out the evaluations too (each here sleeps 0.3 s)."""
    import time
    model = torch.nn.Linear(3, 1)
    seen = []

    def evaluate(step, seconds):
        seen.append((step, seconds))
        time.sleep(0.3)
        return {}

    _, seconds, _ = fit(lambda step, micro: ((X, Y), "mse"), lambda b: ((model(b[0])[:, 0] - b[1]) ** 2).mean(),
                        make_optimizer(model, 0.1), list(model.parameters()), {"model": model},
                        Plan(4, 0.1, 1, ckpt_every=100, eval_every=1), str(tmp_path / "s.pt"), "test_state", {},
                        evaluate=evaluate)
    assert [s for s, _ in seen] == [1, 2, 3]  # every eval_every steps, not at the end
    assert all(0 <= a < b for (_, a), (_, b) in zip(seen, seen[1:]))
    assert seconds < 0.3 and seen[-1][1] <= seconds


def test_lr_scale_moves_a_group_faster(tmp_path):
    """Adam's first step moves every weight by lr x sign(gradient); with lr_scale {"bias": 3} the bias
    moves 3 x as far (weight decay 0, warmup 1: the first step is at the peak lr 0.1)."""
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 1)
    w0, b0 = model.weight.detach().clone(), model.bias.detach().clone()
    opt = make_optimizer(model, 0.1, lr_scale={"bias": 3.0})
    fit(lambda step, micro: ((X, Y), "mse"), lambda b: ((model(b[0])[:, 0] - b[1]) ** 2).mean(), opt,
        list(model.parameters()), {"model": model}, Plan(1, 0.1, 1, clip=None, ckpt_every=100),
        str(tmp_path / "s.pt"), "test_state", {})
    assert torch.allclose((model.weight - w0).abs(), torch.full((1, 3), 0.1), atol=1e-6)
    assert torch.allclose((model.bias - b0).abs(), torch.tensor([0.3]), atol=1e-6)
