"""Load a LazyConfig and apply command-line overrides, failing on typos and wrong types.

Detectron2's `LazyConfig.apply_overrides` creates any key it is given: ``train.max_itr=10`` trains
for the default 90k iterations and nothing says why. `load_config` checks each ``key=value`` first:

- the key must exist, or be an argument that the LazyCall'd target of its parent accepts
  (``model.backbone.bottom_up.use_act_checkpoint=True`` is fine even if the config does not list
  it; a target taking ``**kwargs``, e.g. `build_hiera`, accepts any name and leaves a typo to its
  callee's TypeError at instantiation), or be written ``+key=value`` (adding a key on purpose),
  or lie under one of `new_roots` (``dataset.train=[...]``, see `hiera_det.data.datasets`);
- the value must have the type of the value it replaces: bool for bool, int for int, a number for
  a float, a string for a string, a list for a list, a mapping for a config node (or a string
  for a LazyCall'd object, which Detectron2 often takes by name: ``model.backbone.norm=LN``);
  ``null`` is always accepted.

Errors are one paragraph naming the override, the key and the value, with the closest existing
keys as suggestions.
"""

from __future__ import annotations

import difflib
import inspect
import os
from collections.abc import Mapping, Sequence

from detectron2.config import LazyConfig
from omegaconf import DictConfig, ListConfig, OmegaConf

__all__ = ["ConfigOverrideError", "check_overrides", "load_config", "override_keys"]

_MISSING = object()


class ConfigOverrideError(ValueError):
    """A command-line override with an unknown key, a wrong type or a syntax error."""


def load_config(
    config_file: str, overrides: Sequence[str] = (), new_roots: Sequence[str] = ("dataset",)
):
    """`LazyConfig.load` + checked `LazyConfig.apply_overrides` (see the module docstring).

    Raises:
        FileNotFoundError: no such config file (naming similar files in its folder).
        ConfigOverrideError: an override is malformed, names an unknown key or has a wrong type.
    """
    if not os.path.isfile(config_file):
        folder = os.path.dirname(config_file) or "."
        message = f"config file not found: {config_file}"
        if os.path.isdir(folder):
            names = sorted(f for f in os.listdir(folder) if f.endswith((".py", ".yaml")))
            close = difflib.get_close_matches(os.path.basename(config_file), names, n=3)
            if close:
                message += f". Did you mean {', '.join(os.path.join(folder, c) for c in close)}?"
        else:
            message += f" (folder {folder} does not exist)"
        raise FileNotFoundError(message)
    cfg = LazyConfig.load(config_file)
    check_overrides(cfg, overrides, new_roots)
    return LazyConfig.apply_overrides(cfg, list(overrides))


def override_keys(overrides: Sequence[str]) -> list[str]:
    """The config keys that `overrides` (``key=value``, ``+key=value``, ...) set, as Hydra's
    parser reads them (raises `ConfigOverrideError` on a malformed one)."""
    return [o.key_or_group for o in _parse(overrides)]


def _parse(overrides: Sequence[str]) -> list:
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import OverrideParseException

    parser = OverridesParser.create()
    parsed = []
    for line in overrides:
        try:
            parsed += parser.parse_overrides([line])
        except OverrideParseException as e:
            first = str(e).splitlines()[0]
            raise ConfigOverrideError(
                f"cannot parse the override {line!r} ({first}); write key=value, e.g. "
                "train.max_iter=1000, optimizer.lr=1e-4, train.output_dir=out/run1, "
                "model.backbone.bottom_up.stages=[1,2,7,2]"
            ) from None
    return parsed


def _target_parameters(node) -> tuple[list[str], bool] | None:
    """(argument names, takes **kwargs) of a LazyCall'd node's target, or None."""
    if not isinstance(node, DictConfig) or "_target_" not in node:
        return None
    target = node._target_
    if isinstance(target, str):
        from detectron2.utils.registry import locate

        try:
            target = locate(target)
        except Exception:
            return None
    try:
        params = inspect.signature(target).parameters.values()
    except (TypeError, ValueError):
        return None
    names = [p.name for p in params if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
    return names, any(p.kind == p.VAR_KEYWORD for p in params)


def _type_name(value) -> str:
    if isinstance(value, (ListConfig, list, tuple)):
        return "list"
    if isinstance(value, (DictConfig, Mapping)):
        return "config node" if "_target_" in value else "mapping"
    return type(value).__name__


def _type_error(old, new) -> str | None:
    """Why `new` cannot replace `old`, or None."""
    if new is None or old is None or old is _MISSING:
        return None
    if isinstance(old, str) and old.startswith("${"):  # an interpolation: typed where it points
        return None
    if isinstance(old, bool):
        ok = isinstance(new, bool)
    elif isinstance(old, int):
        ok = isinstance(new, int) and not isinstance(new, bool)
    elif isinstance(old, float):
        ok = isinstance(new, (int, float)) and not isinstance(new, bool)
    elif isinstance(old, str):
        ok = isinstance(new, str)
    elif isinstance(old, (ListConfig, list, tuple)):
        ok = isinstance(new, (list, tuple))
    elif isinstance(old, (DictConfig, Mapping)):
        # A LazyCall'd object may also become a name its consumer resolves (norm="LN").
        ok = isinstance(new, Mapping) or (isinstance(new, str) and "_target_" in old)
    else:  # classes, functions: whatever the config holds, a command line cannot express it
        ok = True
    if ok:
        return None
    hint = ""
    if isinstance(old, str):
        hint = f"; to pass it as a string, quote it: '{new}'"
    elif isinstance(old, float) and isinstance(new, str):
        hint = "; write a number, e.g. 1e-4"
    return f"expects a {_type_name(old)} (now {old!r}), got {new!r} ({_type_name(new)}){hint}"


def _keys_near(cfg, key: str) -> list[str]:
    """Existing keys (full dotted names) close to `key`: siblings and same-depth keys."""
    candidates = []

    def walk(node, prefix: str, depth: int):
        if depth > key.count(".") + 1:
            return
        items = node.items() if isinstance(node, DictConfig) else []
        for k, v in items:
            name = f"{prefix}{k}"
            candidates.append(name)
            if isinstance(v, DictConfig):
                walk(v, name + ".", depth + 1)

    walk(cfg, "", 0)
    return difflib.get_close_matches(key, candidates, n=2, cutoff=0.8)


def check_overrides(cfg, overrides: Sequence[str], new_roots: Sequence[str] = ("dataset",)) -> None:
    """Raise `ConfigOverrideError` for the first override that would not do what it says."""
    for o in _parse(overrides):
        key, value, line = o.key_or_group, o.value(), o.input_line
        old = OmegaConf.select(cfg, key, default=_MISSING, throw_on_missing=False)
        if old is _MISSING:
            if o.is_add() or o.is_force_add() or key.split(".")[0] in new_roots:
                continue
            parent_key, _, name = key.rpartition(".")
            parent = OmegaConf.select(cfg, parent_key, default=None) if parent_key else cfg
            params = _target_parameters(parent)
            if params is not None and (name in params[0] or params[1]):
                continue
            message = f"unknown config key {key!r} in the override {line!r}."
            near = _keys_near(cfg, key)
            if params is not None:
                near += [f"{parent_key}.{n}" for n in difflib.get_close_matches(name, params[0], 2)]
            if near:
                message += f" Did you mean {' or '.join(repr(n) for n in dict.fromkeys(near))}?"
            if params is not None:
                message += f" {parent_key} takes: {', '.join(params[0])}."
            elif isinstance(parent, DictConfig):
                message += f" Keys under {parent_key or 'the top level'}: {', '.join(parent)}."
            message += f" To add a new key on purpose, write +{line}."
            raise ConfigOverrideError(message)
        if o.is_force_add():
            continue
        problem = _type_error(old, value)
        if problem:
            raise ConfigOverrideError(f"config key {key!r} in the override {line!r} {problem}.")
