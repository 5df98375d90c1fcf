"""Weighted mixtures of prepared folders (`data.mixture`): one endless training order over several
sources, drawn by weight, sharded over ranks and resumed like one folder's (lmstack.data.reader).

Order. Global position p goes to source s(p): u(p), the p-th output of a splitmix64 generator seeded
from the seed, read as a number in [0, 1), falls into source s's interval of the cumulative normalised
weights. The draws are independent, so the count of source s among N positions is binomial(N, w_s).
Within its source, p is the q-th position drawn for s (q: how many earlier positions went to s), and
reads the sample at position q of that source's own shuffled order (`TrainReader.sample_ids_at`,
epochs included): each source runs through its epochs at its own pace, exactly as if read alone.

Ranks. As for one folder: a call of `next()` consumes the global batch [c, c + B*W) and rank r takes
[c + rB, c + (r+1)B). Every rank draws the sources of the whole global batch (cheap: B*W hashes), so
all ranks advance the same per-source counts.

Resume. `state_dict()` holds c and each source's count of positions before c (the same on every
rank), so the next batch after `load_state_dict` is exact whatever the new number of ranks or batch
size, and nothing is counted from position 0. Sources (names, data fingerprints), weights, seed and
seq_len that differ from the checkpoint are refused: the saved position would name other samples.

Sources must agree on the tokenizer (sha256) and its special tokens; they share one seq_len (the
reader's), so a sample is T + 1 tokens of one source whatever the mix. `Batch.sample_ids` are sample
numbers inside each row's own source.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from lmstack.data.reader import _U64, Batch, TrainingOrder, TrainReader, _mix64
from lmstack.errors import LMStackError

STATE_KIND = "lmstack.data.MixtureReader"
STATE_VERSION = 1
_GOLDEN = _U64(0x9E3779B97F4A7C15)  # splitmix64's increment
# Tokenizer record fields that decide the token ids a model is built for (lmstack.data.model_token_ids).
_TOKEN_FIELDS = ("sha256", "eos_token_id", "bos_token_id", "pad_token_id", "add_bos")


class MixtureReader(TrainingOrder):
    """Endless batches of one data-parallel rank drawn from weighted prepared folders; see the module
    docstring. sources: (name, folder, weight) each, weights > 0 (normalised here); the other
    arguments as for `TrainReader`."""

    def __init__(
        self,
        sources: list[tuple[str, str | Path, float]],
        seq_len: int,
        batch_size: int,
        *,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        verify: str = "first-use",
    ) -> None:
        super().__init__(seq_len, batch_size, rank, world_size, seed)
        if not sources:
            raise LMStackError("mixture: expected at least one source")
        weights = np.array([w for _, _, w in sources], dtype=np.float64)
        if not (weights > 0).all():
            raise LMStackError(f"mixture: expected positive weights, got {weights.tolist()}")
        self.names = [name for name, _, _ in sources]
        self.readers = [TrainReader(path, seq_len, 1, seed=seed, verify=verify) for _, path, _ in sources]
        _check_same_tokens(self.names, self.readers)
        self.weights = (weights / weights.sum()).tolist()
        self._bounds = np.cumsum(self.weights)
        self._bounds[-1] = 1.0  # every u < 1 falls into a source despite rounding
        self._key = _mix64(np.array([seed & (2**64 - 1)], dtype=np.uint64) ^ _U64(0x6D697874757265))[0]
        self.consumed_per_source = [0] * len(sources)

    def sources_at(self, positions: np.ndarray) -> np.ndarray:
        """The source number of each global position of the training order."""
        p = np.asarray(positions, dtype=np.uint64)
        with np.errstate(over="ignore"):
            bits = _mix64(self._key + (p + _U64(1)) * _GOLDEN)
        u = (bits >> _U64(11)).astype(np.float64) * 2.0**-53
        return np.searchsorted(self._bounds, u, side="right")

    def tokens_per_source(self) -> dict[str, int]:
        """Input tokens each source has given all ranks so far (its samples x seq_len)."""
        return {name: n * self.seq_len for name, n in zip(self.names, self.consumed_per_source)}

    def next_batch(self) -> Batch:
        """This rank's slice of the next global batch; advances the cursor and the per-source counts."""
        B = self.batch_size
        sources = self.sources_at(
            np.arange(self.consumed_samples, self.consumed_samples + self.samples_per_step)
        )
        within = np.empty(len(sources), dtype=np.int64)
        for s in range(len(self.readers)):
            drawn = sources == s
            within[drawn] = self.consumed_per_source[s] + np.arange(int(drawn.sum()))
            self.consumed_per_source[s] += int(drawn.sum())
        mine = slice(self.rank * B, (self.rank + 1) * B)
        sources, within = sources[mine], within[mine]
        T = self.seq_len
        batch = Batch(
            input_ids=torch.empty(B, T, dtype=torch.int64),
            labels=torch.empty(B, T, dtype=torch.int64),
            doc_ids=torch.empty(B, T, dtype=torch.int64),
            sample_ids=torch.empty(B, dtype=torch.int64),
        )
        for s in np.unique(sources):
            rows = torch.from_numpy(np.flatnonzero(sources == s))
            reader = self.readers[s]
            part = reader.samples(reader.sample_ids_at(within[sources == s]))
            for name in ("input_ids", "labels", "doc_ids", "sample_ids"):
                getattr(batch, name)[rows] = getattr(part, name)
        self.consumed_samples += self.samples_per_step
        return batch

    def _sources_record(self) -> list[dict]:
        return [
            {"name": name, "fingerprint": reader.fingerprint, "weight": weight}
            for name, reader, weight in zip(self.names, self.readers, self.weights)
        ]

    def state_dict(self) -> dict:
        """The exact position (the same on every rank); JSON- and torch.save-friendly."""
        return {
            "kind": STATE_KIND,
            "version": STATE_VERSION,
            "consumed_samples": self.consumed_samples,
            "consumed_per_source": list(self.consumed_per_source),
            "seed": self.seed,
            "seq_len": self.seq_len,
            "sources": self._sources_record(),
            # informative: how the positions were grouped when saved
            "batch_size": self.batch_size,
            "world_size": self.world_size,
        }

    def load_state_dict(self, state: dict) -> None:
        """Continue from `state` (of any world size / batch size); refuses other sources, weights,
        data, seed or seq_len."""
        if not isinstance(state, dict) or state.get("kind") != STATE_KIND:
            raise LMStackError(
                "reader state: cannot resume: the checkpoint was not trained on a data.mixture"
            )
        for key, now in (("version", STATE_VERSION), ("seed", self.seed), ("seq_len", self.seq_len)):
            if state.get(key) != now:
                raise LMStackError(
                    f"reader state: cannot resume: {key} {state.get(key)!r} then, {now!r} now; the saved "
                    "position would name other samples"
                )
        then, now = state.get("sources"), self._sources_record()
        if then != now:
            raise LMStackError(f"reader state: cannot resume: {_sources_diff(then, now)}")
        consumed, per_source = state.get("consumed_samples"), state.get("consumed_per_source")
        if (
            not isinstance(consumed, int)
            or not isinstance(per_source, list)
            or len(per_source) != len(now)
            or not all(isinstance(n, int) and n >= 0 for n in per_source)
            or sum(per_source) != consumed
        ):
            raise LMStackError(
                f"reader state: consumed_samples {consumed!r} / consumed_per_source {per_source!r}: "
                f"expected {len(now)} non-negative integers adding up to consumed_samples"
            )
        self.consumed_samples, self.consumed_per_source = consumed, list(per_source)


def _check_same_tokens(names: list[str], readers: list[TrainReader]) -> None:
    """Every source's tokenizer and special tokens are those of the first (one model reads them all)."""
    first = readers[0].index
    for name, reader in zip(names[1:], readers[1:]):
        tok = reader.index.tokenizer
        for key in _TOKEN_FIELDS:
            if tok.get(key) != first.tokenizer.get(key):
                raise LMStackError(
                    f"data.mixture source '{name}' ({reader.index.path}): prepared with another tokenizer "
                    f"than source '{names[0]}' ({first.path}): {key} {tok.get(key)!r} vs "
                    f"{first.tokenizer.get(key)!r}; prepare every source with the same data.tokenizer"
                )


def _sources_diff(then: object, now: list[dict]) -> str:
    """What differs between the checkpoint's sources and the configured ones, in one line."""
    if not isinstance(then, list) or [s.get("name") for s in then if isinstance(s, dict)] != [
        s["name"] for s in now
    ]:
        names = [s.get("name") for s in then] if isinstance(then, list) else then
        return f"the mixture's sources were {names}, now {[s['name'] for s in now]}"
    for old, new in zip(then, now):
        if old.get("fingerprint") != new["fingerprint"]:
            return f"the prepared data of source '{new['name']}' differ; the saved position would name other samples"
        if old.get("weight") != new["weight"]:
            return (
                f"source '{new['name']}' had the normalised weight {old.get('weight')}, now {new['weight']}; "
                "resume with the checkpoint's weights"
            )
    return "the mixture's sources differ"
