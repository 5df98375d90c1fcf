"""The one interface every token mixer implements, and the batch context mixers share.

A token mixer maps `x: [B, T, D]` to `[B, T, D]`, mixing information along T causally. Besides the
math it owns:
- packed documents, read from the `BatchContext` built once per batch: no token attends to, or
  carries state across, a document start;
- a state (KV cache, recurrent state, convolution window) that a forward returns and the next
  forward takes as its initial state: decoding, chunked prefill and sequence slices use one path;
- optional auxiliary losses and logged statistics (`MixerOutput.aux`);
- its FLOPs per token, so that MFU counts what each mixer really computes.
The page for mixer authors is docs/mixers.md.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar, NamedTuple

import torch
from torch import nn

from lmstack.errors import ConfigError
from lmstack.model.config import LayerPaths, ModelConfig


@dataclass
class NoOptions:
    """Options of a mixer that has none."""


@dataclass
class BatchContext:
    """Document structure of a batch of token rows `[B, T]`, built once on the host; mixers only read it.

    A row may be a slice of longer sequences (a sequence-parallel rank's slice, a prefill chunk, a
    decoding step): its first document then *continues* a document that began before the slice, at a
    global position offset, and that document's state comes in as the mixer's `state`.

    positions:      [B, T] int64 (device): each token's position inside its document, counted from
                    the document's real start (continuing rows add their offset). Two tokens t ≥ s of a
                    row share a document exactly when `t - s <= positions[b, t]`.
    cu_seqlens:     [N+1] int32 (device): boundaries of the N row pieces of documents over the
                    flattened `[B*T]` tokens (every row starts a piece; the varlen convention of
                    flash-attention and fla). `cu_seqlens_host` is the same as a tuple.
    max_seqlen:     the longest piece.
    packed:         some row holds more than one piece (else `cu_seqlens` is just the row bounds).
    continues:      [B] bool (device): the row's first piece continues a document from before the slice
                    (its incoming state applies); `continues_host` is the same as a tuple.
    first_piece, last_piece: [B] int64 (device): index in `cu_seqlens` of each row's first / last piece.
    sequence_parallel: the rank's sequence-parallel group (`lmstack.parallel.SequenceParallel`) when
                    the rows are one rank's slices of longer rows split over a group, else None. A
                    mixer that supports it takes what it needs from the earlier slices through it.
    """

    batch: int
    seq_len: int
    positions: torch.Tensor
    cu_seqlens: torch.Tensor
    cu_seqlens_host: tuple[int, ...]
    max_seqlen: int
    packed: bool
    continues: torch.Tensor
    continues_host: tuple[bool, ...]
    first_piece: torch.Tensor
    last_piece: torch.Tensor
    # Per-batch structures derived from the fields above and shared by all layers (e.g. an attention
    # block mask): built on first use by `memo`, never by a mixer for itself.
    _memo: dict[Any, Any] = field(default_factory=dict, repr=False, compare=False)
    sequence_parallel: Any = field(default=None, repr=False, compare=False)

    @classmethod
    def from_doc_ids(
        cls,
        doc_ids: torch.Tensor,
        device: torch.device | str | None = None,
        offsets: torch.Tensor | list[int] | None = None,
    ) -> BatchContext:
        """doc_ids: [B, T] int, non-decreasing along each row (a new document wherever it changes).
        offsets: [B] global position of each row's first token inside its document; a row with a
        positive offset continues that document (default: no row continues). Runs on the host:
        `doc_ids` is moved to the CPU (free for the trainer's reader batches, which live there)."""
        if doc_ids.dim() != 2:
            raise ValueError(f"doc_ids: expected [B, T], got shape {tuple(doc_ids.shape)}")
        doc_ids = doc_ids.detach().cpu()
        B, T = doc_ids.shape
        device = torch.device(device) if device is not None else torch.device("cpu")
        starts = torch.ones(B, T, dtype=torch.bool)
        starts[:, 1:] = doc_ids[:, 1:] != doc_ids[:, :-1]
        idx = torch.arange(T).expand(B, T)
        local = idx - torch.where(starts, idx, torch.zeros_like(idx)).cummax(dim=1).values
        offsets = torch.zeros(B, dtype=torch.long) if offsets is None else torch.as_tensor(offsets).long()
        if offsets.shape != (B,) or bool((offsets < 0).any()):
            raise ValueError(f"offsets: expected {B} non-negative positions, got {offsets.tolist()}")
        first_piece_tokens = (local == idx).long()  # tokens of each row's first piece
        positions = local + first_piece_tokens * offsets[:, None]
        flat_starts = torch.nonzero(starts.reshape(-1)).flatten()
        cu = torch.cat([flat_starts, torch.tensor([B * T])]).to(torch.int32)
        per_row = starts.sum(1)
        first = torch.cumsum(per_row, 0) - per_row
        continues = offsets > 0
        to = lambda t: t.to(device, non_blocking=True)
        return cls(
            batch=B,
            seq_len=T,
            positions=to(positions),
            cu_seqlens=to(cu),
            cu_seqlens_host=tuple(cu.tolist()),
            max_seqlen=int((cu[1:] - cu[:-1]).max()) if T else 0,
            packed=bool(int(per_row.max()) > 1) if T else False,
            continues=to(continues),
            continues_host=tuple(continues.tolist()),
            first_piece=to(first),
            last_piece=to(first + per_row - 1),
        )

    @classmethod
    def for_slice(
        cls, doc_ids: torch.Tensor, start: int, end: int, device: torch.device | str | None = None
    ) -> BatchContext:
        """The context of columns [start, end) of full rows `doc_ids: [B, T_full]`: rows whose
        document runs across `start` continue it (sequence slices, chunked prefill)."""
        doc_ids = doc_ids.detach().cpu()
        full = cls.from_doc_ids(doc_ids[:, :end])
        return cls.from_doc_ids(doc_ids[:, start:end], device, offsets=full.positions[:, start])

    @classmethod
    def from_cu_seqlens(
        cls, cu_seqlens: torch.Tensor, batch: int, seq_len: int, device: torch.device | str | None = None
    ) -> BatchContext:
        """cu_seqlens: [N+1] cumulative document lengths over the flattened `[B*T]` tokens; every row
        start (a multiple of `seq_len`) must be a document boundary: documents may not cross rows."""
        cu = cu_seqlens.detach().cpu().long()
        bounds = set(cu.tolist())
        if cu[0] != 0 or cu[-1] != batch * seq_len or bool((cu[1:] < cu[:-1]).any()):
            raise ValueError(f"cu_seqlens: must rise from 0 to B*T = {batch * seq_len}, got {cu.tolist()}")
        crossing = [r * seq_len for r in range(1, batch) if r * seq_len not in bounds]
        if crossing:
            raise ValueError(
                f"cu_seqlens: a document crosses the row boundary at token {crossing[0]} "
                f"(rows of {seq_len} tokens); split it there"
            )
        flat = torch.zeros(batch * seq_len, dtype=torch.long)
        flat[cu[1:-1]] = 1
        return cls.from_doc_ids(flat.cumsum(0).view(batch, seq_len), device)

    @classmethod
    def for_rows(
        cls, batch: int, seq_len: int, device: torch.device | str | None = None, offset: int = 0
    ) -> BatchContext:
        """Every row one document, starting `offset` tokens into it (decoding after `offset` tokens)."""
        return cls.from_doc_ids(torch.zeros(batch, seq_len, dtype=torch.long), device, [offset] * batch)

    def last_document_lengths(self) -> torch.Tensor:
        """[B] int64 (device): how many trailing tokens of each row belong to its last document (what a
        linear mixer's slice summary covers under sequence parallelism)."""
        return (self.positions[:, -1] + 1).clamp(max=self.seq_len)

    def memo(self, key: Any, build: Callable[[], Any]) -> Any:
        """A structure derived from this batch's documents, built once and shared by all layers."""
        if key not in self._memo:
            self._memo[key] = build()
        return self._memo[key]


def continued_state(state: torch.Tensor | None, context: BatchContext) -> torch.Tensor | None:
    """state: [B, ...] incoming state -> the same with rows that do not continue zeroed (None when
    no row continues). Decided on the host: no device work when all rows continue or none does.
    Under sequence parallelism the state stays on the autograd graph even where no row continues:
    its gradient is part of a collective every rank of the group enters."""
    if state is None or (not any(context.continues_host) and context.sequence_parallel is None):
        return None
    if all(context.continues_host):
        return state
    return state * context.continues.view(-1, *([1] * (state.dim() - 1))).to(state.dtype)


def run_by_pieces(op: Callable, tensors: tuple[torch.Tensor, ...], state, context: BatchContext, **kwargs):
    """Run a state-passing op (`op(*tensors, initial_state=, cu_seqlens=, **kwargs) -> (o, final
    state)`, e.g. `lightning_attn`, `gla_attn`) on `tensors` [B, T, H, *] under the context's
    documents: as dense rows when no row is packed, else as varlen pieces over the flattened batch.
    `state` [B, H, K, V] (from `continued_state`, or None) enters each row's first piece; later pieces
    start from zero. Returns (o [B, T, H, V], the final state of each row's last piece, or None)."""
    if not context.packed:
        return op(*tensors, initial_state=state, **kwargs)
    B, T = tensors[0].shape[:2]
    init = None
    if state is not None:
        init = state.new_zeros(context.cu_seqlens.shape[0] - 1, *state.shape[1:])
        init[context.first_piece] = state
    flat = [t.reshape(1, B * T, *t.shape[2:]) for t in tensors]
    o, final = op(*flat, initial_state=init, cu_seqlens=context.cu_seqlens, **kwargs)
    return o.view(B, T, *o.shape[2:]), (None if final is None else final[context.last_piece])


def run_recurrent(
    op: Callable,
    tensors: tuple[torch.Tensor, ...],
    state: torch.Tensor | None,
    context: BatchContext,
    layer: int,
    slice_map: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]],
    use_cache: bool,
    **kwargs,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The state handling of a recurrent mixer (linear attention with a matrix state), in one place.

    op, tensors: as `run_by_pieces` (`op(*tensors, initial_state=, cu_seqlens=,
        output_final_state=, **kwargs) -> (o, final state)`).
    state: [B, H, K, V] the mixer's incoming recurrent state (a cache), or None.
    layer: the mixer's layer index (attributes the sequence-parallel bytes to it).
    slice_map: `lengths [B] -> (A, E)`, the affine map of this slice's last document per row (S_out =
        A S_in + E, A as `lmstack.parallel.apply_transition` takes it; `lengths` its trailing tokens);
        called only under sequence parallelism, where the state entering the slice comes from the
        earlier slices (LASP-2) instead of `state`.
    Returns (o [B, T, H, V], the state after each row's last piece if `use_cache`, else None)."""
    sp = context.sequence_parallel
    if sp is not None:
        transition, own = slice_map(context.last_document_lengths())
        state = sp.initial_state(transition, own, context, layer)
    state = continued_state(state, context)
    return run_by_pieces(op, tensors, state, context, output_final_state=use_cache, **kwargs)


def head_rms_norm(
    o: torch.Tensor, weight: torch.Tensor | None, eps: float, gate: torch.Tensor | None = None
) -> torch.Tensor:
    """The HeadRMSNorm of linear-attention outputs, optionally gated: o [B, T, H, Dh] -> [B, T, H·Dh],
    each head normalised over its Dh channels in fp32 (the sum of many state products spans a wide
    range) and cast back, times `weight` ([Dh] shared by the heads or [H, Dh] per head; None: no
    weight), times `gate` ([B, T, H, Dh] or [B, T, H·Dh], already activated) when given. A norm over
    all heads together (lightning's `srms`) is this with one head of width H·Dh."""
    B, T = o.shape[:2]
    of = o.float()
    out = (of * torch.rsqrt(of.pow(2).mean(-1, keepdim=True) + eps)).to(o.dtype)
    if weight is not None:
        out = out * weight
    if gate is not None:
        out = out * gate.view(out.shape)
    return out.reshape(B, T, -1)


def check_head_dim(mixer: str, config: ModelConfig, paths: LayerPaths, low: int, high: int) -> None:
    """ConfigError naming `model.d_model` unless low <= head_dim <= high (an op's supported range)."""
    Dh = config.head_dim
    if not low <= Dh <= high:
        raise ConfigError(
            f"{paths.model('d_model')}: head_dim = d_model / n_heads = {Dh} is not supported by mixer "
            f"{mixer}; expected {low}..{high} (change model.d_model or model.n_heads)"
        )


class MixerOutput(NamedTuple):
    """What a mixer's forward returns.

    y:     [B, T, D].
    state: the state after the last token of each row (None unless `use_cache`).
    aux:   named scalar tensors. Names the mixer declares in `TokenMixer.aux_losses` are auxiliary
           losses (the trainer adds `coefficient × value` to the loss); any other name is a statistic,
           only logged. Empty for most mixers.
    """

    y: torch.Tensor
    state: Any = None
    aux: dict[str, torch.Tensor] = {}  # shared default: read, never mutated


class TokenMixer(nn.Module):
    """Base class of all token mixers; subclasses register themselves with `@register("name")`.

    Subclasses set `Options` to a dataclass of their own settings (filled per layer from the config)
    and implement `forward` and `flops_per_token`; see docs/mixers.md.
    """

    name: ClassVar[str] = ""
    Options: ClassVar[type] = NoOptions
    # Auxiliary losses this mixer may emit: name -> default coefficient (train.aux_loss_weights overrides).
    aux_losses: ClassVar[dict[str, float]] = {}
    # The mixer takes what its slice needs from earlier slices through `context.sequence_parallel`
    # (lmstack.parallel); mixers that do not are refused for sequence-parallel runs.
    supports_sequence_parallel: ClassVar[bool] = False
    # Names (prefixes) of this mixer's gate parameters: the projections that set how its state forgets
    # or is written. Recipes that exempt gates from weight decay read them (lmstack.eval.mqar).
    gate_parameters: ClassVar[tuple[str, ...]] = ()

    @classmethod
    def validate_config(cls, config: ModelConfig, options: Any, paths: LayerPaths) -> None:
        """Raise ConfigError if this mixer cannot run `config` with this layer's `options`, naming the
        field by `paths.option(key)` (the layer's own entry or `mixer_options.<name>`, whichever sets
        it) or `paths.model(field)`. Default: no check."""

    def __init__(self, config: ModelConfig, layer_idx: int, options: Any) -> None:
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.options = options

    def forward(
        self,
        x: torch.Tensor,
        context: BatchContext,
        state: Any | None = None,
        use_cache: bool = False,
    ) -> MixerOutput:
        """x: [B, T, D] -> MixerOutput(y [B, T, D], state after x if use_cache, aux).

        `state` is this mixer's state after the tokens before `x`, for the document each row's first
        piece continues; it applies only where `context.continues` is true (elsewhere the row starts
        fresh). The returned state belongs to each row's last piece.
        """
        raise NotImplementedError

    def flops_per_token(self, seq_len: int) -> float:
        """Forward FLOPs per token (2 per multiply-add) of this mixer, projections included,
        averaged over a causal training sequence of `seq_len` tokens."""
        raise NotImplementedError
