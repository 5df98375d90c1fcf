"""The MQAR task: Zoology's multi-query associative recall (Arora et al., 2023) as tensors.

A sequence is `num_kv_pairs` key-value pairs `k1 v1 k2 v2 ...` (keys from the lower half of the
vocabulary, values from the upper half, all distinct within a sequence), then a region where every
key is asked once: the query's position is drawn by a power law (`power_a`; small gaps likelier)
and the model must predict the key's value as the next token. Loss and accuracy count only those
positions (labels are IGNORE_INDEX elsewhere); the unused positions hold random tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lmstack.errors import LMStackError
from lmstack.model.loss import IGNORE_INDEX

#: Generator seed offsets of the validation and test splits (the training split uses the seed itself):
#: three disjoint draws of the same task.
VAL_SEED_OFFSET = 500_009
TEST_SEED_OFFSET = 1_000_003


@dataclass
class MQARConfig:
    vocab_size: int = 8192
    seq_len: int = 64
    num_kv_pairs: int = 4
    power_a: float = 0.01
    train_size: int = 100_000
    val_size: int = 1_000  # early stopping and the choice of learning rate; never the test set
    test_size: int = 3_000
    random_non_queries: bool = True

    def validate(self) -> None:
        if self.seq_len % 2:
            raise LMStackError(f"mqar: seq_len must be even, got {self.seq_len}")
        if self.num_kv_pairs < 1 or 4 * self.num_kv_pairs > self.seq_len:
            raise LMStackError(
                f"mqar: need 1 <= num_kv_pairs <= seq_len / 4, got num_kv_pairs={self.num_kv_pairs} "
                f"with seq_len={self.seq_len}"
            )
        if self.vocab_size // 2 - 1 < self.num_kv_pairs:
            raise LMStackError(
                f"mqar: vocab_size={self.vocab_size} leaves fewer than num_kv_pairs={self.num_kv_pairs} "
                "distinct keys in its lower half"
            )
        if not 0 < self.power_a <= 1:
            raise LMStackError(f"mqar: power_a must be in (0, 1], got {self.power_a}")


def _distinct(n: int, k: int, low: int, high: int, gen: torch.Generator) -> torch.Tensor:
    """[n, k] tokens drawn without replacement from [low, high) in each row."""
    return torch.rand(n, high - low, generator=gen).argsort(dim=1)[:, :k] + low


def multiquery_ar(
    vocab_size: int,
    num_examples: int,
    seq_len: int,
    num_kv_pairs: int,
    power_a: float = 0.01,
    seed: int = 0,
    random_non_queries: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(inputs, labels): both [num_examples, seq_len] int64, as Zoology's `multiquery_ar`.

    Keys come from [1, V/2), values from [V/2, V). `labels[i, t]` is the value of the key at
    `inputs[i, t]` where that position is a query, else IGNORE_INDEX (everywhere in the kv region too).
    """
    MQARConfig(vocab_size, seq_len, num_kv_pairs, power_a).validate()
    gen = torch.Generator().manual_seed(seed)
    n, K = num_examples, num_kv_pairs
    context = 2 * K
    half = vocab_size // 2
    keys = _distinct(n, K, 1, half, gen)
    values = _distinct(n, K, half, vocab_size, gen)
    kvs = torch.stack([keys, values], dim=2).reshape(n, context)

    # Query slots: the query region has `space` even offsets; key i goes to offset 2 * gap_i, the
    # gaps drawn without replacement with p(g) ~ g^(power_a - 1) (g = 1..space): short gaps likelier.
    space = (seq_len - context) // 2
    p = power_a * torch.arange(1, space + 1, dtype=torch.float64) ** (power_a - 1)
    gaps = torch.multinomial((p / p.sum()).expand(n, space), K, replacement=False, generator=gen)
    queries = torch.zeros(n, seq_len - context + 1, dtype=torch.long)
    queries.scatter_(1, 2 * gaps, keys)
    examples = torch.cat([kvs, queries], dim=1)  # [n, seq_len + 1]
    labels = torch.full((n, seq_len + 1), IGNORE_INDEX, dtype=torch.long)
    labels.scatter_(1, 2 * gaps + context + 1, values)
    inputs, labels = examples[:, :-1].clone(), labels[:, 1:].clone()
    if random_non_queries:
        filler = inputs == 0
        inputs[filler] = torch.randint(vocab_size, inputs.shape, generator=gen)[filler]
    return inputs, labels


def make_splits(cfg: MQARConfig, seed: int = 0) -> tuple[tuple[torch.Tensor, torch.Tensor], ...]:
    """(train, val, test) as (inputs, labels) pairs, each from its own generator seed."""
    return tuple(
        multiquery_ar(
            cfg.vocab_size,
            size,
            cfg.seq_len,
            cfg.num_kv_pairs,
            cfg.power_a,
            seed + offset,
            cfg.random_non_queries,
        )
        for size, offset in (
            (cfg.train_size, 0),
            (cfg.val_size, VAL_SEED_OFFSET),
            (cfg.test_size, TEST_SEED_OFFSET),
        )
    )
