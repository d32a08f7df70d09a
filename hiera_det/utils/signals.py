"""The signals a cluster sends a job it is about to stop, and keeping them from processes that
must not act on them.

SLURM sends SIGTERM when it preempts or cancels a job (and, with ``--signal=USR1@90``, SIGUSR1
before the time limit); Kubernetes and torchrun's elastic agent send SIGTERM. A training process
that handles them stops at the end of its iteration and saves (`hiera_det.engine.hooks.
StopForResume`). Its data loader workers must not: SLURM signals every process of a job step, and
PyTorch's workers die on SIGTERM (their C handler re-raises it), which makes the main process
raise "DataLoader worker ... is killed by signal" at once instead of saving. `blocked` keeps the
signals blocked while the workers are forked: a forked process inherits the signal mask of the
thread that forks it, so the workers never receive them (SIGKILL still ends them, and PyTorch
shuts them down as usual when the main process is done).
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterable, Iterator

__all__ = ["WORKER_BLOCKED_SIGNALS", "blocked", "parse_signals"]

# The signals clusters use to announce a stop; never delivered to data loader workers.
WORKER_BLOCKED_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2)


def parse_signals(names: Iterable[str | int]) -> tuple[signal.Signals, ...]:
    """Signal names ("SIGTERM", "TERM", "USR1") or numbers -> `signal.Signals`; a ValueError names
    one that is not a signal of this system, or SIGKILL/SIGSTOP (which cannot be handled)."""
    parsed = []
    for name in names:
        try:
            if isinstance(name, int):
                sig = signal.Signals(name)
            else:
                key = name.upper()
                sig = signal.Signals[key if key.startswith("SIG") else f"SIG{key}"]
        except (KeyError, ValueError):
            raise ValueError(f"train.stop_signals: {name!r} is not a signal name") from None
        if sig in (signal.SIGKILL, signal.SIGSTOP):
            raise ValueError(f"train.stop_signals: {sig.name} cannot be caught")
        parsed.append(sig)
    return tuple(dict.fromkeys(parsed))


@contextlib.contextmanager
def blocked(signals: Iterable[int] = WORKER_BLOCKED_SIGNALS) -> Iterator[None]:
    """Block `signals` in the calling thread for the block (a no-op outside the main thread, where
    processes are not forked by the training loop). A signal that arrives meanwhile is delivered
    when the block ends, or at once to another thread of the process."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, signals)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)
