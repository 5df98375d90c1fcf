"""Pieces shared by the ops' naive recurrences (the ground truth of the tests): which tokens each
sequence spans, and the state it starts from."""

from __future__ import annotations

import torch


def sequence_bounds(batch: int, seq_len: int, cu_seqlens: torch.Tensor | None) -> list[tuple[int, int, int]]:
    """(batch row, first token, end token) of each sequence: the `batch` rows of `seq_len` tokens, or
    with `cu_seqlens` ([N+1], B = 1) the N documents of row 0."""
    if cu_seqlens is None:
        return [(b, 0, seq_len) for b in range(batch)]
    cu = cu_seqlens.tolist()
    return [(0, cu[n], cu[n + 1]) for n in range(len(cu) - 1)]


def start_state(
    initial_state: torch.Tensor | None, n: int, shape: tuple[int, int, int], dtype: torch.dtype, device
) -> torch.Tensor:
    """Sequence n's state [H, K, V] in `dtype`: a copy of initial_state[n], or zeros."""
    if initial_state is None:
        return torch.zeros(shape, dtype=dtype, device=device)
    return initial_state[n].to(dtype).clone()
