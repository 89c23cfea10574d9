"""The configuration machinery: YAML presets, dotted overrides merged into nested trees, typed frozen dataclasses
built from them with did-you-mean errors."""
from __future__ import annotations

import dataclasses
import difflib
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
        return yaml.safe_load(f) or {}


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
    fields = {f.name: f for f in dataclasses.fields(cls)}
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
        elif isinstance(value, list):
            kwargs[name] = tuple(value)
        else:
            kwargs[name] = value
    return cls(**kwargs)


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
