"""Chunked PyTorch path (CPU training and a second reference): differentiable through autograd.

DeltaNet's chunked path (`lmstack_kernels.deltanet.chunk`) run with the log decays g: blocks of
`chunk_size` tokens (MATH.md, "Chunked form"); with a_i the cumulative log decay inside a block and
D_ij = exp(a_i − a_j) (i ≥ j, else 0), inside every block at once the UT transform
T = (I + tril(diag(β) (K Kᵀ ⊙ D), -1))⁻¹ and the WY factors W = T diag(β e^a) K, U⁰ = T diag(β) V;
across blocks a loop carries S, with U = U⁰ − W S and S ← e^{a_end} S + (diag(e^{a_end − a}) K)ᵀ U.
Every decay is the exp of a non-positive number, so strong decay underflows to 0, never overflows.
Computes in fp32 whatever the input dtype; o comes back in the input dtype, states in fp32.
"""

from __future__ import annotations

import torch

from lmstack_kernels.deltanet.chunk import _chunk_documents, _documents, chunk_delta_rule_affine_map


def chunk_gated_delta_rule(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    beta: torch.Tensor,
    g: torch.Tensor,
    scale: float,
    initial_state: torch.Tensor | None = None,
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
        flat(q), flat(k), flat(v), flat(beta), scale, initial_state, _documents(B, T, cu_seqlens),
        chunk_size, flat(g),
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
    """(P [N, H, K, K], E [N, H, K, V]), fp32, with S_out = P S_in + E for each row (or document):
    DeltaNet's augmented-state pass ([P | E] from [I | 0], values [0 | v]) with the decays
    (MATH.md, "The affine map of a slice")."""
    return chunk_delta_rule_affine_map(k, v, beta, cu_seqlens, chunk_size, g)
