"""The run's layout: how many ranks, how they split into data- and sequence-parallel groups, and the
batch arithmetic, resolved once from the config and the launcher's environment, before any process
group or model exists, so that every mistake in it is reported first.

Per optimizer step: `global_batch_size` sequences = micro_batch_size x grad_accum x data-parallel
ranks, where the data-parallel ranks are world / sequence_parallel_size.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

from lmstack.config.schema import RunConfig
from lmstack.errors import LMStackError


def batch_layout(global_batch: int, micro_batch: int, grad_accum: int | None, world: int) -> int:
    """Gradient-accumulation steps so that micro_batch x accumulation x world == global batch."""
    if grad_accum is None:
        if global_batch % (micro_batch * world):
            raise LMStackError(
                f"train.global_batch_size={global_batch} is not divisible by train.micro_batch_size="
                f"{micro_batch} x {world} data-parallel ranks; change one of them (or the number of processes)"
            )
        return global_batch // (micro_batch * world)
    if micro_batch * grad_accum * world != global_batch:
        raise LMStackError(
            f"inconsistent batch: train.micro_batch_size={micro_batch} x train.grad_accum={grad_accum} x "
            f"{world} data-parallel ranks = {micro_batch * grad_accum * world}, but "
            f"train.global_batch_size={global_batch}"
        )
    return grad_accum


@dataclass(frozen=True)
class RunLayout:
    """rank/world: this process among all (`RANK`, `WORLD_SIZE` of torchrun; 0 of 1 alone);
    sp_size: ranks sharing each sequence, dp_size = world / sp_size replicas reading different rows;
    each rank runs grad_accum micro-batches of micro_batch sequences of seq_len tokens per step."""

    rank: int
    world: int
    sp_size: int
    micro_batch: int
    grad_accum: int
    seq_len: int
    tokens_per_step: int
    total_steps: int

    @property
    def dp_size(self) -> int:
        return self.world // self.sp_size

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @classmethod
    def resolve(cls, config: RunConfig, environ: dict[str, str] | None = None) -> RunLayout:
        """The layout of `config` on the ranks that the environment (`os.environ` by default) names."""
        env = os.environ if environ is None else environ
        t, world, sp_size = (
            config.train,
            int(env.get("WORLD_SIZE", "1")),
            config.parallel.sequence_parallel_size,
        )
        if world % sp_size:
            raise LMStackError(
                f"parallel.sequence_parallel_size={sp_size} does not divide the {world} ranks (WORLD_SIZE)"
            )
        grad_accum = batch_layout(t.global_batch_size, t.micro_batch_size, t.grad_accum, world // sp_size)
        seq_len = config.data.seq_len
        if seq_len > config.model.max_seq_len:
            raise LMStackError(f"data.seq_len={seq_len} exceeds model.max_seq_len={config.model.max_seq_len}")
        tokens_per_step = t.global_batch_size * seq_len
        # max_tokens, when set, wins over max_steps (rounded up to whole steps)
        total = math.ceil(t.max_tokens / tokens_per_step) if t.max_tokens is not None else t.max_steps
        return cls(
            rank=int(env.get("RANK", "0")),
            world=world,
            sp_size=sp_size,
            micro_batch=t.micro_batch_size,
            grad_accum=grad_accum,
            seq_len=seq_len,
            tokens_per_step=tokens_per_step,
            total_steps=total,
        )
