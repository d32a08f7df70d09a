"""LVIS v1 instead of COCO, as ViTDet's LVIS configs do it, applied to a COCO config's parts.

Data: ``lvis_v1_train`` with repeat-factor sampling (images holding rare categories are repeated;
threshold 0.001), evaluated on ``lvis_v1_val`` by the LVIS evaluator at 300 detections per image
(it needs the ``lvis`` package: `hiera_det.data.lvis.build_lvis_evaluator` says how to install it).
`build_resumable_train_loader` computes the repeat factors from the dicts it loads
(``dataloader.train.repeat_thresh``; Detectron2's `repeat_factors_from_category_frequency`) and
samples them itself instead of Detectron2's `RepeatFactorTrainingSampler`: each epoch's rounding
and order are functions of ``(seed, epoch)``, so ``--resume`` continues the same data stream.
Model: 1203 classes, sigmoid cross-entropy with the federated loss (class weights = image count to
the power 0.5), test score threshold 0.02 and up to 300 detections per image. Schedule: ViTDet
counts an LVIS epoch as 100k images, so 100 epochs at batch 64 are 156250 iterations
(`to_lvis_schedule`), with ViTDet's step decays and twice the COCO learning rate.
"""

from detectron2.config import LazyCall as L

from hiera_det.data.lvis import build_lvis_evaluator, fed_loss_cls_weights
from hiera_det.engine.schedule import iterations_for, step_lr_multiplier

LVIS_TRAIN_IMAGES = 100_000  # ViTDet's LVIS v1 epoch (the train split has 100,170 images)
LVIS_100EP_ITERS = iterations_for(epochs=100, batch_size=64, images=LVIS_TRAIN_IMAGES)  # 156250
NUM_CLASSES = 1203


def to_lvis(dataloader, model):
    """Point a COCO Mask R-CNN config's `dataloader` and `model` at LVIS v1 (in place)."""
    dataloader.train.dataset.names = "lvis_v1_train"
    dataloader.train.repeat_thresh = 0.001
    dataloader.test.dataset.names = "lvis_v1_val"
    dataloader.evaluator = L(build_lvis_evaluator)(
        dataset_name="${..test.dataset.names}", max_dets_per_image=300
    )

    model.roi_heads.num_classes = NUM_CLASSES
    predictor = model.roi_heads.box_predictor
    predictor.test_score_thresh = 0.02
    predictor.test_topk_per_image = 300
    predictor.use_sigmoid_ce = True
    predictor.use_fed_loss = True
    predictor.get_fed_loss_cls_weights = L(fed_loss_cls_weights)(
        dataset_names="${dataloader.train.dataset.names}", freq_weight_power=0.5
    )
    return dataloader, model


def to_lvis_schedule(train, optimizer):
    """ViTDet's LVIS schedule on a COCO config's `train` and `optimizer` (in place): 100 LVIS
    epochs at batch 64 (156250 iterations), an evaluation every 30000 iterations (an LVIS
    evaluation takes long) and twice the COCO lr (ViTDet: 1e-4 -> 2e-4 for B and L). Returns the
    lr multiplier (decays at 138889 and 150463, as ViTDet)."""
    train.max_iter = LVIS_100EP_ITERS
    train.eval_period = 30000
    optimizer.lr = 2 * optimizer.lr
    return step_lr_multiplier(train.max_iter)
