"""The one interface every token mixer implements, and the batch metadata mixers share.

A token mixer maps `x: [B, T, D]` to `[B, T, D]`, mixing information along T causally. Besides the
math it owns:
- document boundaries of packed sequences (`Segments`): no token attends to, or carries state
  across, a document start;
- a decoding state (KV cache or recurrent state) that is both returned by a forward and accepted
  as the initial state of the next chunk: generation and sequence parallelism use the same path;
- its FLOPs per token, so that MFU counts what each mixer really computes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from lmstack.model.config import ModelConfig


@dataclass
class NoOptions:
    """Options of a mixer that has none."""


def document_starts(doc_ids: torch.Tensor) -> torch.Tensor:
    """doc_ids: [B, T] -> bool [B, T], True where a document starts (every row starts one)."""
    starts = torch.ones_like(doc_ids, dtype=torch.bool)
    starts[:, 1:] = doc_ids[:, 1:] != doc_ids[:, :-1]
    return starts


@dataclass
class Segments:
    """Document boundaries of a packed batch.

    doc_ids:   [B, T] int, non-decreasing along T within a row; tokens with equal ids share a document.
    positions: [B, T] int, each token's index inside its document (rotary embeddings restart at 0).
    """

    doc_ids: torch.Tensor
    positions: torch.Tensor

    @classmethod
    def from_doc_ids(cls, doc_ids: torch.Tensor) -> Segments:
        """doc_ids: [B, T]; a new document starts wherever the id changes."""
        if doc_ids.dim() != 2:
            raise ValueError(f"doc_ids: expected [B, T], got shape {tuple(doc_ids.shape)}")
        B, T = doc_ids.shape
        idx = torch.arange(T, device=doc_ids.device).expand(B, T)
        starts = document_starts(doc_ids)
        start_idx = torch.where(starts, idx, torch.zeros_like(idx)).cummax(dim=1).values
        return cls(doc_ids=doc_ids, positions=idx - start_idx)

    @classmethod
    def from_cu_seqlens(cls, cu_seqlens: torch.Tensor, batch: int, seq_len: int) -> Segments:
        """cu_seqlens: [N+1] cumulative document lengths over the flattened `[B*T]` tokens
        (the varlen convention of flash-attention and fla); documents may not cross rows."""
        ends = cu_seqlens[1:-1].to(torch.long)
        if ((ends % seq_len) == 0).logical_not().logical_and(ends // seq_len != (ends - 1) // seq_len).any():
            raise ValueError("cu_seqlens: a document crosses a row boundary")
        flat = torch.zeros(batch * seq_len, dtype=torch.long, device=cu_seqlens.device)
        flat[ends] = 1
        flat[torch.arange(1, batch, device=flat.device) * seq_len] = 1
        return cls.from_doc_ids(flat.cumsum(0).view(batch, seq_len))

    def cu_seqlens(self) -> torch.Tensor:
        """[N+1] int32 cumulative lengths over the flattened `[B*T]` tokens (every row starts a document)."""
        B, T = self.doc_ids.shape
        starts = self.positions.reshape(-1) == 0
        idx = torch.nonzero(starts).flatten()
        end = torch.tensor([B * T], device=idx.device)
        return torch.cat([idx, end]).to(torch.int32)


class TokenMixer(nn.Module):
    """Base class of all token mixers; subclasses register themselves with `@register("name")`.

    Subclasses set `Options` to a dataclass of their own settings (filled from the config's
    `mixer_options[name]`) and implement `forward` and `flops_per_token`.
    """

    name: ClassVar[str] = ""
    Options: ClassVar[type] = NoOptions

    @classmethod
    def validate_config(cls, config: ModelConfig, prefix: str = "") -> None:
        """Raise ConfigError (naming `prefix` + field) if this mixer cannot run `config`; default: no check."""

    def __init__(self, config: ModelConfig, layer_idx: int, options: Any) -> None:
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.options = options

    def forward(
        self,
        x: torch.Tensor,
        segments: Segments | None = None,
        state: Any | None = None,
        use_cache: bool = False,
    ) -> tuple[torch.Tensor, Any | None]:
        """x: [B, T, D] -> (y: [B, T, D], new_state).

        `state` is the decoding state after the tokens that precede `x` (None: start of sequence).
        `new_state` is the state after `x` when `use_cache` is true, else None. With a state, each
        row is one document (`segments` then describes only `x`).
        """
        raise NotImplementedError

    def flops_per_token(self, seq_len: int) -> float:
        """Forward FLOPs per token (2 per multiply-add) of this mixer, projections included,
        averaged over a causal training sequence of `seq_len` tokens."""
        raise NotImplementedError
