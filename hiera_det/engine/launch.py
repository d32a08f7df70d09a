"""Start train_net.py's workers the way clusters start PyTorch: torchrun, SLURM's srun, or
Detectron2's own spawning.

A launcher that starts every process itself (``torchrun``, and through it Kubernetes PyTorchJob or
TorchX; ``srun``) says in environment variables which process this is. `launch_from_args` reads
them (`find_launcher_env`), joins that process group and sets up what Detectron2's
`detectron2.engine.launch` sets up in each worker it spawns: the per-machine process group
(`comm.create_local_process_group`, behind `comm.get_local_rank` and per-machine SyncBN), one GPU
per local rank (NCCL) or gloo on the CPU. Without such variables it is Detectron2's `launch` with
``--num-gpus/--num-machines/--machine-rank/--dist-url``. Giving both stops with a message.

torchrun's variables: ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``LOCAL_WORLD_SIZE``,
``MASTER_ADDR``, ``MASTER_PORT`` (init through ``env://``, which also finds torchrun's own store).
SLURM's, in a task of an ``srun`` step (``SLURM_STEP_ID`` set): ``SLURM_PROCID``,
``SLURM_STEP_NUM_TASKS`` (or ``SLURM_NTASKS``), ``SLURM_LOCALID``, ``SLURM_STEP_TASKS_PER_NODE``
(or ``SLURM_TASKS_PER_NODE``/``SLURM_NTASKS_PER_NODE``); the address is ``MASTER_ADDR`` or the
first host of ``SLURM_STEP_NODELIST`` (or ``SLURM_JOB_NODELIST``/``SLURM_NODELIST``), the port
``MASTER_PORT`` or one derived from ``SLURM_JOB_ID`` (`slurm_default_port`), so that every task of
the job computes the same one. A SLURM step of one task is one process, as without SLURM, so that
``srun --ntasks-per-node=1 ... --num-gpus 8`` keeps using Detectron2's spawning.

Two runs must never share an output folder: `check_in_launcher_group` (at the start of ``main``)
stops a process that the environment places in a group of several but that is not in it.
Under ``torchrun --max-restarts=K``, or when SLURM requeues a job, `resume_after_restart` makes
the restarted run go on from the folder's last checkpoint, as ``--resume`` does. While
Detectron2's `launch` spawns the workers, the spawning process passes SIGTERM and SIGUSR1 on to
them and exits with their "stopped to be resumed" status. docs/distributed.md has the commands.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import multiprocessing
import os
import re
import signal
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
from detectron2.engine import default_argument_parser, launch
from detectron2.engine.launch import DEFAULT_TIMEOUT
from detectron2.utils import comm
from torch.multiprocessing import ProcessExitedException

from .hooks import STOPPED_EXIT_CODE

__all__ = [
    "LaunchError",
    "LauncherEnv",
    "check_in_launcher_group",
    "find_launcher_env",
    "first_slurm_host",
    "join_launcher_group",
    "launch_from_args",
    "local_gpu",
    "resume_after_restart",
    "slurm_default_port",
]

logger = logging.getLogger(__name__)

TORCHRUN_VARIABLES = (
    "RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
)  # fmt: skip
# Detectron2's spawning flags (default_argument_parser) that a launcher's environment replaces.
DETECTRON2_LAUNCH_FLAGS = {
    "num_gpus": "--num-gpus",
    "num_machines": "--num-machines",
    "machine_rank": "--machine-rank",
    "dist_url": "--dist-url",
}


class LaunchError(RuntimeError):
    """The launcher's environment or the command-line flags cannot start a consistent run."""


@dataclass(frozen=True)
class LauncherEnv:
    """Which process this is, as an external launcher says.

    Args:
        launcher: who said it, for messages ("torchrun", "SLURM").
        rank, world_size: this process in the whole run.
        local_rank, local_world_size: this process among those of its machine.
        init_method: `torch.distributed.init_process_group`'s ``init_method``.
    """

    launcher: str
    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    init_method: str

    def __post_init__(self) -> None:
        where = f"{self.launcher}'s environment"
        if not 0 <= self.rank < self.world_size:
            raise LaunchError(f"{where}: rank {self.rank} is not in [0, {self.world_size})")
        if not 0 <= self.local_rank < self.local_world_size:
            raise LaunchError(
                f"{where}: local rank {self.local_rank} is not in [0, {self.local_world_size})"
            )
        # Detectron2's per-machine groups (comm.create_local_process_group) take consecutive ranks
        # and the same number of processes on every machine.
        if self.world_size % self.local_world_size or (
            self.rank % self.local_world_size != self.local_rank
        ):
            raise LaunchError(
                f"{where}: rank {self.rank} of {self.world_size} with local rank "
                f"{self.local_rank} of {self.local_world_size} is not one of equal blocks of "
                "consecutive ranks per machine; start the same number of processes on every "
                "machine (torchrun --nproc_per_node, srun --ntasks-per-node)"
            )


def _integer(environ: Mapping[str, str], name: str) -> int:
    value = environ[name]
    try:
        return int(value)
    except ValueError:
        raise LaunchError(f"environment variable {name}={value!r} is not an integer") from None


def _torchrun_env(environ: Mapping[str, str]) -> LauncherEnv:
    missing = [name for name in TORCHRUN_VARIABLES if name not in environ]
    if missing:
        present = [f"{n}={environ[n]}" for n in TORCHRUN_VARIABLES if n in environ]
        raise LaunchError(
            f"the environment sets {', '.join(present)} but not {', '.join(missing)}: a launcher "
            "that starts the processes itself must set all of "
            f"{', '.join(TORCHRUN_VARIABLES)} (torchrun does); for one process per machine "
            "LOCAL_RANK=0 and LOCAL_WORLD_SIZE=1"
        )
    return LauncherEnv(
        launcher="torchrun" if "TORCHELASTIC_RUN_ID" in environ else "the launcher",
        rank=_integer(environ, "RANK"),
        world_size=_integer(environ, "WORLD_SIZE"),
        local_rank=_integer(environ, "LOCAL_RANK"),
        local_world_size=_integer(environ, "LOCAL_WORLD_SIZE"),
        init_method="env://",
    )


def first_slurm_host(nodelist: str) -> str:
    """The first host of a SLURM hostlist: ``"gpu[07-09,12],cpu1"`` -> ``"gpu07"`` (what
    ``scontrol show hostnames`` prints first; zero padding kept)."""
    match = re.fullmatch(r"([^,\[]+)(?:\[([^\]]+)\])?([^,]*)(?:,.*)?", nodelist.strip())
    if not match:
        raise LaunchError(f"cannot read the SLURM node list {nodelist!r}")
    prefix, ranges, suffix = match.groups()
    first = ranges.split(",")[0].split("-")[0] if ranges else ""
    return prefix + first + suffix


def slurm_default_port(job_id: int) -> int:
    """A port every task of SLURM job `job_id` computes alike: 15000 + job_id mod 20000 (above
    the registered ports, below Linux's ephemeral range 32768+ ... 35000 at most)."""
    return 15000 + job_id % 20000


def _tasks_per_node(environ: Mapping[str, str]) -> int:
    """SLURM's tasks per node (``"4(x2)"`` = 4 on each of 2 nodes); the same on every node."""
    for name in ("SLURM_STEP_TASKS_PER_NODE", "SLURM_TASKS_PER_NODE", "SLURM_NTASKS_PER_NODE"):
        if name in environ:
            counts = {re.sub(r"\(x\d+\)$", "", part) for part in environ[name].split(",")}
            if len(counts) != 1 or not next(iter(counts)).isdigit():
                raise LaunchError(
                    f"{name}={environ[name]!r}: hiera_det needs the same number of tasks on every "
                    "node (srun --ntasks-per-node=G)"
                )
            return int(counts.pop())
    raise LaunchError("SLURM sets no SLURM_STEP_TASKS_PER_NODE / SLURM_TASKS_PER_NODE")


def _slurm_env(environ: Mapping[str, str]) -> LauncherEnv:
    tasks = "SLURM_STEP_NUM_TASKS" if "SLURM_STEP_NUM_TASKS" in environ else "SLURM_NTASKS"
    for name in ("SLURM_PROCID", tasks, "SLURM_LOCALID"):
        if name not in environ:
            raise LaunchError(f"this srun task's environment has no {name}")
    world_size = _integer(environ, tasks)
    if "MASTER_ADDR" in environ:
        address = environ["MASTER_ADDR"]
    else:
        nodelists = ("SLURM_STEP_NODELIST", "SLURM_JOB_NODELIST", "SLURM_NODELIST")
        nodelist = next((environ[n] for n in nodelists if n in environ), None)
        if nodelist is None:
            raise LaunchError(f"SLURM sets none of {', '.join(nodelists)} and no MASTER_ADDR")
        address = first_slurm_host(nodelist)
    if "MASTER_PORT" in environ:
        port = _integer(environ, "MASTER_PORT")
    elif "SLURM_JOB_ID" in environ:
        port = slurm_default_port(_integer(environ, "SLURM_JOB_ID"))
    else:
        raise LaunchError("SLURM sets no SLURM_JOB_ID to derive a port from; set MASTER_PORT")
    return LauncherEnv(
        launcher="SLURM",
        rank=_integer(environ, "SLURM_PROCID"),
        world_size=world_size,
        local_rank=_integer(environ, "SLURM_LOCALID"),
        local_world_size=_tasks_per_node(environ) if world_size > 1 else 1,
        init_method=f"tcp://{address}:{port}",
    )


def find_launcher_env(environ: Mapping[str, str] | None = None) -> LauncherEnv | None:
    """The process group an external launcher placed this process in, or None when none did.

    torchrun's variables (``RANK`` or ``WORLD_SIZE`` set) come first: ``srun torchrun ...`` is
    torchrun's group. Then a task of an ``srun`` step with more than one task. A SLURM batch
    script itself (``sbatch`` without ``srun``) is one process, whatever ``SLURM_NTASKS`` says
    (`launch_from_args` warns that it runs alone).
    Inconsistent or partial variables raise `LaunchError`.
    """
    environ = os.environ if environ is None else environ
    if "RANK" in environ or "WORLD_SIZE" in environ:
        return _torchrun_env(environ)
    if _in_srun_step(environ) and "SLURM_PROCID" in environ:
        env = _slurm_env(environ)
        return env if env.world_size > 1 else None
    return None


def _in_srun_step(environ: Mapping[str, str]) -> bool:
    return "SLURM_STEP_ID" in environ or "SLURM_STEPID" in environ  # (the older spelling)


def _warn_if_slurm_batch_script(environ: Mapping[str, str]) -> None:
    batch = not _in_srun_step(environ) and "SLURM_NTASKS" in environ
    if batch and _integer(environ, "SLURM_NTASKS") > 1:
        logger.warning(
            f"SLURM_NTASKS={environ['SLURM_NTASKS']} but this process is not a task of an srun "
            "step: it runs alone. Start it with srun to use every task (docs/distributed.md)."
        )


def _check_no_detectron2_flags(args: argparse.Namespace, env: LauncherEnv) -> None:
    defaults = default_argument_parser()
    given = [
        f"{flag} {getattr(args, key)}"
        for key, flag in DETECTRON2_LAUNCH_FLAGS.items()
        if getattr(args, key) != defaults.get_default(key)
    ]
    if given:
        raise LaunchError(
            f"{' '.join(given)}: this process was started by {env.launcher} as rank {env.rank} "
            f"of {env.world_size}, which already decides the processes and machines; drop "
            f"{', '.join(DETECTRON2_LAUNCH_FLAGS.values())} (one process per GPU comes from "
            "torchrun --nproc_per_node / srun --ntasks-per-node), or start train_net.py without "
            "the launcher to let Detectron2 spawn them"
        )


def local_gpu(env: LauncherEnv) -> int:
    """The GPU of this local rank: one per local rank, or the only visible one where the
    launcher gives each process its own (``srun --gpus-per-task=1``, CUDA_VISIBLE_DEVICES)."""
    count = torch.cuda.device_count()
    if count >= env.local_world_size:
        return env.local_rank
    if count == 1:
        return 0
    raise LaunchError(
        f"{env.local_world_size} processes on this machine but {count} visible GPUs: start one "
        "process per GPU"
    )


def join_launcher_group(env: LauncherEnv, timeout: timedelta = DEFAULT_TIMEOUT) -> None:
    """Join `env`'s process group with what `detectron2.engine.launch` gives each worker it
    spawns: NCCL with one GPU per local rank, or gloo on the CPU; the per-machine group."""
    has_gpu = torch.cuda.is_available()
    if has_gpu:
        torch.cuda.set_device(local_gpu(env))
    store, _, _ = next(dist.rendezvous(env.init_method, env.rank, env.world_size, timeout=timeout))
    # torchrun (c10d rendezvous) keeps one store for every restart of the worker group: without a
    # prefix of its own, a restarted worker can read a killed one's keys (its gloo address) before
    # that one's successor overwrites them, and fail to connect (seen here with torch 2.14).
    restart = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    dist.init_process_group(
        backend="nccl" if has_gpu else "gloo",
        store=dist.PrefixStore(f"hiera_det/restart_{restart}/", store),
        world_size=env.world_size,
        rank=env.rank,
        timeout=timeout,
    )
    comm.create_local_process_group(env.local_world_size)
    comm.synchronize()  # as Detectron2: avoids a timeout right after init_process_group


def launch_from_args(
    main_func: Callable, args: argparse.Namespace, timeout: timedelta = DEFAULT_TIMEOUT
) -> None:
    """Run ``main_func(args)`` in this process's launcher group (`find_launcher_env`), else
    through Detectron2's `launch` with the command line's spawning flags."""
    env = find_launcher_env()
    if env is None:
        _warn_if_slurm_batch_script(os.environ)
        with _stops_forwarded_to_workers(spawning=args.num_gpus > 1):
            launch(
                main_func,
                args.num_gpus,
                num_machines=args.num_machines,
                machine_rank=args.machine_rank,
                dist_url=args.dist_url,
                args=(args,),
                timeout=timeout,
            )
        return
    _check_no_detectron2_flags(args, env)
    if env.world_size > 1:
        join_launcher_group(env, timeout)
    try:
        main_func(args)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()  # torch warns at exit otherwise


# Stop signals the process that spawns the workers passes on to them (train.stop_signals'
# defaults): Kubernetes signals only a container's first process.
FORWARDED_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


@contextlib.contextmanager
def _stops_forwarded_to_workers(spawning: bool) -> Iterator[None]:
    """While Detectron2's `launch` spawns and waits for the workers: pass SIGTERM and SIGUSR1 on
    to them (they stop after their iteration with a checkpoint) instead of dying at once, and
    exit with `STOPPED_EXIT_CODE` when they did."""
    if not spawning:
        yield
        return

    def forward(signum: int, frame) -> None:
        for child in multiprocessing.active_children():
            os.kill(child.pid, signum)

    previous = {s: signal.signal(s, forward) for s in FORWARDED_SIGNALS}
    try:
        yield
    except ProcessExitedException as e:
        if e.exit_code != STOPPED_EXIT_CODE:
            raise
        raise SystemExit(STOPPED_EXIT_CODE) from None
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def check_in_launcher_group(environ: Mapping[str, str] | None = None) -> None:
    """Stop, before anything is written, a process that the environment places in a group of
    several processes but that is not part of it: it would be a second run in the same folder."""
    env = find_launcher_env(environ)
    if env is None or env.world_size == 1:
        return
    joined = (comm.get_rank(), comm.get_world_size())
    if joined != (env.rank, env.world_size):
        raise LaunchError(
            f"{env.launcher}'s environment makes this process rank {env.rank} of "
            f"{env.world_size}, but it is rank {joined[0]} of a process group of {joined[1]}: "
            "it would train on its own into the same output folder. Start it through "
            "train_net.py's invoke_main (hiera_det.engine.launch.launch_from_args)"
        )


# (environment variable, what restarted the run) that say this start is a restart.
RESTART_COUNTERS = (
    ("TORCHELASTIC_RESTART_COUNT", "torchrun restarted the worker group"),
    ("SLURM_RESTART_COUNT", "SLURM requeued the job"),
)


def resume_after_restart(args: argparse.Namespace, output_dir: str) -> bool:
    """After torchrun restarted the worker group (``TORCHELASTIC_RESTART_COUNT`` > 0) or SLURM
    requeued the job (``SLURM_RESTART_COUNT`` > 0), resume from `output_dir`'s last checkpoint as
    ``--resume`` does; return whether it does so.

    A first start keeps what the command line says: without ``--resume`` a non-empty folder is
    trained afresh, as always.
    """
    found = [(int(os.environ[n]), what) for n, what in RESTART_COUNTERS if os.environ.get(n)]
    found = [(count, what) for count, what in found if count > 0]
    if not found:
        return False
    args.resume = True
    last_file = os.path.join(output_dir, "last_checkpoint")
    if os.path.isfile(last_file):
        with open(last_file) as f:
            where = f"its last checkpoint {os.path.join(output_dir, f.read().strip())}"
    else:
        where = f"the start: {output_dir} has no checkpoint yet"
    count, what = found[0]
    # Detectron2's trainer then logs "Starting training from iteration N".
    logging.getLogger("detectron2").info(f"{what} (restart {count}): resuming from {where}")
    return True
