"""Chunked PyTorch path (CPU training and a second reference): differentiable through autograd.

Chunks of C tokens (C a power of two). Across chunks, the state S [K, V] carries everything
(`lmstack_kernels.common.chunked.scan_states`); inside a chunk the causal token pairs (i > j) are
split by a binary tree of halves, and each pair is computed, as a matrix multiply, at the node where
i and j fall in different halves, with every gate sum measured from the split point so no exp
argument is positive (MATH.md, "Chunked PyTorch path"). Computes in fp32 whatever the input dtype; o comes
back in the input dtype, the final state in fp32.
"""

from __future__ import annotations

import torch

from lmstack_kernels.common.chunked import from_chunks, scan_states, to_chunks
from lmstack_kernels.common.compiler import eager_with_documents


def _chunk_terms(qb, kb, vb, gb):
    """Per chunk, from qb (already scaled), kb, gb [B, H, n, C, K] and vb [B, H, n, C, V] (fp32,
    contiguous): the intra-chunk output [B, H, n, C, V], q ⊙ exp(G) [B, H, n, C, K] (to be multiplied
    by the state entering the chunk), the chunk's state increment U [n, B, H, K, V] and its decay
    exp(Σ g) [n, B, H, K].

    Every gate sum is a difference of one fp64 prefix sum G per chunk, taken between two points with
    the later one first (so ≤ 0), and rounded to fp32 only then: exact to fp32 whatever the size of G.
    """
    B, H, n, C, K = qb.shape
    G = gb.double().cumsum(-2)  # Σ_{l≤i} g_l from the chunk start
    G_end = G[..., -1:, :]
    q_in = qb * G.float().exp()
    U = torch.einsum("bhnjk,bhnjv->nbhkv", kb * (G_end - G).float().exp(), vb)
    decay = G_end.squeeze(-2).float().exp().permute(2, 0, 1, 3)
    o = ((qb * kb).sum(-1, keepdim=True) * vb).contiguous()  # pairs i = j: weight exp(0) = 1
    s = C
    while s >= 2:  # nodes of size s: queries in the upper half, keys in the lower half
        shape = (B, H, n, C // s, 2, s // 2)
        _, q_up = qb.view(*shape, K).unbind(-3)
        k_lo, _ = kb.view(*shape, K).unbind(-3)
        v_lo, _ = vb.view(*shape, vb.shape[-1]).unbind(-3)
        G_lo, G_up = G.view(*shape, K).unbind(-3)
        split = G_lo[..., -1:, :]  # G at the last row of the lower half: between every j and i
        scores = (q_up * (G_up - split).float().exp()) @ (k_lo * (split - G_lo).float().exp()).mT
        o.view(*shape, vb.shape[-1])[..., 1, :, :] += scores @ v_lo
        s //= 2
    return o, q_in, U, decay


def _chunked(x: torch.Tensor, n: int, C: int) -> torch.Tensor:
    return to_chunks(x, n, C).contiguous()


def chunk_gla_dense(q, k, v, g, scale, initial_state, chunk_size=64):
    """One sequence per row. q, k, g: [B, T, H, K]; v: [B, T, H, V]; initial_state: [B, H, K, V] or
    None. Returns (o [B, T, H, V] in q's dtype, final state [B, H, K, V] fp32)."""
    B, T, H, K = q.shape
    V = v.shape[-1]
    S0 = q.new_zeros(B, H, K, V, dtype=torch.float32) if initial_state is None else initial_state.float()
    if T == 0:
        return v.new_zeros(v.shape), S0
    C = min(chunk_size, 1 << (T - 1).bit_length())
    n = -(-T // C)
    o, q_in, U, decay = _chunk_terms(
        _chunked(q, n, C) * scale, _chunked(k, n, C), _chunked(v, n, C), _chunked(g, n, C)
    )
    states = scan_states(U, decay, S0)  # [n + 1, B, H, K, V]
    o = o + q_in @ states[:-1].permute(1, 2, 0, 3, 4)
    return from_chunks(o, T).to(q.dtype), states[-1]


def chunk_gla_packed(q, k, v, g, scale, initial_state, cu_seqlens, chunk_size=64):
    """Documents packed in one row (B = 1, `cu_seqlens` [N+1]): each starts at a chunk boundary of a
    padded layout and the scan restarts there from `initial_state[n]` (or 0). Returns (o [1, T, H, V],
    final states [N, H, K, V] fp32; an empty document passes its initial state through)."""
    _, T, H, K = q.shape
    V = v.shape[-1]
    cu = cu_seqlens.tolist()
    N = len(cu) - 1
    inits = q.new_zeros(N, H, K, V, dtype=torch.float32) if initial_state is None else initial_state.float()
    lengths = [cu[d + 1] - cu[d] for d in range(N)]
    docs = [d for d in range(N) if lengths[d] > 0]
    if not docs:
        return v.new_zeros(v.shape), inits
    C = min(chunk_size, 1 << (max(lengths) - 1).bit_length())
    n_chunks = [-(-lengths[d] // C) for d in docs]
    first = torch.tensor([0, *n_chunks[:-1]]).cumsum(0)  # first chunk of each non-empty document
    last = first + torch.tensor(n_chunks) - 1
    n = sum(n_chunks)
    pos = torch.cat([torch.arange(lengths[d]) + int(first[i]) * C for i, d in enumerate(docs)]).to(q.device)
    padded = lambda x: _chunked(x.new_zeros(1, n * C, H, x.shape[-1]).index_copy(1, pos, x), n, C)
    o, q_in, U, decay = _chunk_terms(padded(q) * scale, padded(k), padded(v), padded(g))
    # Step i of the scan gives the state entering chunk i + 1: at a document start that is the
    # document's initial state (decay 0, increment = the initial state).
    doc_of_chunk = torch.repeat_interleave(torch.tensor(docs), torch.tensor(n_chunks)).to(q.device)
    restart = torch.zeros(n, dtype=torch.bool)
    restart[first[1:] - 1] = True
    keep = (~restart).to(q.device, torch.float32)[:, None, None, None]
    next_init = inits[doc_of_chunk.roll(-1)].unsqueeze(1)  # [n, 1, H, K, V]
    states = scan_states(
        U * keep[..., None] + next_init * (1 - keep[..., None]), decay * keep, inits[docs[0]].unsqueeze(0)
    )
    entering = states[:-1]  # [n, 1, H, K, V]
    o = from_chunks(o + q_in @ entering.permute(1, 2, 0, 3, 4), n * C).index_select(1, pos)
    last = last.to(q.device)
    finals = decay[last].unsqueeze(-1) * entering[last] + U[last]  # [M, 1, H, K, V]
    final = inits.index_copy(0, torch.tensor(docs, device=q.device), finals.squeeze(1))
    return o.to(q.dtype), final


@eager_with_documents
def chunk_gla(q, k, v, g, scale, initial_state=None, *, cu_seqlens=None, chunk_size=64):
    """`chunk_gla_dense`, or `chunk_gla_packed` with `cu_seqlens`."""
    if cu_seqlens is None:
        return chunk_gla_dense(q, k, v, g, scale, initial_state, chunk_size)
    return chunk_gla_packed(q, k, v, g, scale, initial_state, cu_seqlens, chunk_size)
