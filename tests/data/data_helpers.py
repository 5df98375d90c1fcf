"""Helpers of the data tests: tiny corpora the tests write themselves (imported as `data_helpers`)."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np

from lmstack.config import DataConfig
from lmstack.model.schema import from_dict

WORDS = [
    "the",
    "of",
    "and",
    "to",
    "in",
    "a",
    "is",
    "that",
    "for",
    "it",
    "as",
    "was",
    "with",
    "be",
    "by",
    "on",
    "not",
    "he",
    "i",
    "this",
    "are",
    "or",
    "his",
    "from",
    "at",
    "which",
    "but",
    "have",
    "an",
    "they",
    "you",
    "were",
    "her",
    "she",
    "there",
    "all",
    "one",
    "so",
    "what",
    "when",
    "we",
    "their",
    "if",
    "would",
    "will",
    "my",
    "more",
    "some",
    "out",
    "into",
    "time",
    "them",
    "king",
    "queen",
    "lord",
    "lady",
    "sword",
    "crown",
    "night",
    "day",
    "love",
    "death",
    "heart",
    "blood",
    "fair",
    "good",
    "sweet",
    "noble",
    "gentle",
    "brave",
    "café",
    "naïve",
    "façade",
    "—",
    "“quoted”",
    "‘single’",
    "日本",
    "Ωmega",
    "ünïcödé",
    "tab\tend",
]


def make_docs(n: int, seed: int = 0, min_words: int = 5, max_words: int = 120) -> list[str]:
    """n deterministic English-like documents with punctuation, newlines and some non-ASCII text."""
    rng = random.Random(seed)
    docs = []
    for i in range(n):
        words = [rng.choice(WORDS) for _ in range(rng.randint(min_words, max_words))]
        text, line = [], []
        for w in words:
            line.append(w)
            if rng.random() < 0.1:
                text.append(" ".join(line) + rng.choice([".", ",", "!", "?", ";"]))
                line = []
        text.append(" ".join(line))
        docs.append(f"Doc {i}: " + "\n".join(text).strip() + ("\n" if rng.random() < 0.5 else ""))
    return docs


def write_jsonl(path: Path, docs: list[str], subsets: list[str] | None = None) -> Path:
    lines = []
    for i, doc in enumerate(docs):
        meta = {"pile_set_name": subsets[i % len(subsets)]} if subsets else {}
        lines.append(json.dumps({"text": doc, "meta": meta}, ensure_ascii=False))
    raw = ("\n".join(lines) + "\n").encode()
    if path.name.endswith(".zst"):
        import zstandard

        raw = zstandard.ZstdCompressor(level=3).compress(raw)
    path.write_bytes(raw)
    return path


def data_cfg(path: Path, source: str = "default", options: dict | None = None, **kw) -> DataConfig:
    """A validated DataConfig for tiny tests reading `source` with `options` (its
    data.source_options section): small BPE, one worker, small shards."""
    base = {
        "path": str(path),
        "source": source,
        "source_options": {source: options} if options is not None else {},
        "tokenizer": "bpe",
        "vocab_size": 320,
        "num_workers": 1,
        "val_fraction": 0.1,
        "shard_mb": 0.004,
        "batch_docs": 8,
        "seq_len": 16,
    }
    base.update(kw)
    return from_dict(DataConfig, base, prefix="data.")


def shard_documents(index, split: str) -> list[np.ndarray]:
    """Every document's tokens of a split, read straight from the shard files."""
    out = []
    for info in index.shards(split):
        tokens = np.fromfile(index.path / info.bin_file, dtype=np.dtype(index.dtype).newbyteorder("<"))
        starts = np.fromfile(index.path / info.docs_file, dtype="<i8")
        ends = np.append(starts[1:], len(tokens))
        out.extend(tokens[a:b].astype(np.int64) for a, b in zip(starts, ends))
    return out
