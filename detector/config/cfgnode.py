"""The config library: a validated tree of YAML keys in Detectron2's naming (the keys themselves are
declared by `detector.config.defaults` and, for training, `e2e_vl.config`).

Every key must exist in the defaults: an unknown or mistyped key is an error that names the key, the
file it came from and the closest valid key (Detectron2/yacs fail too, but without a suggestion).
Values are type-checked against the default. A YAML file may name `_BASE_` files (relative to itself)
that are merged first.
"""
from __future__ import annotations

import copy
import difflib
import os
from typing import Any, Callable, Iterable

import yaml

BASE_KEY = "_BASE_"


class ConfigError(ValueError):
    """A config file or override that does not fit the schema."""


class CfgNode(dict):
    """A dict with attribute access whose keys are fixed by its defaults.

    `new_allowed` nodes accept keys that are not in the defaults (for free-form sections).
    """

    def __init__(self, init: dict | None = None, new_allowed: bool = False):
        super().__init__()
        object.__setattr__(self, "_frozen", False)
        object.__setattr__(self, "_new_allowed", new_allowed)
        for key, value in (init or {}).items():
            is_plain_dict = isinstance(value, dict) and not isinstance(value, CfgNode)
            self[key] = CfgNode(value) if is_plain_dict else value

    # attribute access -------------------------------------------------------------------------------
    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(f"config has no key '{name}'{_did_you_mean(name, self.keys())}") from None

    def __setattr__(self, name: str, value: Any) -> None:
        if self._frozen:
            raise ConfigError(f"config is frozen; cannot set '{name}'")
        self[name] = value

    def __setitem__(self, key: str, value: Any) -> None:
        if getattr(self, "_frozen", False):
            raise ConfigError(f"config is frozen; cannot set '{key}'")
        super().__setitem__(key, value)

    def __deepcopy__(self, memo: dict) -> "CfgNode":
        out = CfgNode(new_allowed=self._new_allowed)
        for key, value in self.items():
            dict.__setitem__(out, key, copy.deepcopy(value, memo))
        return out

    def __reduce__(self):
        return (_rebuild, (self.to_dict(), self._new_allowed))

    # life cycle ---------------------------------------------------------------------------------------
    def clone(self) -> "CfgNode":
        return copy.deepcopy(self)

    def freeze(self, frozen: bool = True) -> "CfgNode":
        object.__setattr__(self, "_frozen", frozen)
        for value in self.values():
            if isinstance(value, CfgNode):
                value.freeze(frozen)
        return self

    def is_frozen(self) -> bool:
        return self._frozen

    def to_dict(self) -> dict:
        return {k: (v.to_dict() if isinstance(v, CfgNode) else copy.deepcopy(v)) for k, v in self.items()}

    def dump(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False, default_flow_style=None)

    # merging ------------------------------------------------------------------------------------------
    def merge_from_file(self, path: str | os.PathLike) -> "CfgNode":
        """Merge a YAML file (and its `_BASE_` chain) into this config."""
        self.merge_from_dict(load_yaml_with_base(path), source=str(path))
        return self

    def merge_from_dict(self, other: dict, source: str = "<dict>", prefix: str = "",
                        root: "CfgNode | None" = None) -> "CfgNode":
        """Merge `other` into this node (`prefix`: this node's dotted path; `root`: the whole config, where
        an unknown key's name is looked up when nothing close is in this node: a key that moved)."""
        root = self if root is None else root
        if self._frozen:
            raise ConfigError("config is frozen; clone() it before merging")
        if not isinstance(other, dict):
            raise ConfigError(f"{source}: '{prefix or '<root>'}' must be a mapping, "
                              f"got {type(other).__name__}")
        for key, value in other.items():
            full = f"{prefix}{key}"
            if key == BASE_KEY:
                continue
            if key not in self:
                if self._new_allowed:
                    self[key] = CfgNode(value) if isinstance(value, dict) else value
                    continue
                hint = _did_you_mean(key, self.keys(), prefix) or _moved_to(key, root)
                raise ConfigError(f"{source}: unknown config key '{full}'{hint}")
            current = self[key]
            if isinstance(current, CfgNode):
                if not isinstance(value, dict):
                    raise ConfigError(f"{source}: '{full}' is a section; expected a mapping, got {value!r}")
                current.merge_from_dict(value, source, prefix=full + ".", root=root)
            else:
                self[key] = _check_type(full, current, value, source)
        return self

    def merge_from_list(self, pairs: Iterable[str]) -> "CfgNode":
        """Merge command-line overrides `["MODEL.DEVICE", "cpu", "SOLVER.BASE_LR", "1e-4"]`."""
        pairs = list(pairs)
        if len(pairs) % 2:
            raise ConfigError(f"overrides must be KEY VALUE pairs; got an odd number of items: {pairs}")
        for full, text in zip(pairs[0::2], pairs[1::2]):
            try:
                value = yaml.safe_load(text) if isinstance(text, str) else text
            except yaml.YAMLError as exc:
                raise ConfigError(f"override {full}: cannot parse value {text!r}: {exc}") from None
            nested: Any = value
            for part in reversed(full.split(".")):
                nested = {part: nested}
            self.merge_from_dict(nested, source="command line")
        return self


def load_config(defaults: CfgNode, path: str | os.PathLike | None, overrides: Iterable[str],
                validate: Callable[[CfgNode], None]) -> CfgNode:
    """`defaults` merged with a YAML file (and its bases) and `KEY VALUE` overrides, validated, frozen."""
    if path:
        defaults.merge_from_file(path)
    defaults.merge_from_list(list(overrides))
    validate(defaults)
    return defaults.freeze()


def _rebuild(d: dict, new_allowed: bool) -> CfgNode:
    return CfgNode(d, new_allowed=new_allowed)


def _moved_to(key: str, root: CfgNode) -> str:
    """"; did you mean 'A.B.KEY'?" for the first key of the same name anywhere in `root`, else ""."""
    stack: list[tuple[str, CfgNode]] = [("", root)]
    while stack:
        prefix, node = stack.pop(0)
        if key in node:
            return f"; did you mean '{prefix}{key}'?"
        stack += [(f"{prefix}{k}.", v) for k, v in node.items() if isinstance(v, CfgNode)]
    return ""


def _did_you_mean(key: str, candidates: Iterable[str], prefix: str = "") -> str:
    close = difflib.get_close_matches(key, list(candidates), n=1, cutoff=0.5)
    return f"; did you mean '{prefix}{close[0]}'?" if close else ""


def _check_type(full: str, default: Any, value: Any, source: str) -> Any:
    """Return `value` converted to the default's type, or raise naming the key."""
    if default is None or value is None:
        return value
    if isinstance(default, bool):
        if isinstance(value, bool):
            return value
    elif isinstance(default, int):
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif isinstance(default, float):
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads "1e-4" (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
    elif isinstance(default, str):
        if isinstance(value, str):
            return value
    elif isinstance(default, (list, tuple)):
        if isinstance(value, (list, tuple)):
            return type(default)(value)
    else:
        return value
    raise ConfigError(
        f"{source}: '{full}' expects {type(default).__name__} (default {default!r}), "
        f"got {type(value).__name__} {value!r}"
    )


def load_yaml_with_base(path: str | os.PathLike, _seen: tuple[str, ...] = ()) -> dict:
    """Read a YAML file, merging the files named by `_BASE_` (relative paths are relative to it)."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ConfigError(f"config file not found: {path}")
    real = os.path.realpath(path)
    if real in _seen:
        raise ConfigError(f"{path}: circular {BASE_KEY} chain: {' -> '.join(_seen + (real,))}")
    with open(path, encoding="utf-8") as f:
        try:
            data = yaml.safe_load(f) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of keys, got {type(data).__name__}")
    bases = data.pop(BASE_KEY, None)
    if bases is None:
        return data
    merged: dict = {}
    for base in [bases] if isinstance(bases, str) else bases:
        base_path = base if os.path.isabs(base) else os.path.join(os.path.dirname(path), base)
        _deep_update(merged, load_yaml_with_base(base_path, _seen + (real,)))
    _deep_update(merged, data)
    return merged


def lookup(cfg: dict, full: str) -> Any:
    """The value at a dotted key path such as "MODEL.RPN.NMS_THRESH"."""
    value: Any = cfg
    for part in full.split("."):
        value = value[part]
    return value


def check_choices(cfg: CfgNode, choices: dict[str, tuple[tuple[Any, ...], str]]) -> None:
    """Raise ConfigError naming the first key (dotted path) whose value is not one of its declared choices.

    `choices` maps a key to (allowed values, why); the why ends up in the message, so a user who set a
    Detectron2 value this project does not implement learns what is supported instead of being ignored.
    """
    for full, (allowed, why) in choices.items():
        value = lookup(cfg, full)
        if value not in allowed:
            expected = repr(allowed[0]) if len(allowed) == 1 else f"one of {list(allowed)}"
            raise ConfigError(f"'{full}' must be {expected}{f' ({why})' if why else ''}, got {value!r}")


def _deep_update(dst: dict, src: dict) -> None:
    for key, value in src.items():
        if isinstance(value, dict) and isinstance(dst.get(key), dict):
            _deep_update(dst[key], value)
        else:
            dst[key] = copy.deepcopy(value)
