"""The trainer's view of the data: a stateful training reader and validation batches.

The real readers live in `lmstack.data` (prepared shards in `data.path` or the folders of
`data.mixture`); this module adapts them to
what the loop needs and adds `SyntheticReader` (random tokens, no files) for benchmarks and tests.

A reader yields `lmstack.data.Batch`es (`input_ids`, `labels` (IGNORE_INDEX: ignore), `doc_ids`, each
`[micro_batch, seq_len]` int64) from this rank's share of the data, and has `state_dict()` /
`load_state_dict()`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Protocol

import torch

from lmstack.config.schema import RunConfig
from lmstack.data.reader import Batch
from lmstack.errors import LMStackError
from lmstack.parallel import ParallelLayout


class Reader(Protocol):
    def __next__(self) -> Batch: ...
    def state_dict(self) -> dict[str, Any]: ...
    def load_state_dict(self, state: dict[str, Any]) -> None: ...


@dataclass
class DataSource:
    """What the trainer gets from the data side."""

    train: Reader
    # This rank's validation micro-batches, from the start (None: no validation split).
    val: Callable[[], Iterable[Batch]] | None
    tokenizer_dir: Path | None
    vocab_size: int | None
    # bos/eos/pad token ids of the data's tokenizer (recorded in the run's resolved model config).
    token_ids: dict[str, int | None] | None = None
    # This rank's batches of each named validation folder (data.val_path), from the start.
    named_val: dict[str, Callable[[], Iterable[Batch]]] = field(default_factory=dict)
    # The input tokens of each named source so far, all ranks together (a data.mixture; None: one folder).
    tokens_per_source: Callable[[], dict[str, int]] | None = None


class SyntheticReader:
    """Uniform random tokens, seeded per global sample: rank r's k-th micro-batch holds samples
    `(k * world + r) * micro_batch + [0, micro_batch)`, so every global step covers the same samples
    whatever the split between ranks and accumulation. Documents of random lengths mark doc_ids."""

    def __init__(
        self,
        vocab_size: int,
        seq_len: int,
        micro_batch: int,
        rank: int,
        world: int,
        seed: int,
        offset: int = 0,
    ) -> None:
        self.vocab_size, self.seq_len, self.micro_batch = vocab_size, seq_len, micro_batch
        self.rank, self.world, self.seed, self.offset = rank, world, seed, offset
        self.pos = 0

    def _sample(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.offset + index)
        tokens = torch.randint(0, self.vocab_size, (self.seq_len + 1,), generator=g)
        starts = torch.rand(self.seq_len, generator=g) < 4 / self.seq_len
        starts[0] = False
        return tokens, starts.long().cumsum(0)

    def __iter__(self) -> SyntheticReader:
        return self

    def __next__(self) -> Batch:
        first = (self.pos * self.world + self.rank) * self.micro_batch
        samples = [self._sample(first + i) for i in range(self.micro_batch)]
        self.pos += 1
        tokens = torch.stack([s[0] for s in samples])
        return Batch(
            input_ids=tokens[:, :-1].contiguous(),
            labels=tokens[:, 1:].contiguous(),
            doc_ids=torch.stack([s[1] for s in samples]),
            sample_ids=torch.arange(first, first + self.micro_batch),
        )

    def state_dict(self) -> dict[str, Any]:
        return {"pos": self.pos, "world": self.world}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        # Samples consumed so far by all ranks, re-split over the current world.
        consumed = state["pos"] * state["world"]
        if consumed % self.world:
            raise LMStackError(
                f"synthetic reader: cannot re-split {consumed} micro-batches over {self.world} ranks"
            )
        self.pos = consumed // self.world


class SequenceSlices:
    """Batches cut to one rank's slice of every row (sequence parallelism): the ranks of a sequence
    group read the same rows (their reader is built for the data-parallel rank) and rank r of S keeps
    columns [r·T/S, (r+1)·T/S) (`Batch.seq_slice`). Length and position (`state_dict`) are those of
    the wrapped batches, so checkpoints are the same as without slicing."""

    def __init__(self, batches: Any, rank: int, size: int) -> None:
        self.batches, self.rank, self.size = batches, rank, size
        self._it: Any = None

    @classmethod
    def of_source(cls, source: DataSource, rank: int, size: int) -> DataSource:
        """The same source with its training reader and validation batches sliced."""

        def sliced(batches: Callable[[], Iterable[Batch]]) -> Callable[[], Iterable[Batch]]:
            return lambda: cls(batches(), rank, size)

        val = None if source.val is None else sliced(source.val)
        named = {name: sliced(batches) for name, batches in source.named_val.items()}
        return replace(source, train=cls(source.train, rank, size), val=val, named_val=named)

    def __iter__(self) -> SequenceSlices:
        self._it = iter(self.batches)
        return self

    def __next__(self) -> Batch:
        if self._it is None:
            self._it = iter(self.batches)
        return next(self._it).seq_slice(self.rank, self.size)

    def __len__(self) -> int:
        return len(self.batches)

    def state_dict(self) -> dict[str, Any]:
        return self.batches.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.batches.load_state_dict(state)


def synthetic_source(config: RunConfig, rank: int, world: int, micro_batch: int) -> DataSource:
    T, V, seed = config.data.seq_len, config.model.vocab_size, config.train.seed

    def val() -> Iterable[Batch]:
        return SyntheticReader(V, T, micro_batch, rank, world, seed, offset=10**9)

    return DataSource(SyntheticReader(V, T, micro_batch, rank, world, seed), val, None, V)


def build_data(config: RunConfig, groups: ParallelLayout, micro_batch: int, source_factory) -> DataSource:
    """This rank's data: `source_factory(config, dp_rank, dp_size, micro_batch)` (e.g.
    `prepared_source`), cut to the rank's slice of every row under sequence parallelism."""
    data = source_factory(config, groups.dp_rank, groups.dp_size, micro_batch)
    if groups.sequence is not None:
        data = SequenceSlices.of_source(data, groups.sp_rank, groups.sp_size)
    if data.vocab_size is not None and data.vocab_size > config.model.vocab_size:
        raise LMStackError(
            f"model.vocab_size={config.model.vocab_size} is smaller than the tokenizer's vocabulary "
            f"({data.vocab_size}) in {next(iter(train_folders(config).values()))}"
        )
    return data


def with_data_token_ids(config: RunConfig, data: DataSource) -> RunConfig:
    """`config` with the data's bos/eos/pad token ids where `model` leaves them unset: the resolved
    config that the run saves (and exports carry). `config` itself is left as it is."""
    ids = {k: v for k, v in (data.token_ids or {}).items() if getattr(config.model, k) is None}
    return replace(config, model=replace(config.model, **ids)) if ids else config


def check_prepared(path: Path, field_name: str = "data.path") -> None:
    if not (path / "index.json").is_file():
        raise LMStackError(
            f"{field_name}: no prepared data in '{path}' (no index.json); run `lmstack prepare-data` with "
            "the same config first"
        )


def train_folders(config: RunConfig) -> dict[str, Path]:
    """The prepared folders training reads, by config field: data.path, or each data.mixture source."""
    data = config.data
    if not data.mixture:
        return {"data.path": Path(data.path)}
    return {f"data.mixture[{i}].path": Path(s.path) for i, s in enumerate(data.mixture)}


def check_train_folders(config: RunConfig) -> None:
    for field_name, path in train_folders(config).items():
        check_prepared(path, field_name)


def prepared_source(config: RunConfig, rank: int, world: int, micro_batch: int) -> DataSource:
    """Readers over the prepared shards in `data.path` (lmstack.data.TrainReader / ValReader), or over
    the folders of `data.mixture` (lmstack.data.MixtureReader; each source's val split is a named
    validation set of its own)."""
    check_train_folders(config)
    from lmstack.data import MixtureReader, TrainReader, model_token_ids

    data, T = config.data, config.data.seq_len
    # The readers' own indexes serve everything below: each index.json is read (and checksummed) once.
    if data.mixture:
        sources = [(s.name, s.path, s.weight) for s in data.mixture]
        train = MixtureReader(sources, T, micro_batch, rank=rank, world_size=world, seed=data.seed)
        index, val, tokens_per_source = train.readers[0].index, None, train.tokens_per_source
        own_val = {
            s.name: own_val_batches(reader.index, T, micro_batch, rank, world)
            for s, reader in zip(data.mixture, train.readers)
        }
    else:
        train = TrainReader(data.path, T, micro_batch, rank=rank, world_size=world, seed=data.seed)
        index, tokens_per_source = train.index, None
        val, own_val = own_val_batches(index, T, micro_batch, rank, world), {}
    path = index.path
    named_val = {name: batches for name, batches in own_val.items() if batches is not None}
    named_val.update(
        (name, named_val_batches(Path(folder), index, name, T, micro_batch, rank, world))
        for name, folder in data.val_path.items()
    )
    tok_dir = path / "tokenizer"
    ids = {k: v for k, v in model_token_ids(path).items() if k != "vocab_size"}
    return DataSource(
        train, val, tok_dir if tok_dir.is_dir() else None, index.vocab_size, ids, named_val, tokens_per_source
    )


def own_val_batches(index, seq_len: int, micro_batch: int, rank: int, world: int):
    """This rank's batches of a training folder's own val split (`index`: its DataIndex), from the
    start (None: no such split)."""
    from lmstack.data import ValReader

    if not index.splits.get("val"):
        return None
    return lambda: ValReader(index.path, seq_len, micro_batch, rank=rank, world_size=world)


def named_val_batches(
    folder: Path, train_index, name: str, seq_len: int, micro_batch: int, rank: int, world: int
):
    """Every token of a validation folder (`data.val_path.<name>`: its `train` split, the whole stream of
    a folder prepared with data.val_fraction=0; `lmstack eval ppl` reads the same), once, checked to
    use the training data's tokenizer."""
    from lmstack.data import ValReader, load_index

    check_prepared(folder, f"data.val_path.{name}")
    index = load_index(folder)
    if index.tokenizer["sha256"] != train_index.tokenizer["sha256"]:
        raise LMStackError(
            f"data.val_path.{name}: {folder} was prepared with another tokenizer (sha256 "
            f"{index.tokenizer['sha256'][:12]}) than data.path ({train_index.tokenizer['sha256'][:12]})"
        )
    split = "train" if index.splits.get("train") else "val"
    return lambda: ValReader(folder, seq_len, micro_batch, rank=rank, world_size=world, split=split)
