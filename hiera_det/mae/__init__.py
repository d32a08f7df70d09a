"""MAE pretraining helpers; the model is `hiera_det.modeling.MaskedAutoencoderHiera`.

- `hiera_det.mae.schedule`: epoch-based recipe -> iterations (`resolve_epoch_schedule`);
- `hiera_det.mae.hooks`: `MAEPicturesHook`, periodic reconstruction pictures while training;
- `hiera_det.mae.visualize`: the same pictures from the shell for any checkpoint.

Only the schedule is imported here, so ``python -m hiera_det.mae.visualize`` runs a module that
is not already imported.
"""

from .schedule import resolve_epoch_schedule

__all__ = ["resolve_epoch_schedule"]
