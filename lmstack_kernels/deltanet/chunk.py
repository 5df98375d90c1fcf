"""Chunked PyTorch path (CPU training and a second reference): differentiable through autograd.

Blocks of `chunk_size` tokens (MATH.md, "Chunked form"): inside every block at once, the UT transform
T = (I + tril(diag(β) K Kᵀ, -1))⁻¹ by block doubling and the WY factors W = T diag(β) K,
U⁰ = T diag(β) V; across blocks, a loop that carries the state S and turns U⁰ into the block's
pseudo-values U = U⁰ − W S. Computes in fp32 whatever the input dtype; o comes back in the input
dtype, states in fp32.
"""

from __future__ import annotations

import torch

from lmstack_kernels.common.chunked import from_chunks, pow2, to_chunks
from lmstack_kernels.common.compiler import eager_with_documents


def _unit_lower_inverse(lower: torch.Tensor) -> torch.Tensor:
    """(I + lower)⁻¹ for strictly lower-triangular `lower` [..., C, C], C a power of two, by block
    doubling (MATH.md, "The UT transform"): the inverses A, B of two neighbouring diagonal b-blocks
    and the b-block C below-left of them give the 2b-block [[A, 0], [−B C A, B]]. Exact block forward
    substitution in small batched matrix multiplies (a batched triangular solve is ~50× slower on CPU)."""
    *batch, C, _ = lower.shape
    blocks = lower.new_ones(*batch, C, 1, 1)  # the inverses of the 1×1 diagonal blocks
    b = 1
    while b < C:
        n = C // (2 * b)
        pairs = torch.diagonal(lower.view(*batch, n, 2 * b, n, 2 * b), dim1=-4, dim2=-2).movedim(-1, -3)
        upper_inv, lower_inv = blocks[..., 0::2, :, :], blocks[..., 1::2, :, :]
        below_left = -(lower_inv @ pairs[..., b:, :b]) @ upper_inv
        blocks = torch.cat(
            [
                torch.cat([upper_inv, torch.zeros_like(upper_inv)], -1),
                torch.cat([below_left, lower_inv], -1),
            ],
            -2,
        )
        b *= 2
    return blocks[..., 0, :, :]


def _wy_factors(k: torch.Tensor, v: torch.Tensor, beta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per block: k [..., C, K], v [..., C, V], beta [..., C] -> (W [..., C, K], U⁰ [..., C, V])."""
    k_beta = k * beta[..., None]
    T = _unit_lower_inverse(torch.tril(k_beta @ k.transpose(-1, -2), -1))  # tril(diag(β) K Kᵀ, -1)
    return T @ k_beta, T @ (v * beta[..., None])


def _block_decays(g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Gated DeltaNet's decays, g [..., C] -> (a [..., C] the cumulative log decay, D [..., C, C] =
    exp(a_i − a_j) for i ≥ j and 0 above the diagonal; masked before the exp, so no positive
    exponent is ever taken: lmstack_kernels/gated_deltanet/MATH.md)."""
    a = g.cumsum(-1)
    causal = torch.ones(g.shape[-1], g.shape[-1], dtype=torch.bool, device=g.device).tril()
    return a, (a[..., :, None] - a[..., None, :]).masked_fill(~causal, float("-inf")).exp()


def _grid(x: torch.Tensor, cells: torch.Tensor) -> torch.Tensor:
    """Blocks [1, H, n, C, D] -> [steps, N, H, C, D] by the block index of each (step, document)
    cell; index n (past the end) is an all-zero block, which leaves the state unchanged."""
    x = torch.cat([x[0], x.new_zeros(x.shape[1], 1, *x.shape[3:])], 1)  # [H, n + 1, C, D]
    return x[:, cells].permute(1, 2, 0, 3, 4).contiguous()


def _chunk_documents(
    q: torch.Tensor | None,
    k: torch.Tensor,
    v: torch.Tensor,
    beta: torch.Tensor,
    scale: float,
    initial_state: torch.Tensor | None,
    lengths: list[int],
    chunk_size: int,
    g: torch.Tensor | None = None,
) -> tuple[torch.Tensor | None, torch.Tensor]:
    """Documents of `lengths` tokens laid end to end in one row: q, k [1, TT, H, K] (q None: the final
    states only), v [1, TT, H, V], beta [1, TT, H], initial_state [N, H, K, V] or None. Returns (o
    [1, TT, H, V] in q's dtype or None, final states [N, H, K, V] fp32). With the log decays g
    [1, TT, H] this is the gated delta rule (Gated DeltaNet; its MATH.md): the same loop with
    W = T diag(β e^a) K, S ← e^{a_end} S + (diag(e^{a_end − a}) K)ᵀ U and the decays in o.

    Every document starts a block of a padded layout, so the UT transform and W, U⁰ of all blocks of
    all documents are computed at once; the state loop then takes step c of every document together
    (a document with fewer blocks gets all-zero blocks), one step per block of the longest."""
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
    # Zero padding is exact here: a padded token (k = 0, β = 0, g = 0) leaves the state unchanged.
    kb, vb, betab = blocks(k), blocks(v), blocks(beta[..., None])[..., 0]
    if g is None:
        W, U0 = _wy_factors(kb, vb, betab)
        k_end, grids = kb, (kb, W, U0)
    else:
        a, D = _block_decays(blocks(g[..., None])[..., 0])
        a_end = a[..., -1:]  # padded rows have g = 0: the log decay of the whole block
        k_beta = kb * betab[..., None]
        T = _unit_lower_inverse(torch.tril((k_beta @ kb.transpose(-1, -2)) * D, -1))
        W, U0 = T @ (k_beta * a.exp()[..., None]), T @ (vb * betab[..., None])
        k_end = kb * (a_end - a).exp()[..., None]  # each key decayed to the block end
        grids = (k_end, W, U0, a_end[..., None])  # past-the-end cells: log decay 0, the identity
    cells = torch.tensor(
        [[first[d] + c if c < n_blocks[d] else n for d in range(N)] for c in range(steps)], device=k.device
    )
    entry_states, pseudo_values = [], []
    # One gather into the grid and unbind: indexing blocks inside the loop would cost a full-size
    # zero gradient per step in the backward (quadratic in T).
    for k_c, w_c, u0_c, *a_c in zip(*(_grid(x, cells).unbind(0) for x in grids)):  # [N, H, C, *]
        entry_states.append(S)
        U = u0_c - w_c @ S
        S = (S if g is None else a_c[0].exp() * S) + k_c.transpose(-1, -2) @ U
        pseudo_values.append(U)
    if q is None:
        return None, S
    # Back from the grid to the blocks: block j of document d at step c is cell c * N + d.
    cell_of_block = torch.tensor([c * N + d for d in range(N) for c in range(n_blocks[d])], device=k.device)
    back = lambda xs: torch.stack(xs).flatten(0, 1)[cell_of_block].movedim(0, 1)[None]  # [1, H, n, *, *]
    qb = blocks(q) * scale
    if g is None:
        o = qb @ back(entry_states) + torch.tril(qb @ kb.transpose(-1, -2)) @ back(pseudo_values)
    else:
        o = (qb * a.exp()[..., None]) @ back(entry_states) + ((qb @ kb.transpose(-1, -2)) * D) @ back(
            pseudo_values
        )
    return unpad(from_chunks(o, n * C)).to(q.dtype), S


def _documents(B: int, T: int, cu_seqlens: torch.Tensor | None) -> list[int]:
    """Document lengths: B rows of T tokens, or those of `cu_seqlens` (then B = 1)."""
    if cu_seqlens is None:
        return [T] * B
    cu = cu_seqlens.tolist()
    return [e - s for s, e in zip(cu[:-1], cu[1:])]


@eager_with_documents
def chunk_delta_rule(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    beta: torch.Tensor,
    scale: float,
    initial_state: torch.Tensor | None = None,
    *,
    cu_seqlens: torch.Tensor | None = None,
    chunk_size: int = 64,
    g: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """q, k: [B, T, H, K]; v: [B, T, H, V]; beta: [B, T, H]; initial_state: [B, H, K, V] or None;
    g: [B, T, H] log decays (the gated delta rule) or None. With `cu_seqlens` ([N+1], B = 1) each
    document runs on its own (the state restarts from `initial_state[n]` or 0) and the final state is
    [N, H, K, V]. Returns (o like v in q's dtype, final state fp32)."""
    B, T = k.shape[:2]
    flat = lambda x: x.reshape(1, B * T, *x.shape[2:])
    o, final = _chunk_documents(
        flat(q), flat(k), flat(v), flat(beta), scale, initial_state, _documents(B, T, cu_seqlens),
        chunk_size, None if g is None else flat(g),
    )  # fmt: skip
    return o.view(v.shape), final


def chunk_delta_rule_affine_map(
    k: torch.Tensor,
    v: torch.Tensor,
    beta: torch.Tensor,
    cu_seqlens: torch.Tensor | None = None,
    chunk_size: int = 64,
    g: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(P [N, H, K, K], E [N, H, K, V]), fp32, with S_out = P S_in + E for each row (or document);
    with the log decays g [B, T, H], of the gated delta rule.

    P is the state that the identity becomes with all values zero, E the state from a zero start
    (MATH.md, "The affine map of a segment"), so both come out of one pass of the state loop over
    the augmented state [P | E], started from [I | 0] with values [0 | v]."""
    B, T, H, K = k.shape
    lengths = _documents(B, T, cu_seqlens)
    eye = torch.eye(K, dtype=torch.float32, device=k.device).expand(len(lengths), H, K, K)
    start = torch.cat([eye, eye.new_zeros(len(lengths), H, K, v.shape[-1])], -1)
    flat = lambda x: x.reshape(1, B * T, *x.shape[2:])
    v_aug = torch.cat([v.new_zeros(*v.shape[:3], K), v], -1)
    g = None if g is None else flat(g)
    _, final = _chunk_documents(None, flat(k), flat(v_aug), flat(beta), 1.0, start, lengths, chunk_size, g)
    return final[..., :K], final[..., K:]
