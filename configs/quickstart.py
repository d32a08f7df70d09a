"""Quickstart: a small Hiera Mask R-CNN trained from scratch on the built-in synthetic shapes.

Needs nothing downloaded and runs on a laptop CPU: the dataset is generated on first use
(`hiera_det.data.synthetic`), the model is the paper's detector (`common/mask_rcnn_hiera.py`) at a
toy width and depth for 128 px images, and the run ends with COCO AP on the val split and pictures
of predictions in the output folder. See docs/quickstart.md.

    python train_net.py --config-file configs/quickstart.py
"""

from detectron2.config import LazyCall as L

from hiera_det.data.synthetic import SyntheticSpec, register_synthetic
from hiera_det.engine.schedule import step_lr_multiplier
from hiera_det.engine.visualize import PredictionPicturesHook
from hiera_det.modeling import Hiera

from .common.coco_lsj import dataloader, lsj_augmentations, square_test_resize
from .common.mask_rcnn_hiera import model
from .common.optim import optimizer
from .common.train import train

image_size = 128  # the square the images are drawn at and trained at
fpn_dim = 64  # FPN and RoI-head width (256 in the paper's detector)

# --- data: the synthetic shapes (generated into $DETECTRON2_DATASETS/synthetic on first use)
_spec = SyntheticSpec(image_size=(image_size, image_size))
_train_name, _val_name = register_synthetic(_spec)
dataloader.train.dataset.names = _train_name
dataloader.test.dataset.names = _val_name
dataloader.train.mapper.instance_mask_format = "bitmask"  # the json holds exact RLE masks
# LSJ at a milder range than COCO's [0.1, 2.0]: at 128 px a 0.1 scale leaves nothing to see.
dataloader.train.mapper.augmentations = lsj_augmentations(image_size, min_scale=0.5, max_scale=1.5)
dataloader.test.mapper.augmentations = square_test_resize(image_size)
dataloader.train.total_batch_size = 8
dataloader.train.num_workers = 1
dataloader.test.num_workers = 1

# --- model: Hiera at a toy size, trained from scratch; heads at a quarter of the paper's width
model.backbone.bottom_up = L(Hiera)(
    embed_dim=32,
    num_heads=1,
    stages=(1, 1, 2, 1),
    pretrain_img_size=image_size,  # no pretrained table to keep: size it for our images
    out_features=["res2", "res3", "res4", "res5"],
    use_sdpa=True,
)
model.backbone.out_channels = fpn_dim  # the RPN and RoI heads read their input width from here
model.backbone.square_pad = image_size
# Anchors at half the COCO sizes: the shapes are 15-60 px in a 128 px image.
model.proposal_generator.anchor_generator.sizes = [[16], [32], [64], [128], [256]]
model.proposal_generator.pre_nms_topk = (1000, 500)
model.proposal_generator.post_nms_topk = (500, 250)
model.roi_heads.num_classes = len(_spec.shapes)
# The RoI heads cost most of a CPU step: half the sampled RoIs, and 2 hidden convs (LN) instead
# of 4 in the box and mask heads.
model.roi_heads.batch_size_per_image = 64
model.roi_heads.box_head.conv_dims = [fpn_dim] * 2
model.roi_heads.box_head.fc_dims = [256]
model.roi_heads.box_predictor.input_shape.channels = 256  # the fc's width
model.roi_heads.mask_head.conv_dims = [fpn_dim] * 3  # 2 convs + the deconv

# --- optimisation: AdamW as the paper, at a from-scratch learning rate
optimizer.lr = 1e-3
optimizer.weight_decay = 0.05
train.max_iter = 1100
lr_multiplier = step_lr_multiplier(train.max_iter, warmup_iters=100)
train.output_dir = "./output/quickstart"
train.eval_period = 0  # evaluate once, at the end
train.checkpointer.period = 500
train.log_period = 20
train.seed = 0
# After training: evaluation (COCO AP, by train_net.py) and then pictures of predictions.
train.extra_hooks = [
    L(PredictionPicturesHook)(
        dataset_name="${dataloader.test.dataset.names}",
        mapper="${dataloader.test.mapper}",
        output_dir="${train.output_dir}/predictions",
        num_images=8,
        score_threshold=0.5,
    )
]
