"""Run configuration: YAML files under configs/, command-line overrides, validation.

A run config has one section per room: `model` (lmstack.model.ModelConfig), `data`, `train` and
`parallel`.
Overrides are `section.field=value` with the value parsed as YAML (`model.n_layers=4`,
`model.layer_mixers=[attention,lightning]`). Every error names the file and the field.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import yaml

from lmstack.config.schema import DataConfig, ParallelConfig, RunConfig, TrainConfig, move_flat_source_keys
from lmstack.errors import ConfigError
from lmstack.model.config import ModelConfig
from lmstack.model.schema import from_dict, unknown_key_message

__all__ = [
    "DataConfig",
    "ModelConfig",
    "ParallelConfig",
    "RunConfig",
    "TrainConfig",
    "apply_overrides",
    "load_config",
]


def _read_yaml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from None
    if not isinstance(data, dict):
        raise ConfigError(
            f"{path}: expected a mapping of sections (model, data, train, parallel) at the top level"
        )
    return data


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Set `a.b.c=value` entries into a nested dict (value parsed as YAML). Returns `data`."""
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override '{item}': expected the form section.field=value")
        try:
            value = yaml.safe_load(raw)
        except yaml.YAMLError:
            value = raw
        node = data
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override '{item}': '{part}' is not a section")
        node[parts[-1]] = value
    return data


def load_config(path: str | Path | None, overrides: list[str] = ()) -> RunConfig:
    """Load and validate a run config; `path=None` starts from the defaults."""
    source = str(path) if path is not None else "<defaults>"
    data = _read_yaml(Path(path)) if path is not None else {}
    data = apply_overrides(data, list(overrides))
    sections = [f.name for f in dataclasses.fields(RunConfig)]
    for key in data:
        if key not in sections:
            raise ConfigError(f"{source}: {unknown_key_message(str(key), sections)}")
    try:
        if isinstance(data.get("data"), dict):
            move_flat_source_keys(data["data"])
        return from_dict(RunConfig, data)
    except ConfigError as err:
        raise ConfigError(f"{source}: {err}") from None


def dump_config(config: RunConfig) -> str:
    return yaml.safe_dump(dataclasses.asdict(config), sort_keys=False)
