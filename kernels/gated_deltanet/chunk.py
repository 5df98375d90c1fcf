"""Chunked PyTorch path (CPU training and a second reference): differentiable through autograd.

Blocks of `chunk_size` tokens (MATH.md, "Chunked form"). With a_i the cumulative log decay inside a
block and D_ij = exp(a_i − a_j) (i ≥ j, else 0), inside every block at once: the UT transform
T = (I + tril(diag(β) (K Kᵀ ⊙ D), -1))⁻¹, the WY factors W = T diag(β e^a) K and U⁰ = T diag(β) V;
across blocks, a loop that carries the state S, turns U⁰ into the pseudo-values U = U⁰ − W S and
updates S ← e^{a_n} S + (diag(e^{a_n − a}) K)ᵀ U. Every decay is the exp of a non-positive number
(g ≤ 0), so strong decay underflows to 0 instead of overflowing. Computes in fp32 whatever the
input dtype; o comes back in the input dtype, states in fp32.
"""

from __future__ import annotations

import torch

from lmstack_kernels.common.chunked import from_chunks, pow2, to_chunks
from lmstack_kernels.common.compiler import eager_with_documents
from lmstack_kernels.deltanet.chunk import _documents, _grid, _unit_lower_inverse


def _block_decays(g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """g [..., C] -> (a [..., C] the cumulative log decay, D [..., C, C] = exp(a_i − a_j) for i ≥ j
    and 0 above the diagonal; the masked entries are never exponentiated)."""
    a = g.cumsum(-1)
    causal = torch.ones(g.shape[-1], g.shape[-1], dtype=torch.bool, device=g.device).tril()
    return a, (a[..., :, None] - a[..., None, :]).masked_fill(~causal, float("-inf")).exp()


def _chunk_documents(
    q: torch.Tensor | None,
    k: torch.Tensor,
    v: torch.Tensor,
    beta: torch.Tensor,
    g: torch.Tensor,
    scale: float,
    initial_state: torch.Tensor | None,
    lengths: list[int],
    chunk_size: int,
) -> tuple[torch.Tensor | None, torch.Tensor]:
    """Documents of `lengths` tokens laid end to end in one row: q, k [1, TT, H, K] (q None: the final
    states only), v [1, TT, H, V], beta, g [1, TT, H], initial_state [N, H, K, V] or None. Returns (o
    [1, TT, H, V] in q's dtype or None, final states [N, H, K, V] fp32).

    The layout is DeltaNet's (`lmstack_kernels.deltanet.chunk`): every document starts a block of a
    padded layout, padded tokens (k = v = 0, β = 0, g = 0) are identity transitions, and the state
    loop takes step c of every document together."""
    _, TT, H, K = k.shape
    N, V = len(lengths), v.shape[-1]
    S = k.new_zeros(N, H, K, V, dtype=torch.float32) if initial_state is None else initial_state.float()
    if TT == 0:
        return (None if q is None else v.new_zeros(v.shape)), S
    C = min(chunk_size, pow2(max(lengths)))  # a power of two (the UT transform halves it)
    n_blocks = [-(-L // C) for L in lengths]
    first = [sum(n_blocks[:d]) for d in range(N)]
    n, steps = sum(n_blocks), max(n_blocks)
    if n * C == TT:  # every document fills its blocks: the layout is the row itself
        padded = lambda x: x
        unpad = lambda o: o
    else:
        pos = torch.cat([torch.arange(L) + f * C for L, f in zip(lengths, first)]).to(k.device)
        padded = lambda x: x.new_zeros(1, n * C, *x.shape[2:]).index_copy(1, pos, x)
        unpad = lambda o: o.index_select(1, pos)
    blocks = lambda x: to_chunks(padded(x), n, C).contiguous()  # strided batches make bmm slow on CPU
    kb, vb = blocks(k), blocks(v)
    betab, gb = (blocks(x[..., None])[..., 0] for x in (beta, g))  # [1, H, n, C]
    a, D = _block_decays(gb)
    a_end = a[..., -1:]  # padded rows have g = 0: the log decay of the whole block
    k_beta = kb * betab[..., None]
    T = _unit_lower_inverse(torch.tril((k_beta @ kb.transpose(-1, -2)) * D, -1))
    W, U0 = T @ (k_beta * a.exp()[..., None]), T @ (vb * betab[..., None])
    k_end = kb * (a_end - a).exp()[..., None]  # each key decayed to the block end
    cells = torch.tensor(
        [[first[d] + c if c < n_blocks[d] else n for d in range(N)] for c in range(steps)], device=k.device
    )
    entry_states, pseudo_values = [], []
    # The grid pads past-the-end cells with zeros: log decay 0, k = 0, an identity step.
    grids = (_grid(x, cells).unbind(0) for x in (W, U0, k_end, a_end[..., None]))
    for w_c, u0_c, k_c, a_c in zip(*grids):  # [N, H, C, *]; a_c [N, H, 1, 1]
        entry_states.append(S)
        U = u0_c - w_c @ S
        S = a_c.exp() * S + k_c.transpose(-1, -2) @ U
        pseudo_values.append(U)
    if q is None:
        return None, S
    # Back from the grid to the blocks: block j of document d at step c is cell c * N + d.
    cell_of_block = torch.tensor([c * N + d for d in range(N) for c in range(n_blocks[d])], device=k.device)
    back = lambda xs: torch.stack(xs).flatten(0, 1)[cell_of_block].movedim(0, 1)[None]  # [1, H, n, *, *]
    qb = blocks(q) * scale
    o = (qb * a.exp()[..., None]) @ back(entry_states) + ((qb @ kb.transpose(-1, -2)) * D) @ back(
        pseudo_values
    )
    return unpad(from_chunks(o, n * C)).to(q.dtype), S


@eager_with_documents
def chunk_gated_delta_rule(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    beta: torch.Tensor,
    g: torch.Tensor,
    scale: float,
    initial_state: torch.Tensor | None = None,
    *,
    cu_seqlens: torch.Tensor | None = None,
    chunk_size: int = 64,
) -> tuple[torch.Tensor, torch.Tensor]:
    """q, k: [B, T, H, K]; v: [B, T, H, V]; beta, g: [B, T, H]; initial_state: [B, H, K, V] or None.
    With `cu_seqlens` ([N+1], B = 1) each document runs on its own (the state restarts from
    `initial_state[n]` or 0) and the final state is [N, H, K, V]. Returns (o like v in q's dtype,
    final state fp32)."""
    B, T = k.shape[:2]
    flat = lambda x: x.reshape(1, B * T, *x.shape[2:])
    o, final = _chunk_documents(
        flat(q), flat(k), flat(v), flat(beta), flat(g), scale, initial_state, _documents(B, T, cu_seqlens),
        chunk_size,
    )  # fmt: skip
    return o.view(v.shape), final


def chunk_gated_delta_rule_affine_map(
    k: torch.Tensor,
    v: torch.Tensor,
    beta: torch.Tensor,
    g: torch.Tensor,
    cu_seqlens: torch.Tensor | None = None,
    chunk_size: int = 64,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(P [N, H, K, K], E [N, H, K, V]), fp32, with S_out = P S_in + E for each row (or document).

    P is the state that the identity becomes with all values zero, E the state from a zero start
    (MATH.md, "The affine map of a slice"), so both come out of one pass of the state loop over the
    augmented state [P | E], started from [I | 0] with values [0 | v]."""
    B, T, H, K = k.shape
    lengths = _documents(B, T, cu_seqlens)
    eye = torch.eye(K, dtype=torch.float32, device=k.device).expand(len(lengths), H, K, K)
    start = torch.cat([eye, eye.new_zeros(len(lengths), H, K, v.shape[-1])], -1)
    flat = lambda x: x.reshape(1, B * T, *x.shape[2:])
    v_aug = torch.cat([v.new_zeros(*v.shape[:3], K), v], -1)
    _, final = _chunk_documents(
        None, flat(k), flat(v_aug), flat(beta), flat(g), 1.0, start, lengths, chunk_size
    )
    return final[..., :K], final[..., K:]
