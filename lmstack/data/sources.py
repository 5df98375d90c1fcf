"""Where documents come from: Pile-style jsonl(.zst) shards, plain text files, `datasets` data sets,
and the Shakespeare corpus shipped with the package.

Every source yields documents (non-empty strings) in a fixed order, so that preparation is
deterministic and a re-run can recognise the shards it already wrote.
"""

from __future__ import annotations

import glob
import io
import json
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from lmstack.errors import ConfigError, LMStackError

if TYPE_CHECKING:
    from lmstack.config import DataConfig

#: The corpus `source: default` prepares: 42 Shakespeare works as jsonl.zst (see corpus/README.md).
DEFAULT_CORPUS = Path(__file__).with_name("corpus") / "shakespeare.jsonl.zst"

JSONL_SUFFIXES = (".jsonl", ".jsonl.zst", ".json.zst", ".jsonl.gz")
TEXT_SUFFIXES = (".txt", ".txt.zst", ".md", ".text")


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


def expand_inputs(patterns: list[str], suffixes: tuple[str, ...], field: str = "data.inputs") -> list[Path]:
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


def iter_jsonl(files: list[Path], text_key: str = "text", subsets: list[str] | None = None) -> Iterator[str]:
    """Documents of Pile-format jsonl files: one JSON object per line with the text under `text_key`
    and, in the Pile, `meta.pile_set_name` (kept only when in `subsets`, unless that is None)."""
    keep = set(subsets) if subsets is not None else None
    for path in files:
        try:
            with open_text(path) as f:
                for lineno, line in enumerate(f, 1):
                    if not line.strip():
                        continue
                    try:
                        obj = json.loads(line)
                    except json.JSONDecodeError as err:
                        raise LMStackError(f"{path}:{lineno}: not a JSON line ({err.msg})") from None
                    if not isinstance(obj, dict) or not isinstance(obj.get(text_key), str):
                        raise LMStackError(
                            f"{path}:{lineno}: expected an object with a string '{text_key}' field"
                        )
                    if keep is not None:
                        meta = obj.get("meta")
                        name = meta.get("pile_set_name") if isinstance(meta, dict) else None
                        if name not in keep:
                            continue
                    if obj[text_key]:
                        yield obj[text_key]
        except (OSError, UnicodeDecodeError, EOFError) as err:
            raise LMStackError(f"{path}: cannot read: {err}") from None
        except Exception as err:  # zstandard.ZstdError and the like: a corrupt compressed file
            if isinstance(err, LMStackError):
                raise
            raise LMStackError(f"{path}: cannot read: {type(err).__name__}: {err}") from None


def iter_text(files: list[Path], split: str = "file") -> Iterator[str]:
    """Documents of plain text files: a whole file, blank-line-separated paragraphs, or lines."""
    for path in files:
        try:
            with open_text(path) as f:
                if split == "line":
                    for line in f:
                        line = line.rstrip("\n")
                        if line.strip():
                            yield line
                    continue
                text = f.read()
        except (OSError, UnicodeDecodeError, EOFError) as err:
            raise LMStackError(f"{path}: cannot read as UTF-8 text: {err}") from None
        if split == "file":
            if text.strip():
                yield text
        else:
            for para in re.split(r"\n[ \t]*\n", text):
                if para.strip():
                    yield para.strip("\n")


def iter_hf(
    name_or_path: str,
    text_key: str = "text",
    config: str | None = None,
    split: str = "train",
    streaming: bool = False,
) -> Iterator[str]:
    """Documents of a `datasets` data set: a hub name, a folder written by `save_to_disk`, a folder
    of data files or a single data file (json/jsonl/csv/parquet/txt), read from `text_key`."""
    try:
        import datasets
    except ImportError as err:  # pragma: no cover - datasets is a dependency
        raise LMStackError(f"data.source hf needs the `datasets` package: {err}") from None
    path = Path(os.path.expanduser(name_or_path))
    try:
        saved = ("dataset_info.json", "state.json", "dataset_dict.json")
        if path.is_dir() and any((path / name).exists() for name in saved):
            ds = datasets.load_from_disk(str(path))
            if isinstance(ds, datasets.DatasetDict):
                if split not in ds:
                    raise LMStackError(f"{path}: no split '{split}' (has {sorted(ds)}); set data.hf_split")
                ds = ds[split]
            if streaming:
                ds = ds.to_iterable_dataset()
        elif path.is_file():
            builder = _builder_for(path)
            ds = datasets.load_dataset(builder, data_files=str(path), split=split, streaming=streaming)
        else:
            ds = datasets.load_dataset(name_or_path, config, split=split, streaming=streaming)
    except LMStackError:
        raise
    except Exception as err:
        raise LMStackError(
            f"data.inputs[0]: cannot load data set '{name_or_path}': {type(err).__name__}: {err}"
        ) from None
    columns = getattr(ds, "column_names", None)
    if columns is not None and text_key not in columns:
        raise LMStackError(
            f"data set '{name_or_path}': no column '{text_key}' (has {columns}); set data.text_key"
        )
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


def iter_documents(cfg: DataConfig) -> Iterator[str]:
    """All documents the data config names, in a fixed order (limited by `cfg.max_documents`)."""
    if cfg.source == "default":
        if not DEFAULT_CORPUS.is_file():
            raise LMStackError(f"{DEFAULT_CORPUS}: the embedded corpus is missing from the installation")
        docs = iter_jsonl([DEFAULT_CORPUS])
    elif cfg.source in ("jsonl", "pile"):
        docs = iter_jsonl(expand_inputs(cfg.inputs, JSONL_SUFFIXES), cfg.text_key, cfg.pile_subsets)
    elif cfg.source == "text":
        docs = iter_text(expand_inputs(cfg.inputs, TEXT_SUFFIXES), cfg.text_doc_split)
    elif cfg.source == "hf":
        docs = iter_hf(cfg.inputs[0], cfg.text_key, cfg.hf_config, cfg.hf_split, cfg.hf_streaming)
    else:  # pragma: no cover - the schema restricts the values
        raise ConfigError(f"data.source: unknown source '{cfg.source}'")
    for i, doc in enumerate(docs):
        if cfg.max_documents is not None and i >= cfg.max_documents:
            return
        yield doc


def check_inputs(cfg: DataConfig) -> None:
    """Raise ConfigError naming the entry of data.inputs that names no file (jsonl/pile/text)."""
    if cfg.source in ("jsonl", "pile"):
        expand_inputs(cfg.inputs, JSONL_SUFFIXES)
    elif cfg.source == "text":
        expand_inputs(cfg.inputs, TEXT_SUFFIXES)


def describe_source(cfg: DataConfig) -> dict:
    """The settings that decide which documents come out, in the order they do (recorded in the index)."""
    if cfg.source == "default":
        return {"source": "default", "corpus": DEFAULT_CORPUS.name, "max_documents": cfg.max_documents}
    out: dict = {"source": cfg.source, "inputs": list(cfg.inputs), "max_documents": cfg.max_documents}
    if cfg.source in ("jsonl", "pile"):
        out.update(text_key=cfg.text_key, pile_subsets=cfg.pile_subsets)
    elif cfg.source == "text":
        out.update(text_doc_split=cfg.text_doc_split)
    else:
        out.update(text_key=cfg.text_key, hf_config=cfg.hf_config, hf_split=cfg.hf_split)
    return out
