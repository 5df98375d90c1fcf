"""Chunked PyTorch path (CPU training and a second reference): differentiable through autograd.

Blocks of `chunk_size` tokens: inside a block, masked attention with the decay matrix
M_ij = λ^(i-j) (i ≥ j); across blocks, through the running state S (see MATH.md). Computes in fp32
whatever the input dtype; o comes back in the input dtype, the final state in fp32.
"""

from __future__ import annotations

import torch

from lmstack_kernels.common.chunked import from_chunks, scan_states, to_chunks
from lmstack_kernels.common.compiler import eager_with_documents


def chunk_lightning_attn_dense(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    decay: torch.Tensor,
    scale: float,
    initial_state: torch.Tensor | None,
    chunk_size: int = 64,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One sequence per row. q, k: [B, T, H, K]; v: [B, T, H, V]; decay: [H] log λ;
    initial_state: [B, H, K, V] or None. Returns (o [B, T, H, V] in q's dtype, final state fp32)."""
    B, T, H, K = q.shape
    V = v.shape[-1]
    if T == 0:
        h0 = q.new_zeros(B, H, K, V, dtype=torch.float32) if initial_state is None else initial_state.float()
        return v.new_zeros(v.shape), h0
    C = max(1, min(chunk_size, T))
    nb = -(-T // C)
    qb, kb, vb = to_chunks(q, nb, C), to_chunks(k, nb, C), to_chunks(v, nb, C)
    g = decay.float().to(q.device)
    i = torch.arange(C, device=q.device)
    diff = i[:, None] - i[None, :]
    # Exponents are clamped before exp so that masked entries never overflow (and have 0 gradient).
    M = torch.where(diff >= 0, torch.exp(g[:, None, None] * diff.clamp(min=0)), 0.0)  # [H, C, C]
    scores = torch.einsum("bhnik,bhnjk->bhnij", qb, kb) * (scale * M[None, :, None])
    o = scores @ vb  # intra-block
    # Block lengths (the last may be partial), the decay of each key to its block end, block decays.
    lengths = torch.full((nb,), C, device=q.device)
    lengths[-1] = T - (nb - 1) * C
    to_end = lengths[:, None] - 1 - i[None, :]  # [nb, C]
    k_decay = torch.where(to_end >= 0, torch.exp(g[:, None, None] * to_end.clamp(min=0)), 0.0)  # [H, nb, C]
    U = torch.einsum("bhnjk,bhnjv->nbhkv", kb * k_decay[None, ..., None], vb)  # [nb, B, H, K, V]
    block_decay = torch.exp(g[:, None] * lengths)  # [H, nb]
    S0 = q.new_zeros(B, H, K, V, dtype=torch.float32) if initial_state is None else initial_state.float()
    states = scan_states(U, block_decay.T[:, None, :, None], S0)  # [nb + 1, B, H, K, V]
    q_decay = torch.exp(g[:, None] * (i + 1))  # [H, C]: decay of the state entering the block
    o = o + torch.einsum("bhnik,nbhkv->bhniv", qb * (scale * q_decay[None, :, None, :, None]), states[:-1])
    o, S = from_chunks(o, T), states[-1]
    return o.to(q.dtype), S


@eager_with_documents
def chunk_lightning_attn(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    decay: torch.Tensor,
    scale: float,
    initial_state: torch.Tensor | None = None,
    *,
    cu_seqlens: torch.Tensor | None = None,
    chunk_size: int = 64,
) -> tuple[torch.Tensor, torch.Tensor]:
    """As `chunk_lightning_attn_dense`; with `cu_seqlens` ([N+1], B = 1) each document runs on its
    own (the state restarts from `initial_state[n]` or 0) and the final state is [N, H, K, V]."""
    if cu_seqlens is None:
        return chunk_lightning_attn_dense(q, k, v, decay, scale, initial_state, chunk_size)
    cu = cu_seqlens.tolist()
    outs, finals = [], []
    for n in range(len(cu) - 1):
        s, e = cu[n], cu[n + 1]
        h0 = None if initial_state is None else initial_state[n : n + 1]
        if e == s:  # an empty document passes its initial state through
            H, K, V = q.shape[2], q.shape[3], v.shape[3]
            finals.append(q.new_zeros(1, H, K, V, dtype=torch.float32) if h0 is None else h0.float())
            continue
        o, fin = chunk_lightning_attn_dense(q[:, s:e], k[:, s:e], v[:, s:e], decay, scale, h0, chunk_size)
        outs.append(o)
        finals.append(fin)
    o = torch.cat(outs, 1) if outs else v.new_zeros(v.shape)
    return o, torch.cat(finals, 0)
