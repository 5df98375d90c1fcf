"""`hf`: a `datasets` data set: a hub name, a folder written by `save_to_disk`, a folder of data files
or a single data file (json/jsonl/csv/parquet/txt), its text read from one column."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from lmstack.data.sources import register
from lmstack.data.sources.base import InputsOptions, InputsSource
from lmstack.errors import ConfigError, LMStackError


@dataclass
class HfOptions(InputsOptions):
    """`inputs`: exactly one data set, a hub name or a local path."""

    # The column holding the text.
    text_key: str = "text"
    # The data set's configuration (hub data sets with several), and the split to read.
    config: str | None = None
    split: str = "train"
    # Read as an iterable data set (no local copy of a hub data set first; the same documents).
    streaming: bool = False


@register("hf")
class HfSource(InputsSource):
    Options = HfOptions
    flat_keys = {
        **InputsSource.flat_keys,
        "text_key": "text_key",
        "hf_config": "config",
        "hf_split": "split",
        "hf_streaming": "streaming",
    }

    def validate(self) -> None:
        super().validate()
        if len(self.options.inputs) != 1:
            raise ConfigError(
                f"{self.where}inputs: source 'hf' takes exactly one data set name or path, "
                f"got {len(self.options.inputs)}"
            )

    def check(self) -> None:
        """None up front: the input may be a hub name; loading it names what is missing."""

    def readers(self) -> list[Callable[[], Iterator[str]]]:
        return [self.documents]  # one data set, one stream

    def documents(self) -> Iterator[str]:
        try:
            import datasets
        except ImportError as err:  # pragma: no cover - datasets is a dependency
            raise LMStackError(f"data.source hf needs the `datasets` package: {err}") from None
        opts, where = self.options, self.where
        name_or_path = opts.inputs[0]
        path = Path(os.path.expanduser(name_or_path))
        try:
            saved = ("dataset_info.json", "state.json", "dataset_dict.json")
            if path.is_dir() and any((path / name).exists() for name in saved):
                ds = datasets.load_from_disk(str(path))
                if isinstance(ds, datasets.DatasetDict):
                    if opts.split not in ds:
                        raise LMStackError(
                            f"{path}: no split '{opts.split}' (has {sorted(ds)}); set {where}split"
                        )
                    ds = ds[opts.split]
                if opts.streaming:
                    ds = ds.to_iterable_dataset()
            elif path.is_file():
                builder = _builder_for(path)
                ds = datasets.load_dataset(
                    builder, data_files=str(path), split=opts.split, streaming=opts.streaming
                )
            else:
                ds = datasets.load_dataset(
                    name_or_path, opts.config, split=opts.split, streaming=opts.streaming
                )
        except LMStackError:
            raise
        except Exception as err:
            raise LMStackError(
                f"{where}inputs[0]: cannot load data set '{name_or_path}': {type(err).__name__}: {err}"
            ) from None
        columns = getattr(ds, "column_names", None)
        if columns is not None and opts.text_key not in columns:
            raise LMStackError(
                f"data set '{name_or_path}': no column '{opts.text_key}' (has {columns}); set {where}text_key"
            )
        return _texts(ds, opts.text_key)

    def reading(self) -> dict:
        return {
            "text_key": self.options.text_key,
            "hf_config": self.options.config,
            "hf_split": self.options.split,
        }


def _texts(ds, text_key: str) -> Iterator[str]:
    for row in ds:
        text = row[text_key]
        if isinstance(text, str) and text:
            yield text


def _builder_for(path: Path) -> str:
    name = path.name.lower()
    for suffixes, builder in (
        ((".jsonl", ".json", ".jsonl.gz", ".json.gz", ".jsonl.zst", ".json.zst"), "json"),
        ((".parquet",), "parquet"),
        ((".csv", ".tsv"), "csv"),
        ((".txt", ".txt.gz"), "text"),
    ):
        if name.endswith(suffixes):
            return builder
    raise LMStackError(f"{path}: cannot tell the data set format from the name (json/jsonl/parquet/csv/txt)")
