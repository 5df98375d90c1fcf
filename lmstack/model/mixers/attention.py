"""`attention`: causal softmax attention with grouped-query heads, RoPE and a KV cache.

Which kernel runs:
- one document per row and no cache: SDPA's `is_causal` path (flash attention on a GPU);
- packed documents on CUDA: FlexAttention with a document block mask (built once per batch and
  shared by all layers), so fully masked blocks are skipped (`packed_path: flex`); also a
  sequence-parallel slice after the earlier slices' keys;
- otherwise (CPU, a KV cache, `packed_path: mask`): SDPA with an explicit boolean mask.

Masks come from positions alone: key s may be seen by query t (both counted in the row including
cached tokens) iff `s <= t` and `t - s <= positions[t]`, i.e. s is in t's document. The KV cache of a
row holds the keys of all its tokens; keys from an earlier document are masked the same way.

Sequence parallelism (LASP-2H): the keys and values of the earlier ranks' slices, gathered once per
layer, are this slice's incoming cache; the mask above then applies unchanged (FlexAttention on
CUDA, the explicit mask on CPU).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from lmstack.model.config import ModelConfig
from lmstack.model.mixers import register
from lmstack.model.mixers.base import BatchContext, MixerOutput, TokenMixer
from lmstack.model.rotary import apply_rotary, rotary_cos_sin
from lmstack_kernels.common.compiler import disable_compile


@dataclass
class AttentionOptions:
    # Kernel for packed documents: "auto" (flex on CUDA, mask elsewhere), "flex" or "mask".
    packed_path: Literal["auto", "flex", "mask"] = "auto"


@dataclass
class KVState:
    """Keys and values of the tokens seen so far: k, v: [B, S, H_kv, Dh] (after RoPE)."""

    k: torch.Tensor
    v: torch.Tensor

    @property
    def length(self) -> int:
        return self.k.shape[1]


def attention_mask(context: BatchContext, past: int) -> torch.Tensor:
    """Boolean [B, 1, T, past + T] mask (True = may attend) for queries after `past` cached keys."""
    T = context.seq_len
    device = context.positions.device
    q_idx = torch.arange(T, device=device)[:, None] + past
    k_idx = torch.arange(past + T, device=device)[None, :]
    distance = q_idx - k_idx  # [T, past + T]
    mask = (distance >= 0) & (distance <= context.positions[:, :, None])
    return mask[:, None]


def document_block_mask(context: BatchContext, window: int | None = None, past: int = 0):
    """FlexAttention block mask of `attention_mask(context, past)` (with `window`: also `t - s <
    window`): T queries against `past + T` keys, built once per batch, window and past and shared by
    all layers."""

    def build():
        from torch.nn.attention.flex_attention import create_block_mask

        pos = context.positions

        def same_document(b, h, q, k):
            return (k <= q + past) & (q + past - k <= pos[b, q])

        def in_window(b, h, q, k):
            return same_document(b, h, q, k) & (q + past - k < window)

        T = context.seq_len
        return create_block_mask(
            same_document if window is None else in_window,
            context.batch,
            None,
            T,
            past + T,
            device=pos.device,
            _compile=pos.is_cuda,
        )

    return context.memo(("document_block_mask", window, past), build)


_compiled_flex = None


@disable_compile
def flex_attention(q, k, v, block_mask, enable_gqa: bool) -> torch.Tensor:
    """q: [B, H, T, Dh]; k, v: [B, H_kv, T, Dh]. Compiled once on CUDA (eager flex is a slow reference)."""
    global _compiled_flex
    from torch.nn.attention.flex_attention import flex_attention as flex

    if q.is_cuda and _compiled_flex is None:
        _compiled_flex = torch.compile(flex, dynamic=False)
    fn = _compiled_flex if q.is_cuda else flex
    return fn(q, k, v, block_mask=block_mask, enable_gqa=enable_gqa)


@register("attention")
class Attention(TokenMixer):
    Options = AttentionOptions
    supports_sequence_parallel = True

    def __init__(self, config: ModelConfig, layer_idx: int, options: AttentionOptions) -> None:
        super().__init__(config, layer_idx, options)
        D, Dh = config.d_model, config.head_dim
        self.n_heads, self.n_kv_heads, self.head_dim = config.n_heads, config.kv_heads, Dh
        self.q_proj = nn.Linear(D, self.n_heads * Dh, bias=False)
        self.k_proj = nn.Linear(D, self.n_kv_heads * Dh, bias=False)
        self.v_proj = nn.Linear(D, self.n_kv_heads * Dh, bias=False)
        self.o_proj = nn.Linear(self.n_heads * Dh, D, bias=False)
        self.o_proj.is_residual_out = True

    def _use_flex(self, x: torch.Tensor) -> bool:
        path = self.options.packed_path
        return path == "flex" or (path == "auto" and x.is_cuda)

    def _flex_applies(self, x: torch.Tensor, context: BatchContext, past: int) -> bool:
        """FlexAttention for a whole forward without a cache, or a sequence-parallel slice after the
        earlier slices' keys (one mask per batch); a decoding or prefill cache keeps the mask path."""
        return self._use_flex(x) and (past == 0 or context.sequence_parallel is not None)

    def forward(
        self,
        x: torch.Tensor,
        context: BatchContext,
        state: KVState | None = None,
        use_cache: bool = False,
    ) -> MixerOutput:
        heads, new_state = self._heads(x, context, state, use_cache)
        y, aux = self._combine_heads(heads, x, context)
        return MixerOutput(y, new_state, aux)

    def _combine_heads(
        self, heads: torch.Tensor, x: torch.Tensor, context: BatchContext
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """heads: [B, T, H, Dh], x: [B, T, D] (the mixer's input) -> (y [B, T, D], aux): o_proj of the
        concatenated heads, no aux."""
        return self.o_proj(heads.flatten(2)), {}

    def _heads(
        self, x: torch.Tensor, context: BatchContext, state: KVState | None, use_cache: bool
    ) -> tuple[torch.Tensor, KVState | None]:
        """x: [B, T, D] -> (every head's output [B, T, H, Dh] before o_proj, the KV state after x)."""
        B, T, _ = x.shape
        past = state.length if state is not None else 0
        q = self.q_proj(x).view(B, T, self.n_heads, self.head_dim)
        k = self.k_proj(x).view(B, T, self.n_kv_heads, self.head_dim)
        v = self.v_proj(x).view(B, T, self.n_kv_heads, self.head_dim)
        # Rows that are neither packed nor continuing share their positions: one rotary table for all.
        same_rows = not context.packed and not any(context.continues_host)
        positions = context.positions[:1] if same_rows else context.positions
        cos, sin = rotary_cos_sin(positions, self.head_dim, self.config.rope_theta, q.dtype)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        if context.sequence_parallel is not None:  # LASP-2H: earlier slices' keys/values as a cache
            kv = context.sequence_parallel.preceding(
                torch.cat([k, v], dim=-1), self._keys_before(), self.layer_idx
            )
            state = KVState(*kv.split(self.head_dim, dim=-1))
            past = state.length
        if state is not None:
            k = torch.cat([state.k, k], dim=1)
            v = torch.cat([state.v, v], dim=1)
        new_state = self._kept_state(k, v) if use_cache else None
        return self._attend(q, k, v, context, past), new_state

    def _kept_state(self, k: torch.Tensor, v: torch.Tensor) -> KVState:
        """The KV state to keep after a forward, from all keys/values it saw: all of them."""
        return KVState(k, v)

    def _attend(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, context: BatchContext, past: int
    ) -> torch.Tensor:
        """q: [B, T, H, Dh]; k, v: [B, past + T, H_kv, Dh] (the first `past` from the cache) ->
        [B, T, H, Dh]."""
        T = q.shape[1]
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        gqa = self.n_kv_heads != self.n_heads
        if past == 0 and not context.packed:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=T > 1, enable_gqa=gqa)
        elif self._flex_applies(q, context, past):
            y = flex_attention(q, k, v, document_block_mask(context, past=past), gqa)
        else:
            y = F.scaled_dot_product_attention(
                q, k, v, attn_mask=attention_mask(context, past), enable_gqa=gqa
            )
        return y.transpose(1, 2)

    def _keys_before(self) -> int | None:
        """How many keys before its slice a query may reach (None: all); a windowed variant needs
        fewer, and a sequence-parallel rank then gathers only those."""
        return None

    def flops_per_token(self, seq_len: int) -> float:
        D, Dh, H, Hkv = self.config.d_model, self.head_dim, self.n_heads, self.n_kv_heads
        projections = 2 * D * (H * Dh + 2 * Hkv * Dh) + 2 * H * Dh * D
        # QK^T and PV are 2*Dh FLOPs per key and head each.
        return projections + 2 * 2 * H * Dh * self._mean_keys(seq_len)

    def _mean_keys(self, seq_len: int) -> float:
        """Keys a token sees, averaged over a causal sequence: token t sees t+1, (T+1)/2 on average."""
        return (seq_len + 1) / 2
