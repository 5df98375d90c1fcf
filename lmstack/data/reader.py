"""Reading prepared data: packed fixed-length samples, shuffled, sharded over data-parallel ranks,
resumable to the exact next batch.

Samples. A split's shards are read as one token stream of N tokens (documents back to back, each
ending with EOS). Sample j is the window of tokens [j*T, j*T + T + 1): inputs are its first T tokens,
labels its last T (the inputs shifted by one). There are S = (N - 1) // T samples; windows may cross
document and shard boundaries, and `doc_ids` says where documents start inside each row.

Order. The training order is a sequence of global positions p = 0, 1, 2, ... over an endless
series of epochs: position p is sample perm_e(p mod S) of epoch e = p // S, where perm_e is a
pseudo-random permutation of [0, S) fixed by (seed, e) (a Feistel network with cycle walking: O(1)
memory, so it scales to billions of samples). Every epoch visits every sample exactly once.

Ranks. One optimizer-side step of the reader consumes a global batch of `batch_size * world_size`
positions [c, c + B*W) starting at the cursor c; rank r takes the slice [c + r*B, c + (r+1)*B). So the
ranks' batches never overlap and together cover the positions without a gap.

Resume. `state_dict()` holds the cursor c (`consumed_samples`, identical on every rank) plus the seed,
seq_len and the data fingerprint. After `load_state_dict`, the next global batch starts at c whatever
the new world size or batch size is: changing the number of data-parallel ranks (or the micro-batch
size) changes only how the following positions are grouped into batches; no sample is repeated or
skipped. Seed, seq_len or data that differ from the checkpoint are refused, since the positions would
then name other samples.

Sequence parallelism. Every rank of a sequence-parallel group reads the same batch: the reader is built
with the data-parallel rank and size (not the global ones) and each row is cut with
`Batch.seq_slice(sp_rank, sp_size)`, which also records where each slice's first document began
(`doc_offsets`, for `BatchContext.from_doc_ids(..., offsets=)`).
"""

from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import dataclass, fields, replace
from pathlib import Path

import numpy as np
import torch

from lmstack.data.shards import DataIndex, check_shard, check_tokenizer, load_index
from lmstack.errors import LMStackError
from lmstack.model.loss import IGNORE_INDEX

STATE_KIND = "lmstack.data.TrainReader"
STATE_VERSION = 1


@dataclass
class Batch:
    """One batch of packed sequences (all int64 tensors).

    input_ids:  [B, T] token ids.
    labels:     [B, T] the next token of each input position; IGNORE_INDEX (-100) where there is none
                (padding of the last validation rows).
    doc_ids:    [B, T] document number inside each row, from 0 and non-decreasing; a new document
                starts wherever it changes (`Segments.from_doc_ids(doc_ids)` gives positions and
                cu_seqlens). A row always starts a document (a split one continues from the previous
                sample, but the model does not see that context).
    sample_ids: [B] global sample numbers in the split (-1: a padding row of the validation reader).
    seq_offset: where along the full row this batch's columns start (non-zero after `seq_slice`).
    doc_offsets: [B] after `seq_slice`: how many tokens of each row's first document lie before the
                slice (its position offset; > 0: the row continues a document), else None.
    """

    input_ids: torch.Tensor
    labels: torch.Tensor
    doc_ids: torch.Tensor
    sample_ids: torch.Tensor
    seq_offset: int = 0
    doc_offsets: torch.Tensor | None = None

    def _map_tensors(self, fn) -> Batch:
        tensors = (f.name for f in fields(self) if isinstance(getattr(self, f.name), torch.Tensor))
        return replace(self, **{name: fn(getattr(self, name)) for name in tensors})

    def to(self, device, non_blocking: bool = False) -> Batch:
        return self._map_tensors(lambda t: t.to(device, non_blocking=non_blocking))

    def pin_memory(self) -> Batch:
        return self._map_tensors(torch.Tensor.pin_memory)

    def seq_slice(self, rank: int, size: int) -> Batch:
        """The `rank`-th of `size` equal contiguous column slices (sequence parallelism)."""
        T = self.input_ids.shape[1]
        if T % size:
            raise ValueError(f"seq_slice: sequence length {T} is not divisible by {size} ranks")
        n = T // size
        start = rank * n
        cut = slice(start, start + n)
        # doc_ids rise along a row: the first column of the document at `start` by binary search.
        doc_start = torch.searchsorted(self.doc_ids.contiguous(), self.doc_ids[:, start : start + 1])[:, 0]
        offsets = start - doc_start
        if self.doc_offsets is not None:  # a slice of a slice: the row's first document goes further back
            offsets = offsets + self.doc_offsets * (doc_start == 0)
        return Batch(
            self.input_ids[:, cut],
            self.labels[:, cut],
            self.doc_ids[:, cut],
            self.sample_ids,
            self.seq_offset + start,
            offsets,
        )

    @property
    def num_tokens(self) -> int:
        """Number of positions that carry a label."""
        return int((self.labels != IGNORE_INDEX).sum())


# ---------------------------------------------------------------------------------------------
_U64 = np.uint64


def _mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64 finaliser on a uint64 array (wrapping arithmetic)."""
    with np.errstate(over="ignore"):
        x = x ^ (x >> _U64(30))
        x = x * _U64(0xBF58476D1CE4E5B9)
        x = x ^ (x >> _U64(27))
        x = x * _U64(0x94D049BB133111EB)
        return x ^ (x >> _U64(31))


class Permutation:
    """A seeded pseudo-random permutation of [0, n), evaluated pointwise: a 6-round balanced Feistel
    network on the smallest even number of bits covering n, with cycle walking back into [0, n)."""

    ROUNDS = 6

    def __init__(self, n: int, seed: int, epoch: int = 0) -> None:
        if n < 1:
            raise ValueError("Permutation needs n >= 1")
        self.n = n
        bits = max(2, (n - 1).bit_length())
        bits += bits & 1
        self.half = _U64(bits // 2)
        self.mask = _U64((1 << (bits // 2)) - 1)
        base = np.array([(seed & (2**64 - 1)), epoch & (2**64 - 1)], dtype=np.uint64)
        k = _mix64(_mix64(base[:1]) ^ _mix64(base[1:] + _U64(0x9E3779B97F4A7C15)))
        self.keys = [_mix64(k + _U64(r + 1))[0] for r in range(self.ROUNDS)]

    def _encrypt(self, x: np.ndarray) -> np.ndarray:
        left, right = x >> self.half, x & self.mask
        for key in self.keys:
            left, right = right, left ^ (_mix64(right ^ key) & self.mask)
        return (left << self.half) | right

    def __call__(self, idx: np.ndarray) -> np.ndarray:
        x = np.asarray(idx, dtype=np.uint64)
        y = self._encrypt(x)
        bad = y >= _U64(self.n)
        while bad.any():
            y[bad] = self._encrypt(y[bad])
            bad = y >= _U64(self.n)
        return y.astype(np.int64)


# ---------------------------------------------------------------------------------------------
class TokenStream:
    """All shards of one split read as one token sequence (memory-mapped, opened lazily)."""

    VERIFY = ("none", "size", "first-use", "full")

    def __init__(self, index: DataIndex, split: str, verify: str = "first-use") -> None:
        if verify not in self.VERIFY:
            raise ValueError(f"verify: expected one of {', '.join(self.VERIFY)}")
        self.index, self.split = index, split
        self.shards = index.shards(split)
        self.dtype = np.dtype(index.dtype).newbyteorder("<")
        if verify != "none":
            check_tokenizer(index.path, index.tokenizer)
            for info in self.shards:
                check_shard(index.path, info, self.dtype, full=verify == "full")
        # Shards whose checksum is still to be checked, before their first read.
        self._unverified = set(range(len(self.shards))) if verify == "first-use" else set()
        self.tok_starts = np.concatenate([[0], np.cumsum([s.num_tokens for s in self.shards])]).astype(
            np.int64
        )
        self.doc_bases = np.concatenate([[0], np.cumsum([s.num_documents for s in self.shards])]).astype(
            np.int64
        )
        self.num_tokens = int(self.tok_starts[-1])
        self.num_documents = int(self.doc_bases[-1])
        self._open: OrderedDict[int, tuple[np.ndarray, np.ndarray]] = OrderedDict()

    MAX_OPEN = 256  # shards kept mapped (least recently used ones are unmapped beyond that)

    def _shard(self, k: int) -> tuple[np.ndarray, np.ndarray]:
        if k in self._open:
            self._open.move_to_end(k)
        else:
            if len(self._open) >= self.MAX_OPEN:
                self._open.popitem(last=False)
            info = self.shards[k]
            if k in self._unverified:
                check_shard(self.index.path, info, self.dtype, full=True)
                self._unverified.discard(k)
            path, docs_path = self.index.path / info.bin_file, self.index.path / info.docs_file
            try:
                tokens = np.memmap(path, dtype=self.dtype, mode="r", shape=(info.num_tokens,))
                docs = np.memmap(docs_path, dtype="<i8", mode="r", shape=(info.num_documents,))
            except (OSError, ValueError) as err:
                raise LMStackError(f"{path}: cannot map the shard: {err}") from None
            if info.num_documents and (docs[0] != 0 or docs[-1] >= info.num_tokens):
                raise LMStackError(
                    f"{docs_path}: corrupted document offsets; delete the shard and re-run prepare-data"
                )
            self._open[k] = (tokens, docs)
        return self._open[k]

    def read(self, start: int, length: int) -> tuple[np.ndarray, np.ndarray]:
        """Tokens [start, start + length) and each one's global document number (both int64)."""
        if start < 0 or start + length > self.num_tokens:
            raise IndexError(f"tokens [{start}, {start + length}) outside [0, {self.num_tokens})")
        tokens = np.empty(length, dtype=np.int64)
        doc = np.empty(length, dtype=np.int64)
        k = int(np.searchsorted(self.tok_starts, start, side="right")) - 1
        pos, filled = start, 0
        while filled < length:
            toks, docs = self._shard(k)
            local = pos - int(self.tok_starts[k])
            n = min(length - filled, len(toks) - local)
            tokens[filled : filled + n] = toks[local : local + n]
            # the document holding the first token, then +1 at every document start inside the piece
            first = int(np.searchsorted(docs, local, side="right")) - 1
            end = int(np.searchsorted(docs, local + n, side="left"))
            steps = np.zeros(n, dtype=np.int64)
            steps[np.asarray(docs[first + 1 : end]) - local] = 1
            doc[filled : filled + n] = np.cumsum(steps) + (int(self.doc_bases[k]) + first)
            filled += n
            pos += n
            k += 1
        return tokens, doc


def _check_rank(rank: int, world_size: int, batch_size: int, seq_len: int) -> None:
    if world_size < 1 or not 0 <= rank < world_size:
        raise LMStackError(f"rank {rank} / world_size {world_size}: expected 0 <= rank < world_size")
    if batch_size < 1:
        raise LMStackError(f"batch_size: expected a positive integer, got {batch_size}")
    if seq_len < 1:
        raise LMStackError(f"seq_len: expected a positive integer, got {seq_len}")


def _doc_ids(doc: np.ndarray) -> np.ndarray:
    return doc - doc[..., :1]


class TrainingOrder:
    """The cursor of an endless training order shared by all ranks (the module docstring's Ranks and
    Resume): `next()` gives this rank's slice of the global batch at `consumed_samples` (the
    subclass's `next_batch`) and moves it on by `samples_per_step`."""

    def __init__(self, seq_len: int, batch_size: int, rank: int, world_size: int, seed: int) -> None:
        _check_rank(rank, world_size, batch_size, seq_len)
        self.seq_len, self.batch_size, self.rank, self.world_size, self.seed = (
            seq_len,
            batch_size,
            rank,
            world_size,
            seed,
        )
        self.consumed_samples = 0

    @property
    def samples_per_step(self) -> int:
        """Global samples consumed by one call of `next()` (on every rank together)."""
        return self.batch_size * self.world_size

    def next_batch(self) -> Batch:
        raise NotImplementedError

    def __iter__(self) -> TrainingOrder:
        return self

    def __next__(self) -> Batch:
        return self.next_batch()


class TrainReader(TrainingOrder):
    """Endless shuffled packed batches of one data-parallel rank; see the module docstring.

    data_dir: a prepared folder; seq_len: T; batch_size: rows per batch on this rank (B);
    rank, world_size: data-parallel rank and size; seed: the shuffle seed (DataConfig.seed);
    verify: "first-use" (default: file sizes against the index now, each shard's sha256 before its
    first read), "full" (every checksum now), "size" (sizes only), "none".
    """

    def __init__(
        self,
        data_dir: str | Path,
        seq_len: int,
        batch_size: int,
        *,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        verify: str = "first-use",
        split: str = "train",
    ) -> None:
        super().__init__(seq_len, batch_size, rank, world_size, seed)
        self.index = load_index(data_dir)
        self.stream = TokenStream(self.index, split, verify)
        self.split = split
        self.num_samples = (self.stream.num_tokens - 1) // seq_len if self.stream.num_tokens else 0
        if self.num_samples < 1:
            raise LMStackError(
                f"{self.index.path}: the {split} split has {self.stream.num_tokens} tokens, fewer than seq_len + 1 = "
                f"{seq_len + 1}; lower data.seq_len or prepare more text"
            )
        self.fingerprint = self.index.fingerprint(split)
        self._perms: dict[int, Permutation] = {}

    @property
    def epoch(self) -> int:
        return self.consumed_samples // self.num_samples

    def _perm(self, epoch: int) -> Permutation:
        if epoch not in self._perms:
            if len(self._perms) > 4:
                self._perms.clear()
            self._perms[epoch] = Permutation(self.num_samples, self.seed, epoch)
        return self._perms[epoch]

    def sample_ids_at(self, positions: np.ndarray) -> np.ndarray:
        """Sample numbers at global positions of the training order."""
        positions = np.asarray(positions, dtype=np.int64)
        epochs, within = np.divmod(positions, self.num_samples)
        out = np.empty_like(positions)
        for e in np.unique(epochs):
            sel = epochs == e
            out[sel] = self._perm(int(e))(within[sel])
        return out

    def samples(self, sample_ids: np.ndarray) -> Batch:
        """The batch made of the given samples, in that order."""
        T = self.seq_len
        rows = np.empty((len(sample_ids), T + 1), dtype=np.int64)
        docs = np.empty((len(sample_ids), T), dtype=np.int64)
        for i, j in enumerate(sample_ids):
            tokens, doc = self.stream.read(int(j) * T, T + 1)
            rows[i] = tokens
            docs[i] = doc[:T]
        rows_t = torch.from_numpy(rows)
        return Batch(
            input_ids=rows_t[:, :-1].contiguous(),
            labels=rows_t[:, 1:].contiguous(),
            doc_ids=torch.from_numpy(_doc_ids(docs)),
            sample_ids=torch.as_tensor(np.asarray(sample_ids, dtype=np.int64)),
        )

    def next_batch(self) -> Batch:
        """This rank's slice of the next global batch; advances the cursor by batch_size * world_size."""
        start = self.consumed_samples + self.rank * self.batch_size
        batch = self.samples(self.sample_ids_at(np.arange(start, start + self.batch_size)))
        self.consumed_samples += self.samples_per_step
        return batch

    def state_dict(self) -> dict:
        """The exact position (the same on every rank); JSON- and torch.save-friendly."""
        return {
            "kind": STATE_KIND,
            "version": STATE_VERSION,
            "consumed_samples": self.consumed_samples,
            "seed": self.seed,
            "seq_len": self.seq_len,
            "split": self.split,
            "num_samples": self.num_samples,
            "fingerprint": self.fingerprint,
            # informative: how the positions were grouped when saved
            "batch_size": self.batch_size,
            "world_size": self.world_size,
        }

    def load_state_dict(self, state: dict) -> None:
        """Continue from `state` (of any world size / batch size); refuses other data, seed or seq_len."""
        if not isinstance(state, dict) or state.get("kind") != STATE_KIND:
            raise LMStackError("reader state: not a TrainReader state_dict")
        for key, now in (
            ("version", STATE_VERSION),
            ("seed", self.seed),
            ("seq_len", self.seq_len),
            ("split", self.split),
            ("fingerprint", self.fingerprint),
        ):
            if state.get(key) != now:
                what = (
                    "the prepared data differ"
                    if key == "fingerprint"
                    else f"{key} {state.get(key)!r} then, {now!r} now"
                )
                raise LMStackError(
                    f"reader state: cannot resume: {what}; the saved position would name other samples"
                )
        consumed = state.get("consumed_samples")
        if not isinstance(consumed, int) or consumed < 0:
            raise LMStackError(
                f"reader state: consumed_samples {consumed!r}: expected a non-negative integer"
            )
        self.consumed_samples = consumed


class ValReader:
    """Every token of the validation split exactly once, in order, deterministic.

    Sample i holds inputs [i*T, i*T + T) of the split's stream (cut at N - 1; the last row is padded
    with labels IGNORE_INDEX), so that each of the N - 1 next-token predictions appears once. Rank r
    takes samples r, r + W, r + 2W, ...; every rank yields the same number of batches (`len(reader)`),
    filled up with padding rows (sample_ids -1, no labels), so collective ops stay in step. The last
    batch may have fewer than batch_size rows only when all ranks' would.
    """

    def __init__(
        self,
        data_dir: str | Path,
        seq_len: int,
        batch_size: int,
        *,
        rank: int = 0,
        world_size: int = 1,
        split: str = "val",
        verify: str = "first-use",
    ) -> None:
        _check_rank(rank, world_size, batch_size, seq_len)
        self.index = load_index(data_dir)
        if split not in self.index.splits or not self.index.shards(split):
            raise LMStackError(f"{self.index.path}: no '{split}' split (prepared with data.val_fraction 0?)")
        self.stream = TokenStream(self.index, split, verify)
        self.seq_len, self.batch_size, self.rank, self.world_size = seq_len, batch_size, rank, world_size
        n_pred = max(self.stream.num_tokens - 1, 0)
        self.num_samples = math.ceil(n_pred / seq_len)
        per_rank = math.ceil(self.num_samples / world_size)
        self.num_batches = math.ceil(per_rank / batch_size)
        self._per_rank = per_rank
        tok = self.index.tokenizer
        self.pad_id = tok.get("pad_token_id") if tok.get("pad_token_id") is not None else tok["eos_token_id"]

    def __len__(self) -> int:
        return self.num_batches

    def _row(self, i: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        T, N = self.seq_len, self.stream.num_tokens
        inputs = np.full(T, self.pad_id, dtype=np.int64)
        labels = np.full(T, IGNORE_INDEX, dtype=np.int64)
        docs = np.zeros(T, dtype=np.int64)
        if i < 0:
            return inputs, labels, docs
        start = i * T
        n = min(T, N - 1 - start)
        tokens, doc = self.stream.read(start, n + 1)
        inputs[:n], labels[:n] = tokens[:n], tokens[1:]
        docs[:n] = doc[:n] - doc[0]
        docs[n:] = docs[n - 1] + 1  # padding: a document of its own
        return inputs, labels, docs

    def __iter__(self):
        for b in range(self.num_batches):
            local = range(b * self.batch_size, min((b + 1) * self.batch_size, self._per_rank))
            ids = [self.rank + j * self.world_size for j in local]
            ids = [i if i < self.num_samples else -1 for i in ids]
            rows = [self._row(i) for i in ids]
            yield Batch(
                input_ids=torch.from_numpy(np.stack([r[0] for r in rows])),
                labels=torch.from_numpy(np.stack([r[1] for r in rows])),
                doc_ids=torch.from_numpy(np.stack([r[2] for r in rows])),
                sample_ids=torch.tensor(ids, dtype=torch.int64),
            )


def model_token_ids(data_dir: str | Path) -> dict:
    """What the model config must agree with: {vocab_size, bos_token_id, eos_token_id, pad_token_id}
    (bos_token_id is None unless documents start with BOS)."""
    index = load_index(data_dir)
    tok = index.tokenizer
    return {
        "vocab_size": index.vocab_size,
        "bos_token_id": tok["bos_token_id"] if tok.get("add_bos") else None,
        "eos_token_id": tok["eos_token_id"],
        "pad_token_id": tok.get("pad_token_id"),
    }
