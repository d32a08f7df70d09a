"""Every checkpoint format we read, and the one place that reads checkpoint files.

`convert_hiera_checkpoint` is a pure function from a checkpoint's content (official, timm, our MAE
output, our detector) to a backbone state dict, and `convert_mae_checkpoint` one from an official
MAE file's content to our `MaskedAutoencoderHiera`'s names; `load_hiera_checkpoint` loads a
backbone into a `Hiera` and reports what happened; `HieraCheckpointer` is Detectron2's
`DetectionCheckpointer` that also understands those files, so `train.init_checkpoint` can name any
of them and every MAE model (training, resuming, pictures) loads its weights through it.

Checkpoints are data, not code: every ``torch.load`` of a checkpoint in `hiera_det` goes through
`_read_checkpoint` (``weights_only=True``), and a file that Detectron2 reads itself (a model-zoo
``.pkl`` with plain pickle, a pycls ``.pyth``) is first read by a safe reader (`_check_data_only`:
`_DataUnpickler`, numpy arrays, dicts, lists, numbers, strings only; or `_read_checkpoint`). A
file that needs more raises `UnsafeCheckpointError` naming the file and what it needed; only a
file listed in ``$HIERA_DET_TRUST_CHECKPOINTS`` (`TRUST_ENV`) is loaded with full pickle.
"""

from __future__ import annotations

import codecs
import collections
import contextlib
import logging
import os
import pickle
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from urllib.parse import urlparse

import torch
from detectron2.checkpoint import DetectionCheckpointer
from torch import Tensor, nn

from .checkpoint_download import fetch_checkpoint, is_damaged_file_error, reading_checkpoint
from .modeling.hiera import HIERA_SIZES, Hiera, resize_pos_embed

__all__ = [
    "CheckpointMismatchError",
    "HieraCheckpointer",
    "LoadReport",
    "SideCheckpointer",
    "TRUST_ENV",
    "UnsafeCheckpointError",
    "convert_hiera_checkpoint",
    "convert_mae_checkpoint",
    "load_hiera_checkpoint",
]

logger = logging.getLogger(__name__)

# Every backbone tensor lives under one of these names; anything else (classifier head, final norm,
# MAE decoder, mask token, fusion heads) is not part of the backbone.
_BACKBONE_ROOTS = ("pos_embed", "pos_embed_win", "patch_embed", "blocks", "out_norms")
_ANCHOR = "blocks.0.attn.qkv.weight"  # present in every Hiera, whatever wraps it
_POS_TABLES = ("pos_embed", "pos_embed_win")
# Other names of our backbone tensors: timm's older `pos_embed_abs`; SAM 2's trunk (Meta's files and
# timm's `sam2_hiera_*`) names the window table `pos_embed_window`, and Meta's files name the MLP
# `mlp.layers.0/1` (SAM 2's own MLP class) where timm and we have `mlp.fc1/fc2`.
_RENAMED_ROOTS = {"pos_embed_abs": "pos_embed", "pos_embed_window": "pos_embed_win"}
_SAM2_MLP = re.compile(r"^(blocks\.\d+\.mlp)\.layers\.([01])\.")


def _backbone_name(name: str) -> str:
    """A backbone tensor's name in any supported checkpoint -> our name for it."""
    name = _RENAMED_ROOTS.get(name, name)
    return _SAM2_MLP.sub(lambda m: f"{m.group(1)}.fc{int(m.group(2)) + 1}.", name)


class CheckpointMismatchError(ValueError):
    """A checkpoint's tensors do not fit the model (typically: another Hiera size)."""


@dataclass
class LoadReport:
    """What loading a Hiera checkpoint did."""

    source: str = "<state dict>"
    loaded: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)  # model tensors not in the checkpoint
    unexpected: list[str] = field(default_factory=list)  # backbone tensors the model lacks
    resized: list[str] = field(default_factory=list)  # "key: old shape -> new shape"
    dropped: list[str] = field(default_factory=list)  # non-backbone tensors (head, decoder, ...)

    def __str__(self) -> str:
        lines = [f"Hiera weights from {self.source}: {len(self.loaded)} tensors loaded"]
        if self.resized:
            lines.append(f"  resized ({len(self.resized)}): " + "; ".join(self.resized))
        if self.missing:
            lines.append(
                f"  MISSING from the checkpoint, left at initialisation ({len(self.missing)}): "
                + _summarize(self.missing)
            )
        if self.unexpected:
            lines.append(
                f"  not used by this model ({len(self.unexpected)}): " + _summarize(self.unexpected)
            )
        if self.dropped:
            lines.append(
                f"  ignored, not part of the backbone ({len(self.dropped)}): "
                + _summarize(self.dropped)
            )
        return "\n".join(lines)


def _summarize(keys: list[str], limit: int = 12) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f", ... (+{len(keys) - limit} more)" if len(keys) > limit else "")


def _unwrap(checkpoint: Mapping) -> Mapping:
    """Find the state dict inside a checkpoint file's content."""
    for key in ("model_state", "model", "state_dict"):
        inner = checkpoint.get(key)
        if isinstance(inner, Mapping):
            return _unwrap(inner)
    return checkpoint


def split_hiera_checkpoint(checkpoint: Mapping) -> tuple[dict[str, Tensor], list[str]]:
    """Like `convert_hiera_checkpoint`, but also return the keys that were dropped."""
    state = _unwrap(checkpoint)
    anchors = [k for k in state if k == _ANCHOR or k.endswith("." + _ANCHOR)]
    if not anchors:
        raise KeyError(
            f"no Hiera weights found: the checkpoint has no '{_ANCHOR}' (or '<prefix>.{_ANCHOR}') "
            f"among its {len(state)} keys (first few: {list(state)[:5]})"
        )
    # e.g. "", "encoder.", "backbone.bottom_up.", "image_encoder.trunk." (SAM 2)
    prefix = min(anchors, key=len)[: -len(_ANCHOR)]
    kept, dropped = {}, []
    for key, value in state.items():
        name = _backbone_name(key[len(prefix) :]) if key.startswith(prefix) else None
        if name is not None and name.split(".")[0] in _BACKBONE_ROOTS:
            kept[name] = value
        else:
            dropped.append(key)
    return kept, dropped


def convert_hiera_checkpoint(checkpoint: Mapping) -> dict[str, Tensor]:
    """Return the backbone state dict inside any supported Hiera checkpoint's content.

    Accepts the official files (``{"model_state": sd}`` or flat, fine-tuned or MAE), timm state
    dicts (``hiera_*``, ``hiera_*_abswin_*``, ``sam2_hiera_*``), SAM 2 / SAM 2.1 checkpoints as
    Meta publishes them (``{"model": sd}``, the trunk under ``image_encoder.trunk.``), and
    Detectron2-style ``{"model": sd}`` files from our MAE trainer (``encoder.`` prefix) or detector
    (``backbone.bottom_up.`` prefix). Names are brought to ours (SAM 2's ``pos_embed_window`` and
    ``mlp.layers.0/1``); head, final norm, decoder and the rest of SAM 2 (neck, memory, mask
    decoder) are dropped; position tables are kept at their stored size.
    """
    return split_hiera_checkpoint(checkpoint)[0]


def convert_mae_checkpoint(official: Mapping) -> dict[str, Tensor]:
    """Official MAE checkpoint (``{"model_state": sd}`` or flat) -> state dict for our MAE.

    Encoder tensors (``pos_embed``, ``patch_embed.*``, ``blocks.*``) move under ``encoder.``;
    everything else (fusion heads, mask token, decoder) already has our names. Files on disk load
    through `HieraCheckpointer`, which does the same and also resizes the encoder's position table.
    """
    encoder, others = split_hiera_checkpoint(official)
    state = _unwrap(official)
    return {**{f"encoder.{k}": v for k, v in encoder.items()}, **{k: state[k] for k in others}}


def _pos_table_to(table: Tensor, target: Tensor, antialias: bool) -> Tensor:
    """Bring a stored position table to the layout and grid of the model's table; a
    ``[1, C, h, w]`` table is resized with `antialias` (the model's own way of resizing it)."""
    if table.dim() == 3 and target.dim() == 4:  # official [1, N, C] -> timm [1, C, h, w]
        side = int(table.shape[1] ** 0.5)
        table = table.reshape(1, side, side, -1).permute(0, 3, 1, 2)
    elif table.dim() == 4 and target.dim() == 3:
        table = table.flatten(2).transpose(1, 2)
    if target.dim() == 3:
        side = int(target.shape[1] ** 0.5)
        return resize_pos_embed(table, (side, side), antialias=False)
    return resize_pos_embed(table, tuple(target.shape[-2:]), antialias=antialias)


def _describe_architecture(state: Mapping[str, Tensor]) -> str:
    """Guess the Hiera size a backbone state dict was made for, for error messages."""
    blocks = {int(m.group(1)) for k in state if (m := re.match(r"blocks\.(\d+)\.", k))}
    if not blocks or "patch_embed.proj.weight" not in state:
        return "an unknown architecture"
    depth = max(blocks) + 1
    # A transition block widens: its norm2 is wider than its norm1 (with or without `proj`).
    transitions = sorted(
        i
        for i in blocks
        if f"blocks.{i}.norm1.weight" in state
        and f"blocks.{i}.norm2.weight" in state
        and state[f"blocks.{i}.norm1.weight"].shape != state[f"blocks.{i}.norm2.weight"].shape
    )
    bounds = [0, *transitions, depth]
    stages = tuple(b - a for a, b in zip(bounds[:-1], bounds[1:]))
    embed_dim = state["patch_embed.proj.weight"].shape[0]
    for name, spec in HIERA_SIZES.items():
        if spec["embed_dim"] == embed_dim and tuple(spec["stages"]) == stages:
            return f"Hiera-{name} (embed_dim={embed_dim}, stages={stages})"
    return f"a Hiera with embed_dim={embed_dim}, stages={stages}"


def adapt_hiera_state_dict(
    model: Hiera, state: Mapping[str, Tensor], report: LoadReport
) -> dict[str, Tensor]:
    """Check shapes against `model`, resize position tables; fill `report`; raise on mismatch."""
    own = model.state_dict()
    out, mismatched = {}, []
    for key, value in state.items():
        if key not in own:
            report.unexpected.append(key)
            continue
        target = own[key]
        if value.shape != target.shape:
            if key in _POS_TABLES:
                value = _pos_table_to(value, target, model.pos_embed_type == "abs_win")
                report.resized.append(f"{key}: {tuple(state[key].shape)} -> {tuple(value.shape)}")
            if value.shape != target.shape:
                mismatched.append(
                    f"{key}: checkpoint {tuple(state[key].shape)} vs model {tuple(target.shape)}"
                )
                continue
        out[key] = value
    if mismatched:
        raise CheckpointMismatchError(
            f"The checkpoint {report.source} does not fit this Hiera: {len(mismatched)} tensors "
            f"have other shapes ({_summarize(mismatched, 8)}). The checkpoint looks like "
            f"{_describe_architecture(state)}; the model is {_describe_architecture(own)}. "
            "Use a config of the checkpoint's size or a checkpoint of the model's size."
        )
    report.loaded = sorted(out)
    report.missing = sorted(k for k in own if k not in out)
    return out


TRUST_ENV = "HIERA_DET_TRUST_CHECKPOINTS"


class UnsafeCheckpointError(pickle.UnpicklingError):
    """A checkpoint file holds more than data: its pickle names a Python object (class, function)
    that loading would import and call, so it was not loaded (see `TRUST_ENV` to allow a file)."""


def _trusted(path: str, local: str) -> bool:
    """Whether the user named this file in ``$HIERA_DET_TRUST_CHECKPOINTS`` (os.pathsep list)."""
    entries = [e for e in os.environ.get(TRUST_ENV, "").split(os.pathsep) if e]
    real = os.path.realpath(local)
    return any(e == path or os.path.realpath(e) == real for e in entries)


def _unsafe_checkpoint(path: str, local: str, what: str) -> UnsafeCheckpointError:
    return UnsafeCheckpointError(
        f"The checkpoint {path} is not only data (tensors, arrays, dicts, lists, numbers, "
        f"strings): loading it needs {what}, and loading must not run code from a file, so it "
        f"was not loaded. If you trust this file, allow it with "
        f"{TRUST_ENV}={os.path.realpath(local)} (several files: separated by '{os.pathsep}'); "
        "see docs/reliability.md."
    )


def _torch_refusal(err: Exception) -> str:
    """What the file needed, from torch's weights-only error (e.g. "the global os.system")."""
    text = str(err)
    found = re.search(r"Unsupported global: GLOBAL (\S+)", text)
    if found:
        return f"the global {found.group(1)}"
    found = re.search(r"WeightsUnpickler error: ([^\n]*)", text)
    return (found.group(1) if found else text.strip().splitlines()[0]).strip()


def _read_checkpoint(path: str) -> Mapping:
    """Read a ``torch.save`` checkpoint (path or URL) onto the CPU: the one ``torch.load`` of
    `hiera_det`, always ``weights_only=True`` unless the user trusts the file (`TRUST_ENV`).

    Raises:
        UnsafeCheckpointError: the file needs more than tensors and plain Python data.
    """
    local = fetch_checkpoint(path)
    trusted = _trusted(path, local)
    if trusted:
        logger.warning(f"Loading {path} with full pickle: it is listed in ${TRUST_ENV}")
    with reading_checkpoint(local), open(local, "rb") as f:  # a damaged file: named
        try:
            return torch.load(f, map_location="cpu", weights_only=not trusted)
        except pickle.UnpicklingError as err:
            if trusted or is_damaged_file_error(err):
                raise
            raise _unsafe_checkpoint(path, local, _torch_refusal(err)) from err


def _numpy_globals() -> dict[tuple[str, str], object]:
    """The globals a pickle of numpy arrays and scalars names, under numpy 1 and 2 module names."""
    import numpy as np

    try:
        from numpy._core import multiarray
    except ImportError:  # numpy < 2
        from numpy.core import multiarray
    allowed: dict[tuple[str, str], object] = {("numpy", "ndarray"): np.ndarray}
    allowed[("numpy", "dtype")] = np.dtype
    for module in ("numpy.core.multiarray", "numpy._core.multiarray"):
        allowed[(module, "_reconstruct")] = multiarray._reconstruct
        allowed[(module, "scalar")] = multiarray.scalar
    return allowed


class _DataUnpickler(pickle.Unpickler):
    """Unpickles numpy arrays, dicts, lists, tuples, numbers, strings and bytes; nothing else."""

    def __init__(self, file, source: str, local: str) -> None:
        super().__init__(file, encoding="latin1")  # Detectron2/Caffe2 zoo files are Python 2
        self._source, self._local = source, local
        self._allowed = _numpy_globals()
        self._allowed[("collections", "OrderedDict")] = collections.OrderedDict
        # Python 3 pickles of bytes at protocol 2 rebuild them with _codecs.encode(str, "latin1").
        self._allowed[("_codecs", "encode")] = codecs.encode

    def find_class(self, module: str, name: str):
        if (module, name) in self._allowed:
            return self._allowed[(module, name)]
        raise _unsafe_checkpoint(self._source, self._local, f"the global {module}.{name}")


def _check_data_only(path: str) -> None:
    """Raise `UnsafeCheckpointError` naming `path` unless the checkpoint file is data only, read
    by a reader that never runs code from it: `_DataUnpickler` for a plain-pickle ``.pkl``
    (Detectron2/Caffe2 model zoo), ``torch.load(weights_only=True)`` for other files. A file the
    user trusts (`TRUST_ENV`) is not checked."""
    local = fetch_checkpoint(path)
    if _trusted(path, local):
        logger.warning(f"Loading {path} with full pickle: it is listed in ${TRUST_ENV}")
        return
    if not local.endswith(".pkl"):
        _read_checkpoint(path)
        return
    with reading_checkpoint(local), open(local, "rb") as f:
        _DataUnpickler(f, path, local).load()


def load_hiera_checkpoint(model: Hiera, checkpoint: str | Mapping) -> LoadReport:
    """Load a Hiera checkpoint (path, URL or content) into `model` and report what happened.

    Raises:
        CheckpointMismatchError: tensors whose shapes do not fit (e.g. another Hiera size).
        FileNotFoundError, KeyError: no such file / no Hiera weights in it.
    """
    report = LoadReport(source=checkpoint if isinstance(checkpoint, str) else "<state dict>")
    if isinstance(checkpoint, str):
        content = _read_checkpoint(checkpoint)
    else:
        content = checkpoint
    state, report.dropped = split_hiera_checkpoint(content)
    model.load_state_dict(adapt_hiera_state_dict(model, state, report), strict=False)
    logger.info(str(report))
    return report


@contextlib.contextmanager
def _atomic_open(path: str, mode: str) -> Iterator:
    """Open a temporary file beside `path` for writing; on a clean exit rename it over `path`."""
    tmp = f"{path}.tmp.{os.getpid()}"
    try:
        with open(tmp, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


class _AtomicLocalWrites:
    """A path manager whose writes to local files are atomic (`_atomic_open`); reads, remote
    files and every other method go to the wrapped one."""

    def __init__(self, inner) -> None:
        self._inner = inner

    def __getattr__(self, name: str):
        return getattr(self._inner, name)

    def open(self, path: str, mode: str = "r", **kwargs):
        if "w" in mode and "://" not in path:
            return _atomic_open(path, mode)
        return self._inner.open(path, mode, **kwargs)


def _find_hiera(model: nn.Module) -> tuple[str, Hiera] | None:
    for name, module in model.named_modules():
        if isinstance(module, Hiera):
            return name, module
    return None


class HieraCheckpointer(DetectionCheckpointer):
    """`DetectionCheckpointer` that also loads Hiera-only checkpoints into the model's `Hiera`.

    A file whose keys belong to the model (a detector checkpoint, a resumed run) loads exactly as in
    Detectron2. Any other file holding Hiera weights (official, timm, our MAE output) is converted
    with `convert_hiera_checkpoint`, its position tables are resized to the model's, and its keys
    are placed under the `Hiera` submodule (e.g. ``backbone.bottom_up.``). A size mismatch raises
    `CheckpointMismatchError`; what loaded and what did not is logged as one report.

    A path or URL is resolved by `fetch_checkpoint` (the same errors as everywhere: a URL that
    cannot be downloaded, a missing or damaged file); every file is read as data only (see the
    module docstring).

    Saving is atomic on local disks: a checkpoint (and the `last_checkpoint` tag) is written to a
    temporary file and renamed, so a run killed while saving keeps its previous checkpoint intact.

    Args:
        model, save_dir, kwargs: as `DetectionCheckpointer`.
        strict: raise `CheckpointMismatchError` when a file leaves any model tensor unloaded, holds
            tensors the model lacks or has another shape (the picture tool: a half-loaded MAE would
            draw noise). Default: load what fits and log the rest, as Detectron2 does.
    """

    def __init__(self, model: nn.Module, save_dir: str = "", *, strict: bool = False, **kwargs):
        super().__init__(model, save_dir, **kwargs)
        self.strict = strict
        # fvcore's save() and tag_last_checkpoint() write through path_manager.open.
        self.path_manager = _AtomicLocalWrites(self.path_manager)
        self._source = ""

    def load(self, path: str, *args, **kwargs):
        """`DetectionCheckpointer.load`, with a URL fetched by `fetch_checkpoint` (a URL that
        cannot be had, a missing or damaged file: an error that names it and says what to do)."""
        self._source = path
        if path:
            query = urlparse(path).query  # Detectron2 reads ``?matching_heuristics=True``
            path = fetch_checkpoint(path) + (f"?{query}" if query else "")
        return super().load(path, *args, **kwargs)

    def _torch_load(self, filename: str) -> Mapping:
        return _read_checkpoint(filename)

    def _load_model(self, checkpoint: dict):
        incompatible = super()._load_model(checkpoint)
        if self.strict and incompatible is not None:
            problems = [f"missing {k}" for k in incompatible.missing_keys]
            problems += [f"not in the model: {k}" for k in incompatible.unexpected_keys]
            problems += [
                f"{k}: checkpoint {tuple(a)} vs model {tuple(b)}"
                for k, a, b in incompatible.incorrect_shapes
            ]
            if problems:
                self._raise_not_strict(problems)
        return incompatible

    def _raise_not_strict(self, problems: list[str]) -> None:
        raise CheckpointMismatchError(
            f"The checkpoint {self._source} does not fill this model exactly (strict loading): "
            f"{len(problems)} problems ({_summarize(problems, 8)})"
        )

    def _load_file(self, filename: str) -> dict:
        # DetectionCheckpointer reads a .pkl with plain pickle and a .pyth with torch.load's
        # defaults: such a file is read by a safe reader first, so that it is refused before any
        # code in it runs. Torch files go through `_torch_load`, which is the safe reader.
        if filename.endswith((".pkl", ".pyth")):
            _check_data_only(filename)
        with reading_checkpoint(filename):  # a truncated file: an error naming it
            loaded = super()._load_file(filename)
        return self._fit_hiera(filename, loaded)

    def _fit_hiera(self, filename: str, loaded: dict) -> dict:
        """A Hiera-only file's weights placed under the model's `Hiera`; other files unchanged."""
        found = _find_hiera(self.model)
        if found is None or loaded.get("matching_heuristics"):
            return loaded
        name, hiera = found
        own = self.model.state_dict()
        state = _unwrap(loaded["model"])
        prefix = f"{name}." if name else ""
        if name and prefix + _ANCHOR in state:
            return loaded  # a checkpoint of this very model (resume, detector weights)
        report = LoadReport(source=filename)
        hiera_state, dropped = split_hiera_checkpoint(loaded)
        adapted = {
            prefix + k: v for k, v in adapt_hiera_state_dict(hiera, hiera_state, report).items()
        }
        # Tensors outside the Hiera that this model also has, under the same name and shape (e.g.
        # an official MAE file's decoder for our MaskedAutoencoderHiera), load as well.
        extra = [k for k in dropped if k in own and own[k].shape == state[k].shape]
        adapted.update({k: state[k] for k in extra})
        report.dropped = [k for k in dropped if k not in extra]
        if self.strict and report.dropped:
            self._raise_not_strict([f"not in the model: {k}" for k in report.dropped])
        message = str(report).replace("Hiera weights", f"Hiera weights for '{prefix}'", 1)
        if extra:
            message += f"\n  also loaded, outside the backbone ({len(extra)}): " + _summarize(extra)
        self.logger.info(message)
        # Only the model: iteration/optimizer of a pretraining run must not leak into this one.
        return {"model": adapted}


class SideCheckpointer(HieraCheckpointer):
    """`HieraCheckpointer` for files written beside a run's checkpoints (``model_best.pth`` of
    Detectron2's `BestCheckpointer`): saving one does not move ``last_checkpoint``, so that
    ``--resume`` goes on from the latest checkpoint of the run, not from the best one (which,
    written after the last evaluation, counts one iteration past the last step)."""

    def tag_last_checkpoint(self, last_filename_basename: str) -> None:
        pass
