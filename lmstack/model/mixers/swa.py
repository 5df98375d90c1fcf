"""`swa`: sliding-window attention: softmax attention over the last `window` tokens of the document.

Query t sees key s when `0 <= t - s < window` and `t - s <= positions[t]` (s is in t's document): the
query's own token and its `window - 1` predecessors, flash-attention's `window_size=(window - 1, 0)`.
Everything else is `attention`'s (projections, GQA, RoPE, the mask rule from positions), which this
class inherits; only the kernel and the decoding state differ.

Which kernel runs (cost O(T · window), never a T × T mask once the window is shorter than the keys):
- every key within the window (`past + T <= window`): plain causal attention, `attention`'s paths;
- no cache (or a sequence-parallel slice after the earlier slices' last `window − 1` keys), on CUDA
  (`path: auto`) or `path: flex`: FlexAttention with a sliding-window ∧ document block mask, built
  once per batch and window (`BatchContext.memo`) and shared by all layers, so blocks outside the
  band are skipped;
- otherwise (CPU, a decoding or prefill state, `path: blocked`): `banded_attention`, queries in
  blocks of Q = max(window, 64) tokens, each against its own keys and the `window - 1` before them:
  memory O(T · (Q + window)).

Decoding state: the keys and values (after RoPE) of the last `window - 1` tokens of the row, oldest
first (fewer while fewer tokens were seen): memory independent of the generated length. Their
distances are implied by their slots: the last slot is the token just before the next forward's
first token. The mask rule then also drops cached keys of an earlier document, and every cached key
of a row that does not continue (its positions restart at 0).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F

from lmstack.errors import ConfigError
from lmstack.model.mixers import register
from lmstack.model.mixers.attention import Attention, KVState, document_block_mask, flex_attention
from lmstack.model.mixers.base import BatchContext

MIN_QUERY_BLOCK = 64  # banded_attention's smallest query block: fewer, larger batched products


@dataclass
class SWAOptions:
    # Tokens each query sees, its own included (flash-attention's window_size = (window - 1, 0)).
    window: int = 512
    # Kernel without a cache: "auto" (flex on CUDA, blocked elsewhere), "flex" or "blocked".
    path: Literal["auto", "flex", "blocked"] = "auto"

    def validate(self, prefix: str = "") -> None:
        if self.window < 1:
            raise ConfigError(f"{prefix}window: expected a positive number of tokens, got {self.window}")


def banded_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor, past: int, window: int
) -> torch.Tensor:
    """Causal softmax attention restricted to `0 <= t - s < window` and `t - s <= positions[t]`.

    q: [B, T, H, Dh]; k, v: [B, past + T, H_kv, Dh], the first `past` belonging to the tokens just
    before q's (a decoding state); positions: [B, T] int -> [B, T, H, Dh]. Default scale Dh^-1/2.

    Queries go in blocks of Q tokens; block b sees a band of Q + window - 1 keys, the keys being laid
    out with `window - 1` slots before the first query (zeros where nothing was cached, and masked).
    """
    B, T, H, Dh = q.shape
    W = window
    if past > W - 1:  # keys older than the window can never be seen
        k, v, past = k[:, past - (W - 1) :], v[:, past - (W - 1) :], W - 1
    Q = min(max(W, MIN_QUERY_BLOCK), T)
    n = -(-T // Q)
    tail = n * Q - T
    band = Q + W - 1

    def bands(t: torch.Tensor) -> torch.Tensor:  # [B, past + T, Hkv, Dh] -> [B * n, Hkv, band, Dh]
        t = F.pad(t, (0, 0, 0, 0, W - 1 - past, tail))
        return t.unfold(1, band, Q).permute(0, 1, 2, 4, 3).reshape(B * n, t.shape[2], band, Dh)

    qb = F.pad(q, (0, 0, 0, 0, 0, tail)).view(B, n, Q, H, Dh).transpose(2, 3).reshape(B * n, H, Q, Dh)
    # Query j of a block sits at band slot j + W - 1, so its distance to band key i is j + W - 1 - i.
    j = torch.arange(Q, device=q.device)[:, None]
    i = torch.arange(band, device=q.device)[None, :]
    distance = j + W - 1 - i
    # The first W - 1 - past slots of the layout are padding (no cached key there).
    real = torch.arange(n, device=q.device)[:, None, None] * Q + i >= W - 1 - past  # [n, 1, band]
    pos = F.pad(positions, (0, tail)).view(B, n, Q, 1)  # padded queries: position 0, only themselves
    mask = (distance >= 0) & (distance < W) & (distance <= pos) & real
    y = F.scaled_dot_product_attention(
        qb, bands(k), bands(v), attn_mask=mask.view(B * n, 1, Q, band), enable_gqa=k.shape[2] != H
    )
    return y.view(B, n, H, Q, Dh).transpose(2, 3).reshape(B, n * Q, H, Dh)[:, :T]


@register("swa")
class SlidingWindowAttention(Attention):
    Options = SWAOptions

    def _use_flex(self, x: torch.Tensor) -> bool:
        path = self.options.path
        return path == "flex" or (path == "auto" and x.is_cuda)

    def _kept_state(self, k: torch.Tensor, v: torch.Tensor) -> KVState:
        keep = min(self.options.window - 1, k.shape[1])
        # A copy, so that a long prefill's keys are not kept alive behind a view.
        return KVState(k[:, k.shape[1] - keep :].clone(), v[:, v.shape[1] - keep :].clone())

    def _keys_before(self) -> int:
        return self.options.window - 1

    def _attend(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, context: BatchContext, past: int
    ) -> torch.Tensor:
        W = self.options.window
        if past + q.shape[1] <= W:
            return super()._attend(q, k, v, context, past)
        if self._flex_applies(q, context, past):
            q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
            mask = document_block_mask(context, W, past)
            return flex_attention(q, k, v, mask, self.n_kv_heads != self.n_heads).transpose(1, 2)
        return banded_attention(q, k, v, context.positions, past, W)

    def _mean_keys(self, seq_len: int) -> float:
        """Token t of a causal sequence sees min(t + 1, window) keys. Like `attention`, only the band
        is counted (FlexAttention skips the blocks outside it)."""
        T, W = max(1, seq_len), self.options.window
        full = min(T, W)  # tokens 0 .. full - 1 see t + 1 keys, the others W
        return (full * (full + 1) / 2 + (T - full) * W) / T
