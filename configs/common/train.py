"""Training settings read by train_net.py (Detectron2's `common/train.py` plus `extra_hooks`)."""

train = dict(
    output_dir="./output",
    # A detector checkpoint, or Hiera weights (official, timm or our MAE output) for the backbone.
    init_checkpoint="",
    max_iter=90000,
    amp=dict(enabled=True),  # mixed precision on GPU; train_net.py turns it off on CPU
    ddp=dict(broadcast_buffers=False, find_unused_parameters=False, fp16_compression=True),
    checkpointer=dict(period=5000, max_to_keep=100),
    eval_period=5000,  # 0 or no dataloader.evaluator: no evaluation while training
    # A schedule in epochs of the registered training images (hiera_det.engine.schedule.
    # resolve_epoch_schedule): train.epochs=N replaces max_iter; the others are optional.
    epochs=None,
    warmup_epochs=None,  # None: the lr_multiplier's warm-up fraction
    base_lr=None,  # the lr at base_batch_size (None: optimizer.lr is)
    base_batch_size=None,  # the batch optimizer.lr is meant for: scaled linearly to the real one
    eval_epochs=None,  # -> eval_period; None: eval_period as above
    checkpoint_epochs=None,  # -> checkpointer.period; None: that period
    # model_best.pth: the checkpoint of the best evaluation so far (Detectron2's BestCheckpointer)
    # by this metric of the evaluation results; metric=None: none kept.
    best_checkpoint=dict(metric="bbox/AP", mode="max"),
    log_period=20,
    device="cuda",  # train_net.py falls back to "cpu" when CUDA is unavailable
    seed=-1,  # < 0: a random seed (Detectron2's default_setup)
    extra_hooks=[],  # LazyCall'd detectron2 HookBase objects, registered after the default ones
    # Signals that stop the run after the current iteration with a checkpoint of it; the process
    # then exits with status 75 and --resume goes on (docs/distributed.md: preemption).
    stop_signals=["SIGTERM", "SIGUSR1"],
    max_hours=None,  # a wall-clock budget for the run: stop the same way before it runs out
    stop_margin_s=120.0,  # seconds of the budget kept for the checkpoint and the exit
)
