"""`attention`: causal softmax attention with grouped-query heads, RoPE and a KV cache.

Runs on torch SDPA: with neither documents nor cache it takes the `is_causal` path (flash attention
on GPU); packed documents and chunked prefill use an explicit boolean mask.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from lmstack.model.config import ModelConfig
from lmstack.model.mixers import register
from lmstack.model.mixers.base import NoOptions, Segments, TokenMixer
from lmstack.model.rotary import apply_rotary, rotary_cos_sin


@dataclass
class KVState:
    """Keys and values of the tokens seen so far: k, v: [B, S, H_kv, Dh] (after RoPE)."""

    k: torch.Tensor
    v: torch.Tensor

    @property
    def length(self) -> int:
        return self.k.shape[1]


def attention_mask(
    segments: Segments | None, q_len: int, past: int, device: torch.device
) -> torch.Tensor | None:
    """Boolean [B or 1, 1, q_len, past + q_len] mask (True = may attend), or None for plain causal."""
    if segments is None and past == 0:
        return None
    q_idx = torch.arange(q_len, device=device)[:, None] + past
    k_idx = torch.arange(past + q_len, device=device)[None, :]
    mask = (k_idx <= q_idx)[None, None]
    if segments is not None:
        docs = segments.doc_ids
        if past:  # cached tokens belong to the first document of each row
            docs = torch.cat([docs[:, :1].expand(-1, past), docs], dim=1)
        mask = mask & (docs[:, None, past:, None] == docs[:, None, None, :])
    return mask


@register("attention")
class Attention(TokenMixer):
    Options = NoOptions

    def __init__(self, config: ModelConfig, layer_idx: int, options: NoOptions) -> None:
        super().__init__(config, layer_idx, options)
        D, Dh = config.d_model, config.head_dim
        self.n_heads, self.n_kv_heads, self.head_dim = config.n_heads, config.kv_heads, Dh
        self.q_proj = nn.Linear(D, self.n_heads * Dh, bias=False)
        self.k_proj = nn.Linear(D, self.n_kv_heads * Dh, bias=False)
        self.v_proj = nn.Linear(D, self.n_kv_heads * Dh, bias=False)
        self.o_proj = nn.Linear(self.n_heads * Dh, D, bias=False)
        self.o_proj.is_residual_out = True

    def forward(
        self,
        x: torch.Tensor,
        segments: Segments | None = None,
        state: KVState | None = None,
        use_cache: bool = False,
    ) -> tuple[torch.Tensor, KVState | None]:
        B, T, _ = x.shape
        past = state.length if state is not None else 0
        q = self.q_proj(x).view(B, T, self.n_heads, self.head_dim)
        k = self.k_proj(x).view(B, T, self.n_kv_heads, self.head_dim)
        v = self.v_proj(x).view(B, T, self.n_kv_heads, self.head_dim)
        if segments is not None:
            positions = segments.positions + past
        else:
            positions = torch.arange(past, past + T, device=x.device)[None]  # broadcast over the batch
        cos, sin = rotary_cos_sin(positions, self.head_dim, self.config.rope_theta, q.dtype)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        if state is not None:
            k = torch.cat([state.k, k], dim=1)
            v = torch.cat([state.v, v], dim=1)
        new_state = KVState(k, v) if use_cache else None
        mask = attention_mask(segments, T, past, x.device)
        y = F.scaled_dot_product_attention(
            q.transpose(1, 2),
            k.transpose(1, 2),
            v.transpose(1, 2),
            attn_mask=mask,
            is_causal=mask is None and T > 1,
            enable_gqa=self.n_kv_heads != self.n_heads,
        )
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1)), new_state

    def flops_per_token(self, seq_len: int) -> float:
        D, Dh, H, Hkv = self.config.d_model, self.head_dim, self.n_heads, self.n_kv_heads
        projections = 2 * D * (H * Dh + 2 * Hkv * Dh) + 2 * H * Dh * D
        # Causal: token t sees t+1 keys, (T+1)/2 on average; QK^T and PV are 2*Dh FLOPs per key each.
        return projections + 2 * 2 * H * Dh * (seq_len + 1) / 2
