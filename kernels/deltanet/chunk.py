"""Chunked PyTorch path (CPU training and a second reference): differentiable through autograd.

Blocks of `chunk_size` tokens (MATH.md, "Chunked form"): inside every block at once, the UT transform
T = (I + tril(diag(β) K Kᵀ, -1))⁻¹ by block doubling and the WY factors W = T diag(β) K,
U⁰ = T diag(β) V; across blocks, a loop that carries the state S and turns U⁰ into the block's
pseudo-values U = U⁰ − W S. Computes in fp32 whatever the input dtype; o comes back in the input
dtype, states in fp32.
"""

from __future__ import annotations

import torch

from lmstack_kernels.common.chunked import from_chunks, to_chunks
from lmstack_kernels.common.triton_utils import pow2


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


def _chunk_dense(
    q: torch.Tensor | None,
    k: torch.Tensor,
    v: torch.Tensor,
    beta: torch.Tensor,
    scale: float,
    initial_state: torch.Tensor | None,
    chunk_size: int,
) -> tuple[torch.Tensor | None, torch.Tensor]:
    """One sequence per row (shapes as `chunk_delta_rule`); q None: the final state only."""
    B, T, H, K = k.shape
    V = v.shape[-1]
    S = k.new_zeros(B, H, K, V, dtype=torch.float32) if initial_state is None else initial_state.float()
    if T == 0:
        return (None if q is None else v.new_zeros(v.shape)), S
    C = min(chunk_size, pow2(T))  # a power of two (the UT transform halves it)
    nb = -(-T // C)
    # Zero padding is exact here: a padded token (k = 0, β = 0) leaves the state unchanged.
    kb, vb, betab = to_chunks(k, nb, C), to_chunks(v, nb, C), to_chunks(beta[..., None], nb, C)[..., 0]
    W, U0 = _wy_factors(kb, vb, betab)
    # unbind once: indexing block n of a full tensor in the loop would cost a full-size zero gradient
    # per block in the backward (quadratic in T).
    entry_states, pseudo_values = [], []
    for k_n, w_n, u0_n in zip(kb.unbind(2), W.unbind(2), U0.unbind(2)):
        entry_states.append(S)
        U = u0_n - w_n @ S
        S = S + k_n.transpose(-1, -2) @ U
        pseudo_values.append(U)
    if q is None:
        return None, S
    qb = to_chunks(q, nb, C) * scale
    U = torch.stack(pseudo_values, 2)
    o = qb @ torch.stack(entry_states, 2) + torch.tril(qb @ kb.transpose(-1, -2)) @ U
    return from_chunks(o, T).to(q.dtype), S


def _documents(cu_seqlens: torch.Tensor) -> list[tuple[int, int]]:
    cu = cu_seqlens.tolist()
    return list(zip(cu[:-1], cu[1:]))


def chunk_delta_rule(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    beta: torch.Tensor,
    scale: float,
    initial_state: torch.Tensor | None = None,
    cu_seqlens: torch.Tensor | None = None,
    chunk_size: int = 64,
) -> tuple[torch.Tensor, torch.Tensor]:
    """q, k: [B, T, H, K]; v: [B, T, H, V]; beta: [B, T, H]; initial_state: [B, H, K, V] or None.
    With `cu_seqlens` ([N+1], B = 1) each document runs on its own (the state restarts from
    `initial_state[n]` or 0) and the final state is [N, H, K, V]. Returns (o like v in q's dtype,
    final state fp32)."""
    if cu_seqlens is None:
        return _chunk_dense(q, k, v, beta, scale, initial_state, chunk_size)
    outs, finals = [], []
    for n, (s, e) in enumerate(_documents(cu_seqlens)):
        h0 = None if initial_state is None else initial_state[n : n + 1]
        o, final = _chunk_dense(q[:, s:e], k[:, s:e], v[:, s:e], beta[:, s:e], scale, h0, chunk_size)
        outs.append(o)
        finals.append(final)
    return torch.cat(outs, 1), torch.cat(finals, 0)


def chunk_delta_rule_affine_map(
    k: torch.Tensor,
    v: torch.Tensor,
    beta: torch.Tensor,
    cu_seqlens: torch.Tensor | None = None,
    chunk_size: int = 64,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(P [N, H, K, K], E [N, H, K, V]), fp32, with S_out = P S_in + E for each row (or document).

    P is the state that the identity becomes with all values zero, E the state from a zero start
    (MATH.md, "The affine map of a segment"), so both come out of one pass of the state loop over
    the augmented state [P | E], started from [I | 0] with values [0 | v]."""
    if cu_seqlens is not None:
        maps = [
            chunk_delta_rule_affine_map(k[:, s:e], v[:, s:e], beta[:, s:e], None, chunk_size)
            for s, e in _documents(cu_seqlens)
        ]
        return torch.cat([P for P, _ in maps]), torch.cat([E for _, E in maps])
    B, _, H, K = k.shape
    eye = torch.eye(K, dtype=torch.float32, device=k.device).expand(B, H, K, K)
    start = torch.cat([eye, eye.new_zeros(B, H, K, v.shape[-1])], -1)
    v_aug = torch.cat([v.new_zeros(*v.shape[:3], K), v], -1)
    _, final = _chunk_dense(None, k, v_aug, beta, 1.0, start, chunk_size)
    return final[..., :K], final[..., K:]
