"""Everything MAE: masked-autoencoder pretraining of Hiera.

- `hiera_det.mae.model`: `MaskedAutoencoderHiera`, `build_mae`;
- `hiera_det.mae.data`: the image-folder training loader (`build_mae_train_loader`);
- `hiera_det.mae.hooks`: `MAEPicturesHook`, periodic reconstruction pictures while training;
- `hiera_det.mae.pictures`: drawing those pictures (``tools/mae_pictures.py`` draws them from the
  shell for any checkpoint).

Loading MAE weights (ours or official) goes through `hiera_det.checkpoint.HieraCheckpointer`; the
epoch-based recipe becomes iterations in `hiera_det.engine.schedule.resolve_epoch_schedule`.
"""

from .model import MaskedAutoencoderHiera, build_mae

__all__ = ["MaskedAutoencoderHiera", "build_mae"]
