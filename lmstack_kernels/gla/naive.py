"""The ground truth: the gated-linear-attention recurrence, one token at a time (slow; tests only).

    S_t = diag(exp g_t) S_{t-1} + k_t v_tᵀ        (S_{-1} = initial_state, or 0)
    o_t = S_tᵀ (scale · q_t)

See MATH.md for the convention; shapes as in `lmstack_kernels.gla.gla_attn`.
"""

from __future__ import annotations

import torch

from lmstack_kernels.common.naive import sequence_bounds, start_state


def naive_gla(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    cu_seqlens: torch.Tensor | None = None,
    dtype: torch.dtype = torch.float32,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """q, k, g: [B, T, H, K]; v: [B, T, H, V]; initial_state: [B, H, K, V] (or [N, H, K, V] with
    `cu_seqlens`, then B must be 1). Computes in `dtype` (fp32 or fp64), differentiably; returns o in
    q's dtype and the final state in fp32 (None unless `output_final_state`)."""
    B, T, H, K = q.shape
    scale = K**-0.5 if scale is None else scale
    rows: list[list[torch.Tensor]] = [[] for _ in range(B)]
    finals = []
    for n, (b, start, end) in enumerate(sequence_bounds(B, T, cu_seqlens)):
        S = start_state(initial_state, n, (H, K, v.shape[-1]), dtype, v.device)
        for t in range(start, end):
            a = g[b, t].to(dtype).exp()[:, :, None]  # [H, K, 1]
            S = a * S + k[b, t].to(dtype)[:, :, None] * v[b, t].to(dtype)[:, None, :]
            rows[b].append(scale * torch.einsum("hk,hkv->hv", q[b, t].to(dtype), S))
        finals.append(S)
    o = torch.stack([torch.stack(r) if r else v.new_zeros(0, H, v.shape[-1], dtype=dtype) for r in rows])
    final = torch.stack(finals).float() if output_final_state else None
    return o.to(q.dtype), final
