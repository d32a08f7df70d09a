"""Hooks that end-to-end tests give train_net.py runs: Detectron2's metrics.json holds losses
smoothed over 20 iterations (a resumed run restarts that window), so tests compare raw per-step
values; the weights a run starts from are saved to measure how far training moved them; a hook
that kills a torchrun worker once; and one that breaks an image after the check before the run."""

from __future__ import annotations

import json
import os
import signal

import torch
from detectron2.engine import HookBase
from detectron2.utils import comm

from hiera_det.engine.evaluation import FastCOCOEvaluator


class RawLossWriter(HookBase):
    """Append ``{"iteration": i, "total_loss": ..., "loss_*": ...}`` per step to `path` (jsonl),
    from the main process (which holds the losses averaged over processes)."""

    def __init__(self, path: str):
        self.path = path

    def after_step(self) -> None:
        if not comm.is_main_process():
            return
        storage = self.trainer.storage
        row = {"iteration": self.trainer.iter}
        for key, (value, it) in storage.latest().items():
            if (key == "total_loss" or key.startswith("loss")) and it == self.trainer.iter:
                row[key] = value
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")


class InitialWeightsWriter(HookBase):
    """Save the model's weights before the first step of a run started at iteration 0 (the
    weights every process starts from: DDP copies rank 0's) to `path`, from the main process."""

    def __init__(self, path: str):
        self.path = path

    def before_train(self) -> None:
        if not comm.is_main_process() or self.trainer.start_iter != 0:
            return
        model = getattr(self.trainer.model, "module", self.trainer.model)  # DDP
        torch.save(model.state_dict(), self.path)


class KillFirstWorkerGroupOnce(HookBase):
    """SIGKILL the process of `rank` before step `iteration`, in torchrun's first worker group only
    (``TORCHELASTIC_RESTART_COUNT`` 0): a worker dying mid-run, as a lost machine would."""

    def __init__(self, iteration: int, rank: int):
        self.iteration, self.rank = iteration, rank

    def before_step(self) -> None:
        first_group = os.environ.get("TORCHELASTIC_RESTART_COUNT") == "0"
        if first_group and self.trainer.iter == self.iteration and comm.get_rank() == self.rank:
            os.kill(os.getpid(), signal.SIGKILL)


class TruncateFile(HookBase):
    """Cut `path` to a third of its bytes before the first step: a test image that read at the
    check before the run and no longer reads when it is evaluated."""

    def __init__(self, path: str):
        self.path = path

    def before_train(self) -> None:
        with open(self.path, "rb") as f:
            data = f.read()
        with open(self.path, "wb") as f:
            f.write(data[: len(data) // 3])


class PidWriter(HookBase):
    """Write this process's pid to ``folder/pid_<rank>.txt`` before training (for tests that
    signal one process of a run)."""

    def __init__(self, folder: str):
        self.folder = folder

    def before_train(self) -> None:
        path = os.path.join(self.folder, f"pid_{comm.get_rank()}.txt")
        with open(path + ".tmp", "w") as f:
            f.write(str(os.getpid()))
        os.replace(path + ".tmp", path)


class SignalDuringEvaluation(FastCOCOEvaluator):
    """The configs' evaluator, which sends this process SIGTERM when it is given the first
    image's predictions: a stop signal that arrives while the run evaluates."""

    def process(self, inputs, outputs) -> None:
        if not getattr(self, "_signalled", False):
            self._signalled = True
            os.kill(os.getpid(), signal.SIGTERM)
        super().process(inputs, outputs)
