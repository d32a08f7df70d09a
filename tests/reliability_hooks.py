"""Hooks for the end-to-end reliability tests. `RawLossWriter`: Detectron2's metrics.json holds
losses smoothed over 20 iterations (a resumed run restarts that window), so tests compare raw
per-step values. `TruncateFile`: breaks an image after the check before the run."""

from __future__ import annotations

import json

from detectron2.engine import HookBase
from detectron2.utils import comm


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
