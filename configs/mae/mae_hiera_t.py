"""MAE pretraining of Hiera-T (Table 14a: drop path 0.0). See common.py for the recipe."""

from .common import dataloader, lr_multiplier, model, optimizer, train

model.encoder.size = "tiny"
model.encoder.drop_path_rate = 0.0
train.output_dir = "./output/mae_hiera_t"
