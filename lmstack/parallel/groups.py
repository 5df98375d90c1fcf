"""Data-parallel × sequence-parallel process groups.

The world of W = D × S ranks splits into D sequence-parallel groups of S consecutive ranks (on GPUs:
within a node, where the per-layer gathers are cheapest): rank g = d · S + s is slice s of
data-parallel replica d. The ranks of one sequence group read the same rows and each holds one
contiguous slice of them; data-parallel replicas read different rows.

Gradients: the ranks of a sequence group hold gradients of slices of one loss, to be summed; the
replicas' gradients are to be averaged. The trainer's loss is the mean over the labelled tokens of
the whole step on all W ranks (each rank's token sum scaled by grad_accum x W / global count), so
DeepSpeed's mean over all W ranks already gives exactly that sum and average: one all-reduce, with
DeepSpeed running over the whole world as its data-parallel group (ZeRO shards over all W ranks, as
DeepSpeed-Ulysses does with its sequence-data-parallel group).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta

from lmstack.parallel.sequence import SequenceParallel


@dataclass
class ParallelLayout:
    """This rank's place: data-parallel replica `dp_rank` of `dp_size`, and its sequence group
    (None without sequence parallelism)."""

    dp_rank: int
    dp_size: int
    sequence: SequenceParallel | None

    @property
    def sp_size(self) -> int:
        return self.sequence.size if self.sequence is not None else 1

    @property
    def sp_rank(self) -> int:
        return self.sequence.rank if self.sequence is not None else 0


def build_layout(rank: int, world: int, sp_size: int, timeout: timedelta | None = None) -> ParallelLayout:
    """Create the sequence-parallel groups (a collective: every rank calls it with the same sizes).
    `timeout` bounds their collectives like the world's (a dead rank fails the others)."""
    if world % sp_size:
        raise ValueError(f"sp_size: {sp_size} does not divide the world size {world}")
    if sp_size == 1:
        return ParallelLayout(rank, world, None)
    import torch.distributed as dist

    own = None
    for d in range(world // sp_size):
        ranks = list(range(d * sp_size, (d + 1) * sp_size))
        group = dist.new_group(ranks, timeout=timeout)  # every rank creates every group, in order
        if rank in ranks:
            own = group
    return ParallelLayout(rank // sp_size, world // sp_size, SequenceParallel(own, rank % sp_size, sp_size))
