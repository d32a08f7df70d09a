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
