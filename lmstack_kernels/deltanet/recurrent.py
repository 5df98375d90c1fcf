"""The recurrent single-step path (decoding, T = 1): one rank-one state update per head, no chunks.

    u = β (v − Sᵀ k),   S ← S + k uᵀ,   o = Sᵀ (scale · q)

which is S ← (I − β k kᵀ) S + β k vᵀ without forming the K×K transition; with the log decay g (the
gated delta rule) S ← exp(g) S first. Differentiable through autograd; runs on any device.
"""

from __future__ import annotations

import torch


def recurrent_delta_rule_step(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    beta: torch.Tensor,
    scale: float,
    state: torch.Tensor | None,
    g: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """q, k: [B, 1, H, K]; v: [B, 1, H, V]; beta (and g, or None): [B, 1, H]; state: [B, H, K, V] or
    None (zero). Returns (o [B, 1, H, V] in q's dtype, the new state fp32)."""
    B, _, H, K = k.shape
    V = v.shape[-1]
    qt, kt, vt = q[:, 0].float(), k[:, 0].float(), v[:, 0].float()  # [B, H, K|V]
    S = kt.new_zeros(B, H, K, V) if state is None else state.float()
    if g is not None and state is not None:
        S = S * g[:, 0, :, None, None].float().exp()
    u = beta[:, 0, :, None].float() * (vt - torch.einsum("bhk,bhkv->bhv", kt, S))
    S = S + kt[..., :, None] * u[..., None, :]
    o = torch.einsum("bhk,bhkv->bhv", qt * scale, S)
    return o[:, None].to(q.dtype), S
