"""`text`: plain text files (.txt, .txt.zst, .md, .text): a document per file, paragraph or line."""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from lmstack.data.sources import register
from lmstack.data.sources.base import InputsOptions, InputsSource, open_text
from lmstack.errors import LMStackError


@dataclass
class TextOptions(InputsOptions):
    # One document per file, per blank-line-separated paragraph, or per line.
    doc_split: Literal["file", "blank_lines", "line"] = "file"


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


@register("text")
class TextSource(InputsSource):
    Options = TextOptions
    flat_keys = {**InputsSource.flat_keys, "text_doc_split": "doc_split"}
    suffixes = (".txt", ".txt.zst", ".md", ".text")

    def read(self, path: Path) -> Iterator[str]:
        return iter_text([path], self.options.doc_split)

    def reading(self) -> dict:
        return {"text_doc_split": self.options.doc_split}
