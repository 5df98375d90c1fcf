"""Data: text sources -> tokenizer -> memory-mapped token shards -> packed, sharded, resumable batches.

Public API (imported lazily, so that tokenizer worker processes stay light):

- `prepare_data(cfg: DataConfig, *, part=None, progress=True, log=None) -> DataIndex | None` —
  `lmstack prepare-data` (`part=(I, N)`: part I of N, None unless it merged); `prepare_tokenizer(cfg)`
  (`--tokenizer-only`, the first step before parts), `merge_parts(cfg, N)` (`--merge N`).
- `TrainReader(data_dir, seq_len, batch_size, *, rank=0, world_size=1, seed=0, verify="first-use")` —
  infinite, shuffled, rank-sharded `Batch`es with `state_dict()` / `load_state_dict()`.
- `MixtureReader(sources, seq_len, batch_size, *, rank=0, world_size=1, seed=0)` — the same over
  weighted prepared folders (`data.mixture`; lmstack.data.mixture).
- `ValReader(data_dir, seq_len, batch_size, *, rank=0, world_size=1)` — every validation token once.
- `Batch(input_ids, labels, doc_ids, sample_ids)` — `[B, T]` int64 tensors (labels -100 = ignore).
- `load_index(data_dir) -> DataIndex`, `load_data_tokenizer(data_dir) -> DataTokenizer`,
  `load_hf_tokenizer(data_dir)` (transformers tokenizer for export / evaluation),
  `model_token_ids(data_dir) -> dict` (vocab_size, bos/eos/pad ids for the model config).

Folder layout: see lmstack.data.shards (shards + index.json) and lmstack.data.tokenizer.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "prepare_data": "lmstack.data.prepare",
    "prepare_settings": "lmstack.data.prepare",
    "prepare_tokenizer": "lmstack.data.prepare",
    "merge_parts": "lmstack.data.prepare",
    "TrainReader": "lmstack.data.reader",
    "ValReader": "lmstack.data.reader",
    "MixtureReader": "lmstack.data.mixture",
    "Batch": "lmstack.data.reader",
    "TokenStream": "lmstack.data.reader",
    "model_token_ids": "lmstack.data.reader",
    "DataIndex": "lmstack.data.shards",
    "ShardInfo": "lmstack.data.shards",
    "load_index": "lmstack.data.shards",
    "DataTokenizer": "lmstack.data.tokenizer",
    "build_tokenizer": "lmstack.data.tokenizer",
    "load_data_tokenizer": "lmstack.data.tokenizer",
    "load_hf_tokenizer": "lmstack.data.tokenizer",
    "iter_documents": "lmstack.data.sources",
    "DEFAULT_CORPUS": "lmstack.data.sources.default",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'lmstack.data' has no attribute {name!r}")
