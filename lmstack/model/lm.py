"""The decoder-only language model: the whole forward pass is in this file.

    tokens -> embedding -> N x [x + mixer(norm(x)); x + mlp(norm(x))] -> norm -> lm_head -> logits
                                    |  reads the BatchContext (documents, positions, slices)
                                    '-> state (cache), aux (auxiliary losses, statistics)

Initialisation (GPT-2 / Megatron style): every Linear and the embedding ~ N(0, init_std); the
projections that write into the residual stream (marked `is_residual_out`: mixer output, MLP down)
are scaled by 1/sqrt(2 * n_layers) so that the residual variance does not grow with depth; RMSNorm
weights start at 1, biases at 0. Mixers may refine this in `reset_parameters()` (e.g. decay gates).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from lmstack.model.config import ModelConfig
from lmstack.model.mixers import BatchContext, MixerOutput, TokenMixer, get_mixer


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in fp32: bf16 squares lose too much precision.
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype) * self.weight


class SwiGLU(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden, bias=False)
        self.up_proj = nn.Linear(dim, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, dim, bias=False)
        self.down_proj.is_residual_out = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    """x + mixer(norm(x)), then x + mlp(norm(x)). With `recompute` set (activation checkpointing) a
    training forward keeps only the block's input and recomputes the rest during backward."""

    def __init__(self, config: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        self.recompute = False
        name = config.mixer_for_layer(layer_idx)
        self.mixer_norm = RMSNorm(config.d_model, config.norm_eps)
        self.mixer: TokenMixer = get_mixer(name)(config, layer_idx, config.layer_options(layer_idx))
        self.mlp_norm = RMSNorm(config.d_model, config.norm_eps)
        self.mlp = SwiGLU(config.d_model, config.ffn_hidden)

    def forward(
        self, x: torch.Tensor, context: BatchContext, state: Any, use_cache: bool
    ) -> tuple[torch.Tensor, Any, dict[str, torch.Tensor]]:
        if self.recompute and torch.is_grad_enabled() and not use_cache:
            # The block's aux losses are outputs of the checkpointed call: counted once, not again
            # when the backward pass recomputes the block.
            return checkpoint(self._forward, x, context, state, use_cache, use_reentrant=False)
        return self._forward(x, context, state, use_cache)

    def _forward(
        self, x: torch.Tensor, context: BatchContext, state: Any, use_cache: bool
    ) -> tuple[torch.Tensor, Any, dict[str, torch.Tensor]]:
        mixed: MixerOutput = self.mixer(self.mixer_norm(x), context, state, use_cache)
        x = x + mixed.y
        return x + self.mlp(self.mlp_norm(x)), mixed.state, mixed.aux


class LMOutput(NamedTuple):
    """logits: [B, T, V] (or final hidden states [B, T, D]); cache: LMCache or None;
    aux: the mixers' auxiliary losses and statistics as `{"<name>/layer<i>": scalar}`."""

    logits: torch.Tensor
    cache: LMCache | None
    aux: dict[str, torch.Tensor]


@dataclass
class LMCache:
    """Decoding state of every layer plus the number of tokens (columns) already consumed.

    pads: [B] int64 on the host, or None: left-padding tokens at the start of each row (a batch of
    prompts of different lengths). The pads were a document of their own, so every returned state
    ignores them; a row's position is then `seen_tokens - pads[b]`, which is what the next calls
    continue from (attention's document rule hides the cached pad keys)."""

    states: list[Any] = field(default_factory=list)
    seen_tokens: int = 0
    pads: torch.Tensor | None = None


class LM(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.embed = nn.Embedding(config.vocab_size, config.d_model)
        self.blocks = nn.ModuleList(Block(config, i) for i in range(config.n_layers))
        self.norm = RMSNorm(config.d_model, config.norm_eps)
        self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.embed.weight
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        std, residual_std = self.config.init_std, self.config.init_std / math.sqrt(2 * self.config.n_layers)
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.normal_(
                    module.weight, 0.0, residual_std if getattr(module, "is_residual_out", False) else std
                )
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Embedding):
                nn.init.normal_(module.weight, 0.0, std)
            elif isinstance(module, RMSNorm):
                nn.init.ones_(module.weight)
        for block in self.blocks:
            if hasattr(block.mixer, "reset_parameters"):
                block.mixer.reset_parameters()

    def forward(
        self,
        input_ids: torch.Tensor,
        context: BatchContext | None = None,
        cache: LMCache | None = None,
        use_cache: bool = False,
        return_hidden: bool = False,
    ) -> LMOutput:
        """input_ids: [B, T] -> LMOutput(logits [B, T, V] (or hidden states [B, T, D]), cache, aux).

        `context` describes packed documents and slices (built once per batch on the host); without
        one, every row is one document that continues `cache` (after `cache.seen_tokens` tokens, less
        the row's `cache.pads`). The returned cache keeps the incoming `pads`.
        """
        B, T = input_ids.shape
        seen = cache.seen_tokens if cache is not None else 0
        if context is not None and context.sequence_parallel is not None and cache is not None:
            raise ValueError("cache: a sequence-parallel slice takes its state from the group, not a cache")
        pads = cache.pads if cache is not None else None
        if context is None and pads is not None:
            zeros = torch.zeros(B, T, dtype=torch.long)
            context = BatchContext.from_doc_ids(zeros, input_ids.device, offsets=seen - pads)
        elif context is None:
            context = BatchContext.for_rows(B, T, input_ids.device, offset=seen)
        x = self.embed(input_ids)
        states = cache.states if cache is not None and cache.states else [None] * len(self.blocks)
        new_states, aux = [], {}
        for i, (block, state) in enumerate(zip(self.blocks, states)):
            x, state, layer_aux = block(x, context, state, use_cache)
            new_states.append(state)
            aux.update({f"{name}/layer{i}": value for name, value in layer_aux.items()})
        x = self.norm(x)
        new_cache = LMCache(new_states, seen + T, pads) if use_cache else None
        return LMOutput(x if return_hidden else self.lm_head(x), new_cache, aux)

    def num_params(self, non_embedding: bool = True) -> int:
        n = sum(p.numel() for p in self.parameters())
        return n - self.embed.weight.numel() if non_embedding else n

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token (forward + backward = 3 x forward): each mixer's own count, the
        MLPs and the LM head. Embedding lookups and norms are negligible and not counted."""
        D, F_ = self.config.d_model, self.config.ffn_hidden
        forward = 2 * D * self.config.vocab_size
        for block in self.blocks:
            forward += block.mixer.flops_per_token(seq_len) + 2 * 3 * D * F_
        return 3 * forward
