"""The registry of data sources: `data.source` names one by these keys (stable across releases), its
options go under `data.source_options.<name>`.

Adding a source: one new module that defines a `Source` subclass decorated with `@register`, plus its
import line below (see lmstack/data/sources/base.py for the interface).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

from lmstack.data.sources.base import Source
from lmstack.model.schema import Registry, from_dict

if TYPE_CHECKING:
    from lmstack.config import DataConfig

SOURCES: Registry[type[Source]] = Registry("data source")
register = SOURCES.register
get_source = SOURCES.lookup


def open_source(cfg: DataConfig, prefix: str = "data.") -> Source:
    """The source `cfg.source` with its options from `cfg.source_options` (errors name the option as
    `{prefix}source_options.<name>.<key>`)."""
    cls = get_source(cfg.source)
    where = f"{prefix}source_options.{cfg.source}."
    return cls(from_dict(cls.Options, cfg.source_options.get(cfg.source, {}), where), where)


def iter_documents(cfg: DataConfig) -> Iterator[str]:
    """All documents the data config names, in a fixed order (limited by `cfg.max_documents`)."""
    for i, doc in enumerate(open_source(cfg).documents()):
        if cfg.max_documents is not None and i >= cfg.max_documents:
            return
        yield doc


def describe_source(cfg: DataConfig) -> dict:
    """The settings that decide which documents come out (the `source` record of prepare.json)."""
    return {"source": cfg.source, **open_source(cfg).describe(cfg.max_documents)}


# One line per source.
from lmstack.data.sources import default
from lmstack.data.sources import hf
from lmstack.data.sources import jsonl
from lmstack.data.sources import pile
from lmstack.data.sources import text

__all__ = ["SOURCES", "Source", "describe_source", "get_source", "iter_documents", "open_source", "register"]
