"""The one interface every data source implements, and the pieces that file-reading sources share.

A source turns its options into documents: non-empty strings in a fixed order, so that preparation
is deterministic and a re-run can recognise the shards it already wrote. Besides reading it owns:
- its options, a dataclass (`Source.Options`) filled from `data.source_options.<name>`, so that a
  misspelt option is caught like any other key;
- the checks of those options (`validate`, whenever a config loads) and of its inputs (`check`,
  before prepare-data writes anything), each error naming the option as `data.source_options.<name>.<key>`;
- its record in prepare.json (`describe`): the settings that decide which documents come out. A
  prepared folder is only re-used under the same record, so a source keeps its record stable.
"""

from __future__ import annotations

import functools
import glob
import io
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from lmstack.errors import ConfigError


@dataclass
class NoOptions:
    """Options of a source that has none."""


class Source:
    """Base class of all data sources; subclasses register themselves with `@register("name")`.

    A source is built from its typed options and `where`, the config path of its options section
    ("data.source_options.<name>."), by which its errors name a field: `where + key`.
    """

    name: ClassVar[str] = ""
    Options: ClassVar[type] = NoOptions
    # Flat `data.<key>` fields of configs written before the source registry that are this source's
    # options now: old key -> key in `data.source_options.<name>` (`load_config` moves them there).
    flat_keys: ClassVar[dict[str, str]] = {}

    def __init__(self, options: Any, where: str) -> None:
        self.options = options
        self.where = where

    def validate(self) -> None:
        """Raise ConfigError naming the option (`self.where + key`) if the options cannot work. Runs
        whenever a config loads, so it must not touch the file system. Default: no check."""

    def check(self) -> None:
        """Raise LMStackError naming the option if an input is missing, before prepare-data writes
        anything. Default: no check."""

    def documents(self) -> Iterator[str]:
        """The documents (non-empty strings), in a fixed order. Errors name the file (and line)."""
        raise NotImplementedError

    def readers(self) -> list[Callable[[], Iterator[str]]]:
        """The inputs as document streams that can be read independently (one per file), whose
        concatenation is `documents()`: prepare-data reads them in parallel and shares them out over
        `--part`s. Default: the one stream `documents()`."""
        return [self.documents]

    def describe(self, max_documents: int | None) -> dict:
        """The settings that decide which documents come out (prepare.json's `source`, after its
        `source` key), with `data.max_documents`, the cap every source shares, where the record has
        always had it. Keep the keys and their order: a folder is re-used only under the same record."""
        raise NotImplementedError


@dataclass
class InputsOptions:
    # Files, folders (searched recursively for the source's file types) or glob patterns.
    inputs: list[str] = field(default_factory=list)


class InputsSource(Source):
    """A source that reads what `inputs` names: files, folders and glob patterns, expanded in a stable
    order (`files`) and checked up front (`check`), unless a subclass reads its inputs otherwise."""

    Options = InputsOptions
    flat_keys = {"inputs": "inputs"}
    # The file names a folder in `inputs` is searched for.
    suffixes: ClassVar[tuple[str, ...]] = ()

    def validate(self) -> None:
        if not self.options.inputs:
            raise ConfigError(
                f"{self.where}inputs: source '{self.name}' needs at least one file, folder, pattern or data set"
            )

    def check(self) -> None:
        self.files()

    def read(self, path: Path) -> Iterator[str]:
        """The documents of one input file."""
        raise NotImplementedError

    def documents(self) -> Iterator[str]:
        for path in self.files():
            yield from self.read(path)

    def readers(self) -> list[Callable[[], Iterator[str]]]:
        return [functools.partial(self.read, path) for path in self.files()]

    def files(self) -> list[Path]:
        return expand_inputs(self.options.inputs, self.suffixes, f"{self.where}inputs")

    def describe(self, max_documents: int | None) -> dict:
        return {"inputs": list(self.options.inputs), "max_documents": max_documents, **self.reading()}

    def reading(self) -> dict:
        """How the inputs become documents (recorded after `inputs` and `max_documents`)."""
        return {}


def open_text(path: Path) -> io.TextIOBase:
    """Open a text file for reading, decompressing `.zst` and `.gz` on the fly."""
    name = path.name
    if name.endswith(".zst"):
        import zstandard

        raw = path.open("rb")
        stream = zstandard.ZstdDecompressor().stream_reader(raw, read_across_frames=True, closefd=True)
        return io.TextIOWrapper(io.BufferedReader(stream), encoding="utf-8")
    if name.endswith(".gz"):
        import gzip

        return gzip.open(path, "rt", encoding="utf-8")
    return path.open("r", encoding="utf-8")


def expand_inputs(patterns: list[str], suffixes: tuple[str, ...], field: str) -> list[Path]:
    """Files named by `patterns` (files, folders searched recursively for `suffixes`, glob patterns),
    in a stable sorted order per pattern. Raises ConfigError naming the pattern that matched nothing."""
    files: list[Path] = []
    for i, pattern in enumerate(patterns):
        path = Path(os.path.expanduser(pattern))
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.is_file() and p.name.endswith(suffixes))
        elif path.is_file():
            found = [path]
        else:
            found = sorted(Path(p) for p in glob.glob(os.path.expanduser(pattern), recursive=True))
            found = [p for p in found if p.is_file()]
        if not found:
            what = "folder has no " + "/".join(suffixes) + " files" if path.is_dir() else "no such file"
            raise ConfigError(f"{field}[{i}]: '{pattern}': {what}")
        files.extend(found)
    return files
