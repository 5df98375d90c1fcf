"""The ground truth: the gated delta-rule recurrence, one token at a time (slow; tests only).

    S_t = exp(g_t) (I − β_t k_t k_tᵀ) S_{t-1} + β_t k_t v_tᵀ        (S_{-1} = initial_state, or 0)
    o_t = S_tᵀ (scale · q_t)

The transition is built as the explicit K×K matrix, the literal definition (the production paths
use the rank-one form instead). See MATH.md for the convention; shapes as in
`lmstack_kernels.gated_deltanet.gated_delta_rule_attn`.
"""

from __future__ import annotations

import torch

from lmstack_kernels.common.naive import sequence_bounds, start_state


def naive_gated_delta_rule(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    beta: torch.Tensor,
    g: torch.Tensor,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    cu_seqlens: torch.Tensor | None = None,
    dtype: torch.dtype = torch.float32,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """q, k: [B, T, H, K]; v: [B, T, H, V]; beta, g: [B, T, H]; initial_state: [B, H, K, V] (or
    [N, H, K, V] with `cu_seqlens`, then B must be 1). Computes in `dtype` (fp32 or fp64) and returns
    o in q's dtype and the final state in fp32 (None unless `output_final_state`)."""
    B, T, H, K = q.shape
    scale = K**-0.5 if scale is None else scale
    eye = torch.eye(K, dtype=dtype, device=q.device)
    o = torch.zeros(v.shape, dtype=dtype, device=v.device)
    finals = []
    for n, (b, start, end) in enumerate(sequence_bounds(B, T, cu_seqlens)):
        S = start_state(initial_state, n, (H, K, v.shape[-1]), dtype, v.device)
        for t in range(start, end):
            k_t, v_t = k[b, t].to(dtype), v[b, t].to(dtype)  # [H, K], [H, V]
            beta_t = beta[b, t].to(dtype)[:, None, None]  # [H, 1, 1]
            decay = g[b, t].to(dtype).exp()[:, None, None]
            transition = decay * (eye - beta_t * k_t[:, :, None] * k_t[:, None, :])  # [H, K, K]
            S = transition @ S + beta_t * k_t[:, :, None] * v_t[:, None, :]
            o[b, t] = scale * torch.einsum("hk,hkv->hv", q[b, t].to(dtype), S)
        finals.append(S)
    final = torch.stack(finals).float() if output_final_state else None
    return o.to(q.dtype), final
