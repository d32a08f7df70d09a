"""ViTDet's step schedule, derived from a number of epochs and the batch size.

ViTDet's "100 epoch" COCO schedule at batch 64 is 184375 iterations (100 x 118k images / 64;
ViTDet rounds train2017's 118287 images to 118k), decays the lr by 10x at 8/9 and 26/27 of training
(iterations 163889 and 177546) and warms up linearly for 250 iterations from 0.001x.
"""

from detectron2.config import LazyCall as L
from detectron2.solver import WarmupParamScheduler
from fvcore.common.param_scheduler import MultiStepParamScheduler

COCO_TRAIN_IMAGES = 118_000  # as ViTDet counts an epoch


def iterations_for(epochs: float, batch_size: int, images: int = COCO_TRAIN_IMAGES) -> int:
    """Training iterations for `epochs` passes over `images` at `batch_size` images per step."""
    return round(epochs * images / batch_size)


def step_lr_multiplier(max_iter: int, warmup_iters: int = 250):
    """Warm-up, then x0.1 at 8/9 and x0.01 at 26/27 of `max_iter` (fractions of training: the
    trainer evaluates the scheduler at ``iter / train.max_iter``, so a shorter run keeps the shape).
    """
    return L(WarmupParamScheduler)(
        scheduler=L(MultiStepParamScheduler)(
            values=[1.0, 0.1, 0.01],
            milestones=[round(max_iter * 8 / 9), round(max_iter * 26 / 27)],
            num_updates=max_iter,
        ),
        warmup_length=warmup_iters / max_iter,
        warmup_method="linear",
        warmup_factor=0.001,
    )
