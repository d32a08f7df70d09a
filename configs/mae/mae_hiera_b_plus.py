"""MAE pretraining of Hiera-B+ (Table 14a: drop path 0.2). See common.py for the recipe."""

from .common import dataloader, lr_multiplier, model, optimizer, train

model.encoder.size = "base_plus"
model.encoder.drop_path_rate = 0.2
train.output_dir = "./output/mae_hiera_b_plus"
