"""A hook for the end-to-end reliability tests: Detectron2's metrics.json holds losses smoothed
over 20 iterations (a resumed run restarts that window), so tests compare raw per-step values."""

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
