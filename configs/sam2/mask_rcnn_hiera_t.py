"""Mask R-CNN on SAM 2.1's Hiera-T trunk, COCO, 100 epochs. Our choice, unverified (no COCO number).

Drop path and lr: those of our MAE-initialised Hiera-T config (drop path 0.1, lr 3.5e-5: the paper's
Table 15 recipe, which varies only these two with size). SAM 2.1's encoder was trained at 1024 px
like the detector, so there is no reason found to move them; nobody has tuned them for it.
"""

from .common import dataloader, lr_multiplier, model, optimizer, train

model.backbone.bottom_up.size = "tiny"  # layout and weights follow the size
model.backbone.bottom_up.drop_path_rate = 0.1  # lr 3.5e-5: B's recipe
