"""The per-size values of the recipes, one table each: what changes with the Hiera size.

`DETECTION` holds the two values the paper's COCO fine-tuning recipe changes with the size
(Table 15: drop path 0.2 and lr 3.5e-5 for B and B+, 0.4 and 3e-5 for L; batch 64 and everything
else is shared). The paper trains no T, S or H detector; their rows are our choice, unverified
(no COCO number to compare with):

- T, S: wherever the paper lists T and S it gives them less drop path than B (MAE pretraining: 0.0
  for T/S vs 0.2 for B, Table 14a), so drop path 0.1 with B's lr.
- H: H has L's depth (2, 6, 36, 4) at 1.8x the width; from L to H we take ViTDet's step in drop
  path (0.4 -> 0.5) and keep L's lr (no data point to extrapolate a further decrease from).

The same rows serve the detector on SAM 2.1's trunk (configs/sam2/): SAM 2.1's encoders have these
sizes and were trained at the detector's 1024 px; nobody has tuned the values for them.

`MAE_DROP_PATH` is the MAE pretraining's drop path (Table 14a); the rest of that recipe is shared.
"""

DETECTION = {
    "tiny": dict(drop_path_rate=0.1, lr=3.5e-5),
    "small": dict(drop_path_rate=0.1, lr=3.5e-5),
    "base": dict(drop_path_rate=0.2, lr=3.5e-5),
    "base_plus": dict(drop_path_rate=0.2, lr=3.5e-5),
    "large": dict(drop_path_rate=0.4, lr=3e-5),
    "huge": dict(drop_path_rate=0.5, lr=3e-5),
}

MAE_DROP_PATH = {
    "tiny": 0.0,
    "small": 0.0,
    "base": 0.2,
    "base_plus": 0.2,
    "large": 0.2,
    "huge": 0.3,
}


def use_detection_size(model, optimizer, size: str) -> None:
    """Set a Mask R-CNN config's Hiera size and that size's drop path and lr (`DETECTION`), in
    place. The global blocks, the layout and the initial weights follow the size by themselves."""
    model.backbone.bottom_up.size = size
    model.backbone.bottom_up.drop_path_rate = DETECTION[size]["drop_path_rate"]
    optimizer.lr = DETECTION[size]["lr"]


def use_mae_size(model, size: str) -> None:
    """Set an MAE config's encoder size and that size's drop path (`MAE_DROP_PATH`), in place;
    the output folder follows the size by itself."""
    model.encoder.size = size
    model.encoder.drop_path_rate = MAE_DROP_PATH[size]
