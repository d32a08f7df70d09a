"""Import-time noise of third-party packages that we cannot fix, silenced narrowly.

Detectron2 (``detectron2.modeling.box_regression``, ``detectron2.layers``, ...) and fvcore
(``fvcore.nn.focal_loss``) call ``torch.jit.script`` on functions while their modules are imported,
and torch 2.14 deprecates ``torch.jit.script`` with a FutureWarning: every program importing
Detectron2's engine printed it several times. Nothing in hiera_det scripts anything. Importing
this module first imports `detectron2.engine` (and with it those modules) with exactly that message
ignored; later imports reuse the modules, and ``torch.jit.script`` called later (e.g. by user
code) still warns.
"""

import warnings

with warnings.catch_warnings():
    warnings.filterwarnings(
        "ignore", message=r"`torch\.jit\.script` is deprecated", category=FutureWarning
    )
    import detectron2.engine  # noqa: F401 -- imports detectron2.modeling/layers and fvcore.nn
