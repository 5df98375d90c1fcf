"""`moh`: Mixture-of-Head attention (MoH, Jin et al. 2024): attention heads as experts, weighted per token.

The first `shared_heads` heads are always on; of the `routed_heads = n_heads - shared_heads` others a
router picks the top `top_k` per token. With h_s shared and h_r routed heads and the block input x_t,
the paper's two-stage weights are

    [α₁, α₂] = softmax(W_h x_t)                                  (the split between the two groups)
    g_i = α₁ · softmax(W_s x_t)_i                                 i a shared head
    g_i = α₂ · softmax(W_r x_t)_i   if i is among the top_k of W_r x_t, else 0      i a routed head
    y_t = W_o · concat_i(g_i · head_i(t))                         (= Σ_i g_i · head_i W_o^i)

The routed softmax is over all routed heads and not renormalised after the top-k. Heads, GQA, RoPE,
packed documents, the KV cache and the kernels are `attention`'s (inherited).

Load balancing (an auxiliary loss, `moh_balance`, default coefficient 0.01 as in the paper), over the
T tokens of the micro-batch, for the routed heads only:

    L_b = Σ_i f_i · P_i,   f_i = (1/T) Σ_t 1[token t picked head i],   P_i = (1/T) Σ_t softmax(W_r x_t)_i

(f is a count, without gradient; the gradient reaches the router through P. Under sequence
parallelism f and P are averaged over the group's slices: the statistics of the whole rows.) Two statistics are
logged per layer: `moh_active_heads`, the fraction of heads with a non-zero weight (averaged over
tokens; (h_s + top_k) / n_heads by construction), and `moh_max_load`, the busiest routed head's f_i
over the even share top_k / h_r (1: balanced; h_r / top_k: one head gets every token).

Differences from the public code (github.com/SkyworkAI/MoH), which we do not follow:
- its ViT/DiT router multiplies the routed gates by top_k and the shared gates by the number of
  shared heads; here the weights are the paper's (they sum to 1 over a token's active heads);
- its LLaMA-3 variant has a parameter-free router on query norms, binary head masks and no
  balancing loss, and still computes every head.
Defaults: half of the heads shared, top_k = half of the routed heads (75 % of the heads active).

Cost: this implementation computes every head and zeroes the unrouted ones, so it saves no FLOPs and
`flops_per_token` counts all heads (plus the router). Skipping unrouted heads needs a kernel that
gathers (token, head) pairs; it has not been built or measured (no GPU was available).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import nn

from lmstack.errors import ConfigError
from lmstack.model.config import LayerPaths, ModelConfig
from lmstack.model.mixers import register
from lmstack.model.mixers.attention import Attention, AttentionOptions
from lmstack.model.mixers.base import BatchContext


@dataclass
class MoHOptions(AttentionOptions):
    # Heads always on (the first ones); null: half of n_heads.
    shared_heads: int | None = None
    # Routed heads each token uses; null: half of the routed heads (at least 1).
    top_k: int | None = None


class HeadRouting(NamedTuple):
    """weights: [B, T, H] (zero for unrouted heads); probs: [B, T, h_r] routed softmax; picked:
    [B, T, h_r] bool, the routed heads each token uses."""

    weights: torch.Tensor
    probs: torch.Tensor
    picked: torch.Tensor


def head_split(config: ModelConfig, options: MoHOptions) -> tuple[int, int, int]:
    """(shared heads, routed heads, top_k) of a layer, defaults filled in."""
    H = config.n_heads
    shared = H // 2 if options.shared_heads is None else options.shared_heads
    routed = H - shared
    top_k = max(1, routed // 2) if options.top_k is None else options.top_k
    return shared, routed, top_k


@register("moh")
class MixtureOfHeadAttention(Attention):
    Options = MoHOptions
    gate_parameters = ("router",)  # the head routing gate
    aux_losses = {"moh_balance": 0.01}

    @classmethod
    def validate_config(cls, config: ModelConfig, options: MoHOptions, paths: LayerPaths) -> None:
        H = config.n_heads
        shared, routed, top_k = head_split(config, options)
        if not 1 <= shared <= H - 1:
            raise ConfigError(
                f"{paths.option('shared_heads')}: expected 1 .. n_heads - 1 = {H - 1}, got {shared}"
            )
        if not 1 <= top_k <= routed:
            raise ConfigError(
                f"{paths.option('top_k')}: expected 1 .. {routed} (the routed heads), got {top_k}"
            )

    def __init__(self, config: ModelConfig, layer_idx: int, options: MoHOptions) -> None:
        super().__init__(config, layer_idx, options)
        self.validate_config(config, options, config.layer_paths(layer_idx))
        self.shared, self.routed, self.top_k = head_split(config, options)
        # One matrix for W_s, W_r and W_h (shared logits, routed logits, the two group logits).
        self.router = nn.Linear(config.d_model, self.shared + self.routed + 2, bias=False)

    def route(self, x: torch.Tensor) -> HeadRouting:
        """x: [B, T, D] -> the head weights g of the module docstring (computed in fp32)."""
        shared, routed, groups = self.router(x).float().split([self.shared, self.routed, 2], dim=-1)
        alpha = groups.softmax(-1)
        probs = routed.softmax(-1)
        top = probs.topk(self.top_k, dim=-1).indices
        picked = torch.zeros_like(probs, dtype=torch.bool).scatter_(-1, top, True)
        weights = torch.cat([alpha[..., :1] * shared.softmax(-1), alpha[..., 1:] * probs * picked], dim=-1)
        return HeadRouting(weights, probs, picked)

    def _combine_heads(
        self, heads: torch.Tensor, x: torch.Tensor, context: BatchContext
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Heads weighted by g, then o_proj; aux: the balance loss and the two statistics."""
        routing = self.route(x)
        y = self.o_proj((heads * routing.weights.to(heads.dtype)[..., None]).flatten(2))
        load = routing.picked.flatten(0, 1).float().mean(0)  # f_i
        mean_probs = routing.probs.flatten(0, 1).mean(0)  # P_i
        if context.sequence_parallel is not None:  # over the whole rows, not this rank's slice
            load, mean_probs = context.sequence_parallel.mean(
                torch.stack([load, mean_probs]), self.layer_idx
            ).unbind(0)
        with torch.no_grad():
            aux_stats = {
                "moh_active_heads": (routing.weights > 0).float().sum(-1).mean() / self.n_heads,
                "moh_max_load": load.max() * self.routed / self.top_k,
            }
        balance = (load * mean_probs).sum()
        return y, {"moh_balance": balance, **aux_stats}

    def flops_per_token(self, seq_len: int) -> float:
        """`attention`'s count for every head (all are computed) plus the router's matrix."""
        return super().flops_per_token(seq_len) + 2 * self.config.d_model * self.router.out_features
