"""MAE pretraining of Hiera-B (Table 14a: drop path 0.2). See common.py for the recipe."""

from .common import dataloader, lr_multiplier, model, optimizer, train
