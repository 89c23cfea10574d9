"""The configuration machinery: YAML presets, dotted overrides merged into nested trees, typed frozen dataclasses
built from them with did-you-mean errors, and a type check of every value against its field's annotation."""
from __future__ import annotations

import dataclasses
import difflib
import re
import types
import typing
from pathlib import Path
from typing import Any

import yaml

from engine.errors import UserError

PRESET_DIR = Path(__file__).parents[1] / "configs"


def check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        hint = difflib.get_close_matches(str(value), choices, n=1)
        suggestion = f" Did you mean '{hint[0]}'?" if hint else ""
        raise UserError(f"unknown {name} '{value}'; choose one of {', '.join(choices)}.{suggestion}")


def available_presets() -> list[str]:
    return sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))


def load_preset(name: str) -> dict[str, Any]:
    presets = available_presets()
    if name not in presets:
        check_choice("preset", name, tuple(presets))
    with open(PRESET_DIR / f"{name}.yaml") as f:
        return load_yaml(f) or {}


class _ConfigLoader(yaml.SafeLoader):
    """YAML as the 1.2 core schema reads plain scalars: only true/false are booleans (`off`, `no`, `on`, `yes` stay
    words, as `--set train.amp=off` means), and 5e-4 is a number (YAML 1.1 wants a dot: 5.0e-4)."""


_BOOL_TAG, _FLOAT_TAG = "tag:yaml.org,2002:bool", "tag:yaml.org,2002:float"
_ConfigLoader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag not in (_BOOL_TAG, _FLOAT_TAG)]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()}
_ConfigLoader.add_implicit_resolver(_BOOL_TAG, re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF"))
_ConfigLoader.add_implicit_resolver(  # after the int resolver of the same first characters: 5 stays an int
    _FLOAT_TAG, re.compile(r"^(?:[-+]?(?:\.[0-9]+|[0-9]+(?:\.[0-9]*)?)(?:[eE][-+]?[0-9]+)?"
                           r"|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$"), list("-+0123456789."))


def load_yaml(stream) -> Any:
    """Parse a config YAML (a preset, a study file, a `--set` value): safe, and with the 1.2 rules of `_ConfigLoader`."""
    return yaml.load(stream, Loader=_ConfigLoader)  # _ConfigLoader is a SafeLoader


def load_config_file(path: str | Path) -> dict[str, Any]:
    """The settings of a YAML file for --config: a run's saved config.yaml, or one written by hand."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"--config {path}: no such file")
    try:
        tree = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise UserError(f"--config {path}: not valid YAML ({str(err).splitlines()[0]})") from None
    if not isinstance(tree, dict):
        raise UserError(f"--config {path}: expected a mapping of settings, like a run's config.yaml")
    return tree


def build_dataclass(cls, tree: dict[str, Any], where: str):
    """`cls` from a nested tree of plain values; every value is checked against its field's annotation and
    converted when that loses nothing (3 -> 3.0, "5e-4" -> 5e-4, [1, 2, 3] -> a tuple), else refused in one line."""
    if not isinstance(tree, dict):
        raise UserError(f"setting '{where.rstrip('.')}' is a section of settings (KEY: VALUE), got {tree!r}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kinds = typing.get_type_hints(cls)
    unknown = [k for k in tree if k not in fields]
    if unknown:
        hint = difflib.get_close_matches(unknown[0], list(fields), n=1)
        suggestion = f" Did you mean '{where}{hint[0]}'?" if hint else ""
        raise UserError(f"unknown setting '{where}{unknown[0]}'.{suggestion}")
    kwargs = {}
    for name, value in tree.items():
        default = fields[name].default_factory() if fields[name].default_factory is not dataclasses.MISSING else None
        if dataclasses.is_dataclass(default):
            kwargs[name] = build_dataclass(type(default), value or {}, f"{where}{name}.")
        else:
            kwargs[name] = coerce(value, kinds[name], f"{where}{name}")
    return cls(**kwargs)


# the words YAML 1.1 reads as booleans (what a file read by another YAML library may hold for a bool setting)
YAML11_BOOLS = {"true": True, "false": False, "yes": True, "no": False, "on": True, "off": False}
_INTEGER = re.compile(r"^[-+]?[0-9]+$")


def coerce(value: Any, kind: Any, name: str) -> Any:
    """`value` as the annotation `kind` wants it, converted only without loss; a UserError naming the setting, the
    value and the expected type otherwise."""
    converted = _convert(value, kind)
    if converted is _REFUSED:
        raise UserError(f"setting '{name}' expects {describe_type(kind)}, got {value!r}")
    return converted


_REFUSED = object()


def _convert(value: Any, kind: Any) -> Any:
    origin, args = typing.get_origin(kind), typing.get_args(kind)
    if kind is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None:
            return None if type(None) in args else _REFUSED
        arms = [arm for arm in args if arm is not type(None)]
        exact = next((arm for arm in arms if type(value) is arm), None)  # 5 for int | str stays the int 5
        for arm in ([exact] if exact is not None else []) + arms:
            converted = _convert(value, arm)
            if converted is not _REFUSED:
                return converted
        return _REFUSED
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            return _REFUSED
        if len(args) == 2 and args[1] is Ellipsis:
            items = [_convert(v, args[0]) for v in value]
        elif len(args) == len(value):
            items = [_convert(v, arm) for v, arm in zip(value, args)]
        else:
            return _REFUSED
        return _REFUSED if any(item is _REFUSED for item in items) else tuple(items)
    if kind is dict or origin is dict:
        return dict(value) if isinstance(value, dict) else _REFUSED
    if kind is bool:
        if isinstance(value, bool):
            return value
        return YAML11_BOOLS.get(value.lower(), _REFUSED) if isinstance(value, str) else _REFUSED
    if kind is int:
        if isinstance(value, bool):
            return _REFUSED
        if isinstance(value, int):
            return value
        if isinstance(value, float):
            return int(value) if value.is_integer() else _REFUSED
        if isinstance(value, str) and _INTEGER.match(value.strip()):
            return int(value)
        return _REFUSED
    if kind is float:
        if isinstance(value, bool):
            return _REFUSED
        if isinstance(value, int):
            return float(value) if abs(value) <= 2**53 else _REFUSED
        if isinstance(value, float):
            return value
        if isinstance(value, str):  # "5e-4": YAML 1.1 reads a number without a dot as a string
            try:
                return float(value)
            except ValueError:
                return _REFUSED
        return _REFUSED
    if kind is str:
        return value if isinstance(value, str) else _REFUSED
    if isinstance(kind, type):
        return value if isinstance(value, kind) else _REFUSED
    return value


def describe_type(kind: Any) -> str:
    """An annotation in words: 'a number', 'a list of integers', "an integer or a string"..."""
    origin, args = typing.get_origin(kind), typing.get_args(kind)
    if origin in (typing.Union, types.UnionType):
        return " or ".join("null" if arm is type(None) else describe_type(arm) for arm in args)
    if origin is tuple:
        if len(args) == 2 and args[1] is Ellipsis:
            return f"a list of {_PLURAL.get(args[0], 'values')}"
        return f"a list of {len(args)} values"
    if kind is dict or origin is dict:
        return "a mapping (KEY: VALUE, ...)"
    return _SINGULAR.get(kind, getattr(kind, "__name__", str(kind)))


_SINGULAR = {int: "an integer", float: "a number", bool: "true or false", str: "a string"}
_PLURAL = {int: "integers", float: "numbers", bool: "booleans", str: "strings"}


def merge_trees(base: dict, extra: dict) -> dict:
    out = dict(base)
    for key, value in extra.items():
        out[key] = merge_trees(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def undot(flat: dict[str, Any]) -> dict[str, Any]:
    tree: dict[str, Any] = {}
    for key, value in flat.items():
        node = tree
        *parents, leaf = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return tree


def to_plain(value):
    if isinstance(value, dict):
        return {k: to_plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_plain(v) for v in value]
    return value
