"""MAE pretraining of Hiera-B+ (Table 14a). See common.py for the recipe, and
../common/recipes.py for the per-size drop path."""

from ..common.recipes import use_mae_size
from .common import dataloader, lr_multiplier, model, optimizer, train

use_mae_size(model, "base_plus")
