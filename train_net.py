#!/usr/bin/env python
"""Train or evaluate a hiera_det LazyConfig with Detectron2's engine.

    python train_net.py --config-file configs/mask_rcnn_hiera_l.py [--resume] [key=value ...]
    python train_net.py --config-file configs/mask_rcnn_hiera_l.py --eval-only \\
        train.init_checkpoint=output/model_final.pth
    python train_net.py --config-file ... --num-gpus 8 [--num-machines M --machine-rank R
        --dist-url tcp://host:port]
    torchrun --nproc_per_node=8 [--nnodes ...] train_net.py --config-file ...   (or under srun)

The config provides ``model``, ``dataloader.train`` (and optionally ``dataloader.test`` +
``dataloader.evaluator``), ``optimizer``, ``lr_multiplier`` and ``train`` (configs/common/train.py).
A model returns a loss dict in training mode (Mask R-CNN, MAE); evaluation runs only when the config
has an evaluator. ``train.init_checkpoint`` may be a detector checkpoint or Hiera weights
(official, timm, our MAE output): `HieraCheckpointer` loads the latter into the backbone and reports
what loaded. ``train.extra_hooks`` lists LazyCall'd `HookBase` objects registered after the
default hooks. On a machine without CUDA everything runs on the CPU, in fp32.

Multi-machine commands (torchrun, SLURM, elastic restarts): docs/distributed.md.

COCO-format data of one's own: ``dataset.train=[name,json,image_dir]`` and
``dataset.test=[name,json,image_dir]`` (see `hiera_det.data.datasets`).
"""

from __future__ import annotations

import logging
import os
import sys

import torch
from detectron2.config import instantiate
from detectron2.engine import (
    AMPTrainer,
    SimpleTrainer,
    default_argument_parser,
    default_setup,
    default_writers,
    hooks,
)
from detectron2.engine.defaults import create_ddp_model
from detectron2.utils import comm
from detectron2.utils.logger import setup_logger

from hiera_det.checkpoint import HieraCheckpointer, SideCheckpointer
from hiera_det.checkpoint_download import (
    CheckpointUnavailableError,
    CorruptCheckpointError,
    fetch_checkpoint,
)
from hiera_det.config_check import load_config, override_keys
from hiera_det.data.datasets import (
    apply_dataset_config,
    check_dataset_files,
    check_mask_format,
    check_test_datasets,
    dataset_checks_dir,
)
from hiera_det.data.validation import DatasetError, validate_datasets
from hiera_det.engine.evaluation import evaluate
from hiera_det.engine.hooks import (
    STOPPED_EXIT_CODE,
    BestCheckpointer,
    CheckpointBeforeEvaluation,
    DeterministicSteps,
    FiniteParametersCheck,
    StopForResume,
    TrainingStopped,
)
from hiera_det.engine.launch import (
    LaunchError,
    check_in_launcher_group,
    launch_from_args,
    resume_after_restart,
)
from hiera_det.engine.schedule import resolve_epoch_schedule
from hiera_det.utils.once_per_job import once_per_job

logger = logging.getLogger("detectron2")


def has_evaluation(cfg) -> bool:
    return "test" in cfg.dataloader and "evaluator" in cfg.dataloader


def do_test(cfg, model) -> dict:
    """Run the test loader through the evaluator; print and return the results (e.g. COCO AP)."""
    if not has_evaluation(cfg):
        return {}
    loader, evaluator = instantiate(cfg.dataloader.test), instantiate(cfg.dataloader.evaluator)
    return evaluate(model, loader, evaluator, cfg.dataloader.test.dataset.names)


def do_train(args, cfg) -> None:
    model = instantiate(cfg.model)
    logger.info(f"Model:\n{model}")
    model.to(cfg.train.device)

    cfg.optimizer.params.model = model
    optimizer = instantiate(cfg.optimizer)
    train_loader = instantiate(cfg.dataloader.train)

    model = create_ddp_model(model, **cfg.train.ddp)
    trainer_class = AMPTrainer if cfg.train.amp.enabled else SimpleTrainer
    trainer = trainer_class(model, train_loader, optimizer)
    checkpointer = HieraCheckpointer(model, cfg.train.output_dir, trainer=trainer)
    main = comm.is_main_process()
    eval_period = cfg.train.eval_period if has_evaluation(cfg) else 0
    periodic_checkpointer = hooks.PeriodicCheckpointer(checkpointer, **cfg.train.checkpointer)
    trainer.register_hooks(
        [
            hooks.IterationTimer(),
            hooks.LRScheduler(scheduler=instantiate(cfg.lr_multiplier)),
            # Same data and random draws per iteration after --resume (docs/reliability.md).
            DeterministicSteps(cfg.train.seed),
            # Before the checkpointer: a step that made weights non-finite writes no checkpoint.
            FiniteParametersCheck(cfg.train.checkpointer.period, eval_period),
            periodic_checkpointer if main else None,
            # SIGTERM/SIGUSR1 or the time budget: save this iteration and exit to be resumed.
            stop_for_resume(cfg, periodic_checkpointer if main else None),
            # A checkpoint of every iteration evaluated after: a failed evaluation loses nothing.
            CheckpointBeforeEvaluation(periodic_checkpointer, eval_period) if main else None,
            # Evaluates every eval_period iterations (if > 0) and after the last one.
            hooks.EvalHook(cfg.train.eval_period, lambda: do_test(cfg, model))
            if has_evaluation(cfg)
            else None,
            # model_best.pth after each evaluation that beats the ones before (the last included).
            best_checkpointer(cfg, model, trainer) if main else None,
            # Console (loss, lr, time, ETA), metrics.json and TensorBoard.
            hooks.PeriodicWriter(
                default_writers(cfg.train.output_dir, cfg.train.max_iter),
                period=cfg.train.log_period,
            )
            if main
            else None,
        ]
    )
    trainer.register_hooks([instantiate(h) for h in cfg.train.get("extra_hooks", None) or []])

    checkpointer.resume_or_load(cfg.train.init_checkpoint, resume=args.resume)
    # A checkpoint stores the iteration that just finished: go on from the next one.
    start_iter = trainer.iter + 1 if args.resume and checkpointer.has_checkpoint() else 0
    try:
        trainer.train(start_iter, cfg.train.max_iter)
    except TrainingStopped as stop:
        logger.warning(
            f"Training {stop}: go on with --resume (or a requeued/restarted job does it by "
            f"itself); exit status {STOPPED_EXIT_CODE}"
        )
        raise SystemExit(STOPPED_EXIT_CODE) from None
    finally:
        close = getattr(train_loader, "close", None)  # ResumableDataLoader: its workers
        if close is not None:
            close()


def best_checkpointer(cfg, model, trainer) -> BestCheckpointer | None:
    """Detectron2's `BestCheckpointer` on ``train.best_checkpoint.metric`` (e.g. ``bbox/AP``, a
    key of the flattened evaluation results), saving without moving ``last_checkpoint`` and, on
    a resumed run, starting from the best value logged before; None without evaluation or
    metric."""
    best = cfg.train.get("best_checkpoint", None) or {}
    if not has_evaluation(cfg) or not best.get("metric"):
        return None
    checkpointer = SideCheckpointer(model, cfg.train.output_dir, trainer=trainer)
    return BestCheckpointer(
        cfg.train.eval_period,
        checkpointer,
        best.metric,
        mode=best.get("mode", "max"),
        metrics_file=os.path.join(cfg.train.output_dir, "metrics.json"),
    )


def stop_for_resume(cfg, periodic_checkpointer) -> StopForResume | None:
    """The hook that stops the run on ``train.stop_signals`` or before ``train.max_hours`` runs
    out (docs/distributed.md); None when neither is set (``train.stop_signals=[]``)."""
    signals = cfg.train.get("stop_signals", ("SIGTERM", "SIGUSR1")) or ()
    max_hours = cfg.train.get("max_hours", None)
    if not signals and max_hours is None:
        return None
    return StopForResume(
        periodic_checkpointer, signals, max_hours, cfg.train.get("stop_margin_s", 120.0)
    )


def choose_device(cfg) -> None:
    """Fall back to the CPU (fp32, no fp16 gradient compression) when CUDA is unavailable."""
    if str(cfg.train.device).startswith("cuda") and not torch.cuda.is_available():
        logger.warning("CUDA is not available: running on the CPU")
        cfg.train.device = "cpu"
    if cfg.train.device == "cpu":
        if cfg.train.amp.enabled:
            logger.warning("train.amp.enabled=True needs CUDA: training in fp32 on the CPU")
            cfg.train.amp.enabled = False
        if "ddp" in cfg.train:
            cfg.train.ddp.fp16_compression = False
            cfg.train.ddp.device_ids = None  # DDP of a CPU module takes no device ids


def check_datasets(cfg, eval_only: bool) -> None:
    """Fail early, naming the expected files, when a dataset the run reads is missing or broken;
    a `DatasetError` ends the run with its message alone (no traceback)."""
    loaders = ["test"] if eval_only else ["train", "test"]
    try:
        for key in loaders:
            dataset = cfg.dataloader.get(key, {}).get("dataset", {})
            if "names" in dataset:
                check_dataset_files(dataset.names)
                # Stops on inconsistent annotations, reports skips; in the main process only.
                reports = once_per_job(
                    validate_datasets,
                    dataset.names,
                    used_for="training" if key == "train" else "evaluation",
                    cache_dir=dataset_checks_dir(cfg),
                )
                if key == "train":
                    check_mask_format(cfg, reports)  # RLE masks need the bitmask format
        if has_evaluation(cfg):
            check_test_datasets(cfg)  # every test image reads, or dataset.skip_unreadable_...
    except DatasetError as e:
        raise SystemExit(f"DatasetError: {e}") from None


def check_init_checkpoint(cfg, resume: bool) -> None:
    """Fail early, naming the file, when ``train.init_checkpoint`` cannot be had: a URL that
    cannot be downloaded (the message says where the cache looks and how to go on), a missing or
    truncated local or cached file. A URL is downloaded here,
    before the data loaders are built; the checkpointer later finds it in the cache."""
    checkpoint = cfg.train.init_checkpoint
    last = os.path.join(cfg.train.output_dir, "last_checkpoint")
    if not checkpoint or (resume and os.path.isfile(last)):  # a resumed run loads its own file
        return
    fetch_checkpoint(checkpoint)


def main(args) -> dict | None:
    check_in_launcher_group()  # before anything is written: never two runs in one folder
    cfg = load_config(args.config_file, args.opts)  # fails on unknown keys and wrong types
    apply_dataset_config(cfg)  # before default_setup saves the config: dataset names, classes
    default_setup(cfg, args)
    # hiera_det's messages (skipped images, dataset reports, data stream) in log.txt too; they
    # still propagate to the root logger (setup_logger turns that off), e.g. for pytest's caplog.
    setup_logger(cfg.train.output_dir, comm.get_rank(), name="hiera_det").propagate = True
    resume_after_restart(args, cfg.train.output_dir)  # torchrun --max-restarts, SLURM requeue
    choose_device(cfg)
    check_datasets(cfg, args.eval_only)
    check_init_checkpoint(cfg, args.resume)

    if args.eval_only:
        if not has_evaluation(cfg):
            raise ValueError(f"{args.config_file} has no dataloader.test/evaluator to evaluate")
        model = instantiate(cfg.model)
        model.to(cfg.train.device)
        model = create_ddp_model(model, **cfg.train.ddp)
        HieraCheckpointer(model).load(cfg.train.init_checkpoint)
        return do_test(cfg, model)
    # train.epochs (MAE's recipe, or given for a dataset of one's own): train.max_iter, warm-up,
    # lr and periods from the image count; the keys given on the command line stay (else no-op).
    resolve_epoch_schedule(cfg, given=override_keys(args.opts))
    do_train(args, cfg)
    return None


# Reported as one message, without a traceback: the message says what to do.
CHECKPOINT_ERRORS = (CheckpointUnavailableError, CorruptCheckpointError)


def invoke_main() -> None:
    args = default_argument_parser().parse_args()
    try:
        # torchrun / srun's process group, else Detectron2's --num-gpus ... spawning.
        launch_from_args(main, args)
    except LaunchError as e:
        raise SystemExit(f"train_net.py: {e}") from None
    except CHECKPOINT_ERRORS as e:
        print(f"{os.path.basename(sys.argv[0])}: error: {e}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    invoke_main()
