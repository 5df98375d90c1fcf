"""`jsonl`: JSON-lines files (.jsonl, .jsonl.zst, .json.zst, .jsonl.gz), one document per line."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from lmstack.data.sources import register
from lmstack.data.sources.base import InputsOptions, InputsSource, open_text
from lmstack.errors import LMStackError


@dataclass
class JsonlOptions(InputsOptions):
    # The field of each line's object that holds the text.
    text_key: str = "text"
    # Keep only lines whose meta.pile_set_name is one of these (the Pile's subsets, e.g.
    # ["Pile-CC", "Wikipedia (en)"]); null: every line.
    subsets: list[str] | None = None


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


@register("jsonl")
class JsonlSource(InputsSource):
    Options = JsonlOptions
    flat_keys = {**InputsSource.flat_keys, "text_key": "text_key", "pile_subsets": "subsets"}
    suffixes = (".jsonl", ".jsonl.zst", ".json.zst", ".jsonl.gz")

    def read(self, path: Path) -> Iterator[str]:
        return iter_jsonl([path], self.options.text_key, self.options.subsets)

    def reading(self) -> dict:
        return {"text_key": self.options.text_key, "pile_subsets": self.options.subsets}
