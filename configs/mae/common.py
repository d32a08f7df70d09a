"""MAE pretraining of Hiera (paper Table 14a), trained by `train_net.py`.

    python train_net.py --config-file configs/mae/mae_hiera_b.py [dataloader.train.root=DIR]

Reads every image (`hiera_det.data.images.IMAGE_EXTENSIONS`) under `dataloader.train.root`
(default: $HIERA_DET_IMAGES, else datasets/imagenet/train). The recipe is in epochs;
`hiera_det.engine.schedule.resolve_epoch_schedule` (called by train_net.py) turns it into
iterations from the number of images and the batch size. The 1600-epoch variant is
``train.epochs=1600``; a short run is ``train.max_iter=N`` (same schedule shape).
Every checkpoint can be the detector's ``train.init_checkpoint``.
"""

import os

import torch
from detectron2.config import LazyCall as L
from detectron2.solver import WarmupParamScheduler
from detectron2.solver.build import get_default_optimizer_params
from fvcore.common.param_scheduler import CosineParamScheduler
from omegaconf import OmegaConf

from hiera_det.mae.data import build_mae_train_loader
from hiera_det.mae.hooks import MAEPicturesHook
from hiera_det.mae.model import MaskedAutoencoderHiera
from hiera_det.modeling import build_hiera

from ..common.recipes import MAE_DROP_PATH
from ..common.train import train

model = L(MaskedAutoencoderHiera)(
    encoder=L(build_hiera)(
        size="base",
        q_pool=2,  # no pooling before the last stage: MAE predicts 16 px patches
        drop_path_rate=MAE_DROP_PATH["base"],  # the size configs set both (../common/recipes.py)
        pretrain_img_size=224,
        use_sdpa=True,
    ),
    decoder_embed_dim=512,
    decoder_depth=8,
    decoder_num_heads=16,
    mask_ratio=0.6,
    norm_pix_loss=True,
    # True (or torch.compile's arguments, e.g. {mode: reduce-overhead} for CUDA graphs) compiles
    # the whole step's forward and backward; eager is the reference (docs/mae.md).
    compile_step=False,
)

dataloader = OmegaConf.create()
dataloader.train = L(build_mae_train_loader)(
    root=os.environ.get("HIERA_DET_IMAGES", "datasets/imagenet/train"),
    total_batch_size=4096,
    img_size=224,
    scale=(0.2, 1.0),  # random resized crop
    hflip=True,
    num_workers=10,
)

optimizer = L(torch.optim.AdamW)(
    params=L(get_default_optimizer_params)(
        # `params.model` is set to the model by train_net.py before instantiation.
        weight_decay_norm=0.0,  # as MAE: no decay on norms, biases, position tables, mask token
        weight_decay_bias=0.0,
        overrides={
            "pos_embed": {"weight_decay": 0.0},
            "decoder_pos_embed": {"weight_decay": 0.0},
            "mask_token": {"weight_decay": 0.0},
        },
    ),
    lr=None,  # train.base_lr * batch / train.base_batch_size, set by resolve_epoch_schedule
    betas=(0.9, 0.95),
    weight_decay=0.05,
)

# Linear warm-up from 0, then a half-cosine to 0 over the rest (MAE's schedule). Lengths are
# fractions of training.
lr_multiplier = L(WarmupParamScheduler)(
    scheduler=L(CosineParamScheduler)(start_value=1.0, end_value=0.0),
    warmup_length=None,  # train.warmup_epochs / train.epochs, set by resolve_epoch_schedule
    warmup_factor=0.0,
    rescale_interval=True,  # the cosine starts where the warm-up ends
)

train.update(
    output_dir="./output/mae_hiera_${model.encoder.size}",
    max_iter=None,  # from epochs and the dataset size, unless given
    epochs=400,  # 1600 for the long schedule
    warmup_epochs=40,
    base_lr=8e-4,  # lr at base_batch_size images per step, scaled linearly to the real batch
    base_batch_size=4096,
    checkpoint_epochs=20,  # -> train.checkpointer.period in iterations, unless that is given
    eval_period=0,  # nothing to evaluate: pretraining only
    checkpointer=dict(period=None, max_to_keep=100),
    extra_hooks=[
        L(MAEPicturesHook)(
            root="${dataloader.train.root}",
            output_dir="${train.output_dir}",
            period=5000,
            num_images=8,
            img_size="${dataloader.train.img_size}",
        )
    ],
)
