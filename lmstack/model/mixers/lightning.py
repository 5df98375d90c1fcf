"""`lightning`: TransNormerLLM-style linear attention with a constant per-head decay.

    q = act(x W_q), k = act(x W_k), v = x W_v, u = x W_u          (act: SiLU, as TNL)
    o = lightning_attn(q, k, v, decay)                              (see lmstack_kernels/lightning/MATH.md)
    y = W_o (gate(u) ⊙ norm(o))

Decay (chosen convention, written here once): head h of layer l (0-based) of L layers has
    slope_{h,l} = alibi_h · (1 − l/(L−1) + 1e-5)        (L = 1: slope = alibi_h)
    λ_{h,l} = exp(−slope_{h,l}),  i.e. the op's decay = −slope
with alibi_h the ALiBi slopes (2^(-8/H), 2^(-16/H), ...; the interleaved extension when H is not a
power of two). This is TNL's released code (`slope_rate * (1 - idx / (num_layers - 1) + 1e-5)`,
also MiniMax-01's): shallow layers forget fast, the last layer almost not at all. With
`decay_depth_scaling: false` every layer uses the unscaled ALiBi slopes.

Output normalisation: `norm: head` (default) is an RMSNorm over each head with a learned weight,
which keeps heads with long memories from dominating; `norm: srms` is TNL's SimpleRMSNorm (no weight)
over all heads together. Gate: `sigmoid` (default, MiniMax-01), `silu`, or `identity` (u itself, TNL).
The op's scale (head_dim^-1/2) is immaterial after the norm (up to its eps).

Packed documents restart the state at each document start (the op's `cu_seqlens`). Decoding keeps
one fp32 matrix [B, H, K, V] per layer: O(1) memory in the sequence length; a chunk of T > 1
tokens with a state uses it as the initial state, so prefill, single-step decoding and sequence
parallelism share one path. Under sequence parallelism (LASP-2) the slice's summary (λ^T, E) goes
to `context.sequence_parallel`, which returns the state after the earlier slices.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from lmstack.model.config import LayerPaths, ModelConfig
from lmstack.model.mixers import register
from lmstack.model.mixers.base import (
    BatchContext,
    MixerOutput,
    TokenMixer,
    check_head_dim,
    head_rms_norm,
    run_recurrent,
)
from lmstack_kernels.lightning import MAX_HEAD_DIM, MIN_HEAD_DIM, lightning_attn, lightning_slice_state

CHUNK = 64  # the op's block length (Triton BT and the chunked PyTorch path)


@dataclass
class LightningOptions:
    qk_activation: Literal["silu", "identity"] = "silu"
    gate: Literal["sigmoid", "silu", "identity"] = "sigmoid"
    norm: Literal["head", "srms"] = "head"
    decay_depth_scaling: bool = True
    # "auto": Triton on CUDA, the chunked PyTorch path elsewhere.
    backend: Literal["auto", "triton", "torch"] = "auto"


@dataclass
class LightningState:
    """The recurrent state after the tokens seen so far: kv [B, H, K, V] fp32."""

    kv: torch.Tensor


def alibi_slopes(n_heads: int) -> list[float]:
    """ALiBi's per-head slopes (Press et al.): geometric from 2^(-8/n) for n a power of two."""

    def power_of_2(n: int) -> list[float]:
        start = 2 ** (-(2 ** -(math.log2(n) - 3)))
        return [start * start**i for i in range(n)]

    if math.log2(n_heads).is_integer():
        return power_of_2(n_heads)
    closest = 2 ** math.floor(math.log2(n_heads))
    return power_of_2(closest) + alibi_slopes(2 * closest)[0::2][: n_heads - closest]


def decay_slopes(n_heads: int, layer_idx: int, n_layers: int, depth_scaling: bool = True) -> list[float]:
    """slope_{h,l} of the module docstring (the op's decay is the negative)."""
    factor = 1.0
    if depth_scaling and n_layers > 1:
        factor = 1 - layer_idx / (n_layers - 1) + 1e-5
    return [s * factor for s in alibi_slopes(n_heads)]


@register("lightning")
class LightningAttention(TokenMixer):
    Options = LightningOptions
    supports_sequence_parallel = True

    @classmethod
    def validate_config(cls, config: ModelConfig, options: LightningOptions, paths: LayerPaths) -> None:
        check_head_dim("lightning", config, paths, MIN_HEAD_DIM, MAX_HEAD_DIM)

    def __init__(self, config: ModelConfig, layer_idx: int, options: LightningOptions) -> None:
        super().__init__(config, layer_idx, options)
        self.validate_config(config, options, config.layer_paths(layer_idx))
        D, H, Dh = config.d_model, config.n_heads, config.head_dim
        self.n_heads, self.head_dim = H, Dh
        self.q_proj = nn.Linear(D, H * Dh, bias=False)
        self.k_proj = nn.Linear(D, H * Dh, bias=False)
        self.v_proj = nn.Linear(D, H * Dh, bias=False)
        self.u_proj = nn.Linear(D, H * Dh, bias=False)
        self.o_proj = nn.Linear(H * Dh, D, bias=False)
        self.o_proj.is_residual_out = True
        self.norm_weight = nn.Parameter(torch.ones(H * Dh)) if options.norm == "head" else None
        # A constant recomputed from the config: a non-persistent buffer (nothing to load, moves with
        # the module), kept in fp32 whatever the module's dtype (see `_apply`).
        self._log_decay = [
            -s for s in decay_slopes(H, layer_idx, config.n_layers, options.decay_depth_scaling)
        ]
        self.register_buffer("log_decay", torch.tensor(self._log_decay), persistent=False)

    def _apply(self, fn, recurse=True):
        # `.to(bfloat16)` would round the decays (a 0.4% change of λ); refill them in fp32 instead.
        super()._apply(fn, recurse)
        self._buffers["log_decay"] = torch.tensor(self._log_decay, device=self.log_decay.device)
        return self

    @torch.no_grad()
    def reset_parameters(self) -> None:
        if self.norm_weight is not None:
            nn.init.ones_(self.norm_weight)

    def _act(self, x: torch.Tensor) -> torch.Tensor:
        return F.silu(x) if self.options.qk_activation == "silu" else x

    def _norm_gate(self, o: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        """o: [B, T, H, Dh] -> gate(u) * norm(o) as [B, T, H*Dh]."""
        B, T, H, Dh = o.shape
        gate = self.options.gate
        u = torch.sigmoid(u) if gate == "sigmoid" else F.silu(u) if gate == "silu" else u
        if self.options.norm == "srms":  # one norm over all heads
            return head_rms_norm(o.reshape(B, T, 1, H * Dh), None, self.config.norm_eps, u)
        return head_rms_norm(o, self.norm_weight.view(H, Dh), self.config.norm_eps, u)

    def forward(
        self,
        x: torch.Tensor,
        context: BatchContext,
        state: LightningState | None = None,
        use_cache: bool = False,
    ) -> MixerOutput:
        B, T, _ = x.shape
        H, Dh = self.n_heads, self.head_dim
        q = self._act(self.q_proj(x)).view(B, T, H, Dh)
        k = self._act(self.k_proj(x)).view(B, T, H, Dh)
        v = self.v_proj(x).view(B, T, H, Dh)

        def slice_map(lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            decay_T, own = lightning_slice_state(k, v, self.log_decay, lengths)
            return decay_T.expand(B, H), own

        op = functools.partial(lightning_attn, decay=self.log_decay)
        o, ht = run_recurrent(
            op, (q, k, v), state.kv if state is not None else None, context, self.layer_idx,
            slice_map, use_cache, backend=self.options.backend,
        )  # fmt: skip
        y = self.o_proj(self._norm_gate(o, self.u_proj(x)))
        return MixerOutput(y, LightningState(ht) if use_cache else None)

    def flops_per_token(self, seq_len: int) -> float:
        """Projections (q, k, v, u in; o out) plus the chunked algorithm's real work per token and
        head: the full C×C intra-block QKᵀ and PV (2·C·Dh each, C = min(64, T): masked entries are
        computed too), q·S for the inter-block term and k vᵀ for the state update (2·Dh² each).
        Norm, gate and decay scalings are O(Dh) and not counted."""
        D, H, Dh = self.config.d_model, self.n_heads, self.head_dim
        C = min(CHUNK, max(1, seq_len))
        projections = 2 * D * 4 * H * Dh + 2 * H * Dh * D
        return projections + H * (2 * 2 * C * Dh + 2 * 2 * Dh * Dh)
