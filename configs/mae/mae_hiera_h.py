"""MAE pretraining of Hiera-H (Table 14a: drop path 0.3). See common.py for the recipe."""

from .common import dataloader, lr_multiplier, model, optimizer, train

model.encoder.size = "huge"
model.encoder.drop_path_rate = 0.3
train.output_dir = "./output/mae_hiera_h"
