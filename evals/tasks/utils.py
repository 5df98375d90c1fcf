"""Loaders of the offline task pack: the data files live next to this file, so the tasks work
from any working directory and need neither the hub nor the `datasets` cache."""

from __future__ import annotations

import json
from pathlib import Path

import datasets

HERE = Path(__file__).resolve().parent


def _read(name: str) -> datasets.Dataset:
    with open(HERE / name, encoding="utf-8") as f:
        return datasets.Dataset.from_list([json.loads(line) for line in f if line.strip()])


def load_lambada(**kwargs) -> dict[str, datasets.Dataset]:
    return {"test": _read("lmstack_lambada.jsonl")}


def load_mc(**kwargs) -> dict[str, datasets.Dataset]:
    return {"test": _read("lmstack_mc.jsonl")}
