"""Training hooks (hiera_det.engine.hooks): per-step seeding with the seed checkpointed, and the
guards that stop a run before a checkpoint would store non-finite weights."""

from __future__ import annotations

import itertools
import json
import os
import signal
from types import SimpleNamespace

import pytest
import torch
from detectron2.engine import SimpleTrainer, hooks
from detectron2.utils.events import EventStorage
from torch import nn

from hiera_det.checkpoint import HieraCheckpointer
from hiera_det.engine import hooks as hooks_module
from hiera_det.engine.hooks import (
    STOPPED_EXIT_CODE,
    DeterministicSteps,
    FiniteParametersCheck,
    StopForResume,
    TrainingStopped,
)
from hiera_det.utils import signals
from hiera_det.utils.signals import parse_signals


class _NaNGradient(torch.autograd.Function):
    """0 forward, NaN gradient backward: an update that overflows with a finite loss."""

    @staticmethod
    def forward(ctx, x):
        return x.new_zeros(())

    @staticmethod
    def backward(ctx, grad):
        return torch.full((1, 2), float("nan"))


class _Toy(nn.Module):
    """A linear model whose loss becomes NaN at `nan_loss_at`, or whose weight becomes NaN after
    the step of `nan_weight_at` (a finite loss with an overflowing update)."""

    def __init__(self, nan_loss_at=None, nan_weight_at=None):
        super().__init__()
        self.linear = nn.Linear(2, 1)
        self.nan_loss_at, self.nan_weight_at = nan_loss_at, nan_weight_at
        self.calls = 0

    def forward(self, batch):
        self.calls += 1
        loss = self.linear(torch.stack(batch)).pow(2).mean() + 0.01 * torch.rand(())
        if self.calls - 1 == self.nan_loss_at:
            loss = loss * float("nan")
        if self.calls - 1 == self.nan_weight_at:
            loss = loss + _NaNGradient.apply(self.linear.weight)  # finite loss, NaN gradient
        return {"loss": loss}


def _train(tmp_path, model, max_iter, period=2, seed=3):
    tmp_path.mkdir(exist_ok=True)
    data = itertools.cycle([[torch.ones(2), torch.zeros(2)]])
    trainer = SimpleTrainer(model, data, torch.optim.SGD(model.parameters(), lr=0.1))
    checkpointer = HieraCheckpointer(model, str(tmp_path), trainer=trainer)
    trainer.register_hooks(
        [
            DeterministicSteps(seed),
            FiniteParametersCheck(period),
            hooks.PeriodicCheckpointer(checkpointer, period),
        ]
    )
    trainer.train(0, max_iter)
    return trainer


def _last_checkpoint(tmp_path) -> str:
    return (tmp_path / "last_checkpoint").read_text().strip()


def test_nonfinite_loss_stops_before_the_checkpoint(tmp_path):
    with pytest.raises(FloatingPointError, match="Loss became infinite or NaN at iteration=5"):
        _train(tmp_path, _Toy(nan_loss_at=5), max_iter=10)
    assert _last_checkpoint(tmp_path) == "model_0000003.pth"
    saved = torch.load(tmp_path / "model_0000003.pth", weights_only=True)
    assert saved["iteration"] == 3 and all(v.isfinite().all() for v in saved["model"].values())
    assert not (tmp_path / "model_0000005.pth").exists()


def test_nonfinite_weights_stop_before_the_checkpoint(tmp_path):
    with pytest.raises(FloatingPointError, match="after iteration 5 .*linear.weight"):
        _train(tmp_path, _Toy(nan_weight_at=5), max_iter=10)
    assert _last_checkpoint(tmp_path) == "model_0000003.pth"
    assert sorted(os.listdir(tmp_path)) == [
        "last_checkpoint",
        "model_0000001.pth",
        "model_0000003.pth",
    ]


def test_steps_are_seeded_by_iteration_and_the_seed_is_checkpointed(tmp_path):
    class Recorder(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.zeros(()))
            self.draws = []

        def forward(self, batch):
            self.draws.append(float(torch.rand(())))
            return {"loss": self.w**2}

    first = Recorder()
    with EventStorage():
        trainer = _train(tmp_path / "a", first, max_iter=6, seed=-1)
    seed = trainer.state_dict()["hooks"]["DeterministicSteps"]["seed"]
    assert seed >= 0
    # Resume from iteration 3 with another configured seed: the checkpointed one wins.
    resumed = Recorder()
    data = itertools.cycle([[torch.ones(2)]])
    trainer = SimpleTrainer(resumed, data, torch.optim.SGD(resumed.parameters(), lr=0.1))
    trainer.register_hooks([DeterministicSteps(seed=99)])
    HieraCheckpointer(resumed, str(tmp_path / "a"), trainer=trainer).load(
        str(tmp_path / "a" / "model_0000003.pth")
    )
    trainer.train(4, 6)
    assert resumed.draws == first.draws[4:]


# --- StopForResume: a stop signal or a time budget ends the run with a checkpoint ----------------


class _SignalAt(nn.Module):
    """A model that sends this process `signum` during step `at` (as a cluster would)."""

    def __init__(self, at: int, signum: int = signal.SIGUSR1):
        super().__init__()
        self.w = nn.Parameter(torch.ones(()))
        self.at, self.signum, self.calls = at, signum, 0

    def forward(self, batch):
        if self.calls == self.at:
            os.kill(os.getpid(), self.signum)
        self.calls += 1
        return {"loss": self.w**2}


def _stop_trainer(tmp_path, model, max_iter, period=100, **stop):
    data = itertools.cycle([[torch.ones(2)]])
    trainer = SimpleTrainer(model, data, torch.optim.SGD(model.parameters(), lr=0.1))
    periodic = hooks.PeriodicCheckpointer(
        HieraCheckpointer(model, str(tmp_path), trainer=trainer), period
    )
    trainer.register_hooks([periodic, StopForResume(periodic, **stop)])
    return trainer


@pytest.mark.parametrize("signum", [signal.SIGUSR1, signal.SIGTERM])
def test_a_stop_signal_saves_the_iteration_reached_and_raises(tmp_path, signum):
    previous = signal.getsignal(signum)
    trainer = _stop_trainer(tmp_path, _SignalAt(3, signum), max_iter=10)
    with pytest.raises(TrainingStopped, match=rf"after iteration 3 \({signum.name}\)") as stop:
        trainer.train(0, 10)
    assert stop.value.iteration == 3
    assert _last_checkpoint(tmp_path) == "model_0000003.pth"
    assert torch.load(tmp_path / "model_0000003.pth", weights_only=True)["iteration"] == 3
    # Ignored from then on: a second signal must not end the process before it exits with 75.
    assert signal.getsignal(signum) == signal.SIG_IGN
    signal.signal(signum, previous)
    assert STOPPED_EXIT_CODE == 75


def test_a_periodic_checkpoint_of_the_iteration_is_not_written_twice(tmp_path):
    trainer = _stop_trainer(tmp_path, _SignalAt(3), max_iter=10, period=2)
    with pytest.raises(TrainingStopped):
        trainer.train(0, 10)
    assert sorted(os.listdir(tmp_path)) == [
        "last_checkpoint", "model_0000001.pth", "model_0000003.pth",
    ]  # fmt: skip


def test_a_signal_in_the_last_iteration_lets_the_run_end(tmp_path):
    previous = signal.getsignal(signal.SIGUSR1)
    trainer = _stop_trainer(tmp_path, _SignalAt(4), max_iter=5)
    trainer.train(0, 5)  # no TrainingStopped: the run has ended anyway
    signal.signal(signal.SIGUSR1, previous)
    assert _last_checkpoint(tmp_path) == "model_final.pth"


def test_no_signal_changes_nothing(tmp_path):
    previous = signal.getsignal(signal.SIGTERM)
    trainer = _stop_trainer(tmp_path, _SignalAt(99), max_iter=5)
    trainer.train(0, 5)
    assert signal.getsignal(signal.SIGTERM) == previous  # handlers restored after training
    assert sorted(os.listdir(tmp_path)) == ["last_checkpoint", "model_final.pth"]


def test_a_time_budget_stops_before_the_next_step_would_pass_it(tmp_path, monkeypatch):
    """Iterations take 5 s of a fake clock (read when training starts and after each step); a
    100 s budget with 25 s kept for the exit: after the step ending at 75 s another one would
    end at 80 s, too late, so the run stops after that one (iteration 14)."""
    clock = iter(range(0, 10**6, 5))
    monkeypatch.setattr(hooks_module, "time", SimpleNamespace(monotonic=lambda: next(clock)))
    trainer = _stop_trainer(tmp_path, _SignalAt(99), max_iter=100, max_hours=100 / 3600,
                            margin_s=25)  # fmt: skip
    with pytest.raises(TrainingStopped, match="train.max_hours=.* is nearly spent") as stop:
        trainer.train(0, 100)
    assert stop.value.iteration == 14
    assert _last_checkpoint(tmp_path) == "model_0000014.pth"


@pytest.mark.parametrize(
    "names, message",
    [(["SIGTERM", "usr1", 12], None), (["SIGTERMX"], "'SIGTERMX' is not a signal name"),
     (["SIGKILL"], "SIGKILL cannot be caught")],
)  # fmt: skip
def test_stop_signals_are_parsed_and_bad_ones_named(names, message):
    if message is None:
        assert parse_signals(names) == (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2)
        return
    with pytest.raises(ValueError, match=rf"train.stop_signals: {message}"):
        parse_signals(names)


def test_signals_are_blocked_in_the_block_only():
    """What forked processes inherit: the stop signals blocked while inside the block."""
    with signals.blocked():
        inside = signal.pthread_sigmask(signal.SIG_BLOCK, [])
    outside = signal.pthread_sigmask(signal.SIG_BLOCK, [])
    assert set(signals.WORKER_BLOCKED_SIGNALS) <= inside
    assert not set(signals.WORKER_BLOCKED_SIGNALS) & outside


def test_best_checkpointer_of_a_resumed_run_starts_from_the_best_logged(tmp_path):
    """The best value logged up to the iteration resumed from (lines cut by a kill skipped, later
    iterations ignored) is the one to beat; `model_best.pth` is written beside the run's files
    without moving last_checkpoint."""
    from hiera_det.checkpoint import SideCheckpointer
    from hiera_det.engine.hooks import BestCheckpointer

    rows = [{"iteration": 1, "bbox/AP": 3.0}, {"iteration": 2, "total_loss": 1.0},
            {"iteration": 3, "bbox/AP": 5.0}, {"iteration": 5, "bbox/AP": 4.0},
            {"iteration": 7, "bbox/AP": 9.0}]  # fmt: skip
    lines = [json.dumps(r) for r in rows] + ['{"iteration": 8, "bbox/A']
    (tmp_path / "metrics.json").write_text("\n".join(lines))
    (tmp_path / "last_checkpoint").write_text("model_0000005.pth")
    model = nn.Linear(2, 2)

    def hook_at(iteration: int) -> BestCheckpointer:
        hook = BestCheckpointer(
            2, SideCheckpointer(model, str(tmp_path)), "bbox/AP",
            metrics_file=str(tmp_path / "metrics.json"),
        )  # fmt: skip
        hook.trainer = SimpleNamespace(iter=iteration)
        hook.before_train()
        return hook

    assert hook_at(6).best_metric is None  # no model_best.pth yet: nothing to protect
    hook_at(6)._checkpointer.save("model_best")
    assert (tmp_path / "model_best.pth").is_file()
    assert (tmp_path / "last_checkpoint").read_text() == "model_0000005.pth"
    hook = hook_at(6)
    assert (hook.best_metric, hook.best_iter) == (5.0, 3)
    assert hook_at(0).best_metric is None  # a run from the start knows no best
