"""`default`: the 42 Shakespeare works shipped with the package as jsonl.zst (see corpus/README.md)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from lmstack.data.sources import register
from lmstack.data.sources.base import Source
from lmstack.data.sources.jsonl import iter_jsonl
from lmstack.errors import LMStackError

DEFAULT_CORPUS = Path(__file__).parent.parent / "corpus" / "shakespeare.jsonl.zst"


@register("default")
class DefaultCorpus(Source):
    def documents(self) -> Iterator[str]:
        if not DEFAULT_CORPUS.is_file():
            raise LMStackError(f"{DEFAULT_CORPUS}: the embedded corpus is missing from the installation")
        return iter_jsonl([DEFAULT_CORPUS])

    def describe(self, max_documents: int | None) -> dict:
        return {"corpus": DEFAULT_CORPUS.name, "max_documents": max_documents}
