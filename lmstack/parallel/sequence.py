"""LASP-2 and LASP-2H: the communication of sequence parallelism, one AllGather per layer.

Each rank of a sequence-parallel group of W ranks holds one contiguous slice of T tokens of every
row (rank r: global columns [rT, rT + T)). A mixer's slice needs only what its (initial state →
final state) contract says it needs from the tokens before it; this module delivers that, and
never computes a mixer's math.

- Linear state (LASP-2: lightning, GLA, DeltaNet). A slice maps the state entering it affinely:
  S_out = A S_in + E, where E is the slice's final state from a zero start and A its transition
  (lightning: λ^T per head; GLA: the product of its gates per key dimension; DeltaNet: a K×K
  matrix). The mixer computes (A, E) of its own slice; one AllGather collects every rank's pair;
  rank r folds S_in(r) = Σ_{j<r} (A_{r-1} ⋯ A_{j+1}) E_j and runs its slice once with that initial
  state. A document starting inside slice j cuts the chain: A_j = 0 for that row, and E_j is the
  state of the row's last document only. The backward mirrors the gather with one reduce-scatter
  of the gathered pairs' gradients (each rank receives the sum over ranks of d(A_j, E_j)).
  Bytes per layer: W − 1 times (|A| + |E|) per rank, independent of T.
- Preceding positions (LASP-2H: softmax attention gets all earlier keys and values; sliding-window
  attention the last `window − 1`; a short convolution the last `k − 1` inputs). One AllGather of
  each rank's (tail of) keys/values/inputs; rank r takes those of ranks < r as its incoming state
  (a KV cache / convolution window) and the mixer masks by positions as for any cache. The autograd
  of the gather reduce-scatters the gradients back to their owners.

- Token statistics (MoH's balance loss): `mean` all-reduces a slice's per-token means, so that every
  rank computes the statistic of the whole rows.

Every rank enters every collective in the same order: all ranks run the same layers, and each
gathered tensor stays on the autograd graph (also where a rank uses none of it), so the backward
collectives match too.

Accounting: `bytes_sent` counts, per layer, the bytes this rank sends in these collectives (forward
and backward; the ring algorithm's (W − 1) × its own piece, the least any all-gather or
reduce-scatter can send per rank), for the trainer to log per step.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

import torch


def _collective(new: str, old: str):
    """torch 2.13 renamed the tensor collectives (`*_single`); torch 2.11 has only the old names."""
    import torch.distributed as dist

    return getattr(dist, new, None) or getattr(dist, old)


class _GatherSlices(torch.autograd.Function):
    """x: [N, ...] on every rank -> [W, N, ...] (rank order). Backward: reduce-scatter (sum) of the
    gradient, so each rank gets the sum over ranks of the gradients of its own piece."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, sp: SequenceParallel, layer: int) -> torch.Tensor:
        ctx.sp, ctx.layer = sp, layer
        x = x.contiguous()
        out = x.new_empty((sp.size * x.shape[0], *x.shape[1:]))
        _collective("all_gather_single", "all_gather_into_tensor")(out, x, group=sp.group)
        sp.count(ctx.layer, x)
        return out.view(sp.size, *x.shape)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        sp = ctx.sp
        out = grad.new_empty(grad.shape[1:])
        reduce_scatter = _collective("reduce_scatter_single", "reduce_scatter_tensor")
        reduce_scatter(out, grad.contiguous().flatten(0, 1), group=sp.group)
        sp.count(ctx.layer, out)
        return out, None, None


class _GroupMean(torch.autograd.Function):
    """x on every rank -> the mean over the group; backward: the mean of the gradients (every rank
    holds the same statistic and back-propagates it, so each rank's share is 1/W of the sum)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, sp: SequenceParallel, layer: int) -> torch.Tensor:
        ctx.sp, ctx.layer = sp, layer
        return sp.all_reduce_mean(x, layer)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        return ctx.sp.all_reduce_mean(grad, ctx.layer), None, None


def apply_transition(transition: torch.Tensor, state: torch.Tensor) -> torch.Tensor:
    """transition: [B, H] (a scalar per head), [B, H, K] (diagonal) or [B, H, K, K] (a matrix);
    state: [B, H, K, V] -> the transition applied to the state."""
    if transition.dim() == state.dim():
        return transition @ state
    return transition.reshape(*transition.shape, *([1] * (state.dim() - transition.dim()))) * state


class SequenceParallel:
    """This rank's place in its sequence-parallel group and the group's collectives.

    Carried by the batch context (`BatchContext.sequence_parallel`) so that mixers reach it without
    importing this package. Every collective takes the calling mixer's layer index, to which its
    byte counts go (forward and backward).
    """

    def __init__(self, group: Any, rank: int, size: int) -> None:
        self.group, self.rank, self.size = group, rank, size
        self.bytes_sent: dict[int, int] = defaultdict(int)

    def count(self, layer: int, piece: torch.Tensor, factor: float = 1.0) -> None:
        self.bytes_sent[layer] += round(factor * (self.size - 1) * piece.numel() * piece.element_size())

    def all_reduce_mean(self, x: torch.Tensor, layer: int) -> torch.Tensor:
        import torch.distributed as dist

        out = x.detach().clone()
        dist.all_reduce(out, group=self.group)
        self.count(layer, out, 2 / self.size)  # ring all-reduce: 2 (W-1)/W of the tensor per rank
        return out / self.size

    def take_bytes(self) -> dict[int, int]:
        """The bytes sent per layer since the last call (and reset)."""
        out, self.bytes_sent = dict(self.bytes_sent), defaultdict(int)
        return out

    @torch.compiler.disable
    def gather(self, x: torch.Tensor, layer: int) -> torch.Tensor:
        """x: [N, ...] -> [W, N, ...], every rank's x in rank order (differentiable)."""
        return _GatherSlices.apply(x, self, layer)

    @torch.compiler.disable
    def mean(self, x: torch.Tensor, layer: int) -> torch.Tensor:
        """A statistic of this slice's tokens -> its mean over the group's slices (equal token counts:
        the statistic of the whole rows), differentiable (e.g. MoH's head-load means)."""
        return _GroupMean.apply(x, self, layer)

    @torch.compiler.disable
    def initial_state(
        self, transition: torch.Tensor, final_state: torch.Tensor, context, layer: int
    ) -> torch.Tensor:
        """LASP-2. transition: this slice's A ([B, H], [B, H, K] or [B, H, K, K], see
        `apply_transition`); final_state: E [B, H, K, V], the state after this slice's last document
        from a zero start -> the state entering this slice, [B, H, K, V] fp32. Rows whose last
        document starts inside the slice cut the chain (their A is zeroed here)."""
        B = final_state.shape[0]
        through = (context.positions[:, -1] >= context.seq_len).float()  # last document began before
        A = transition.float() * through.view(B, *([1] * (transition.dim() - 1)))
        E = final_state.float()
        gathered = self.gather(torch.cat([A.reshape(B, -1), E.reshape(B, -1)], dim=1), layer)
        n_a = A[0].numel()
        # Start from an empty slice of the gather so that rank 0 too keeps it on the graph.
        state = E.new_zeros(E.shape) + gathered[:0].sum()
        for j in range(self.rank):
            A_j = gathered[j, :, :n_a].reshape(A.shape)
            E_j = gathered[j, :, n_a:].reshape(E.shape)
            state = apply_transition(A_j, state) + E_j
        return state

    @torch.compiler.disable
    def preceding(self, x: torch.Tensor, length: int | None, layer: int) -> torch.Tensor:
        """LASP-2H. x: [B, T, ...] this slice's tensors -> [B, P, ...] those of the positions right
        before the slice: all earlier ranks' (P = rank · T) when `length` is None, else exactly the
        last `length` (zeros where there are fewer: before the sequence start)."""
        B, T = x.shape[:2]
        tail = x if length is None else x[:, max(T - length, 0) :]
        gathered = self.gather(tail, layer)  # [W, B, n, ...]
        before = gathered[: self.rank].transpose(0, 1).flatten(1, 2)  # [B, rank * n, ...]
        if length is None:
            return before
        before = before[:, max(before.shape[1] - length, 0) :]
        pad = before.new_zeros(B, length - before.shape[1], *x.shape[2:])
        return torch.cat([pad, before], dim=1)
