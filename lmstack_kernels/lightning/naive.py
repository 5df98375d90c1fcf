"""The ground truth: the lightning-attention recurrence, one token at a time (slow; tests only).

    S_t = λ_h S_{t-1} + k_t v_tᵀ        (S_{-1} = initial_state, or 0)
    o_t = scale · q_tᵀ S_t

See MATH.md for the convention; shapes as in `lmstack_kernels.lightning.lightning_attn`.
"""

from __future__ import annotations

import torch

from lmstack_kernels.common.naive import sequence_bounds, start_state


def naive_lightning_attn(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    decay: torch.Tensor,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    cu_seqlens: torch.Tensor | None = None,
    dtype: torch.dtype = torch.float32,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """q, k: [B, T, H, K]; v: [B, T, H, V]; decay: [H] log-decay (≤ 0); initial_state: [B, H, K, V]
    (or [N, H, K, V] with `cu_seqlens`, then B must be 1). Computes in `dtype` (fp32 or fp64) and
    returns o in q's dtype and the final state in fp32 (None unless `output_final_state`)."""
    B, T, H, K = q.shape
    scale = K**-0.5 if scale is None else scale
    lam = decay.to(dtype).exp()[:, None, None]  # [H, 1, 1]
    o = torch.zeros(v.shape, dtype=dtype, device=v.device)
    finals = []
    for n, (b, start, end) in enumerate(sequence_bounds(B, T, cu_seqlens)):
        S = start_state(initial_state, n, (H, K, v.shape[-1]), dtype, v.device)
        for t in range(start, end):
            S = lam * S + k[b, t].to(dtype)[:, :, None] * v[b, t].to(dtype)[:, None, :]
            o[b, t] = scale * torch.einsum("hk,hkv->hv", q[b, t].to(dtype), S)
        finals.append(S)
    final = torch.stack(finals).float() if output_final_state else None
    return o.to(q.dtype), final
