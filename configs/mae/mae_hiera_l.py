"""MAE pretraining of Hiera-L (Table 14a: drop path 0.2). See common.py for the recipe."""

from .common import dataloader, lr_multiplier, model, optimizer, train

model.encoder.size = "large"
model.encoder.drop_path_rate = 0.2
train.output_dir = "./output/mae_hiera_l"
