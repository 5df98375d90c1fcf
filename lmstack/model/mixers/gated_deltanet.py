"""`gated_deltanet`: the gated delta rule (Gated DeltaNet, Yang, Kautz, Hatamizadeh 2024; fla's layer).

    q, k = SiLU(conv(x W_q)), SiLU(conv(x W_k))          [B, T, H, K]   (one short causal conv each)
    v    = SiLU(conv(x W_v))                              [B, T, H_v, V]  V = expand_v · K
    q, k = q / ‖q‖, k / ‖k‖                               (per head)
    β    = sigmoid(x W_b)  per value head                 (× 2 with `allow_neg_eigval`: β ∈ (0, 2))
    g    = −exp(A_log) · softplus(x W_a + dt_bias)        log decay per token and value head, ≤ 0
    S_t  = exp(g_t) (I − β_t k_t k_tᵀ) S_{t-1} + β_t k_t v_tᵀ,   o_t = S_tᵀ q_t / √K
    y    = W_o (RMSNorm_head(o) ⊙ SiLU(x W_g))            (`use_gate`; else RMSNorm_head(o) alone)

The delta rule overwrites the value stored under k_t; the data-dependent decay exp(g_t) (Mamba2's
parametrisation: A = exp(A_log) > 0 per head, a softplus step Δ_t = softplus(x W_a + dt_bias))
clears the whole memory when the context switches. Initialisation as the paper's code: A ~ U(0, 16),
Δ log-uniform in [1e-3, 1e-1] (dt_bias = softplus⁻¹(Δ)); both are vectors, which the trainer's
parameter groups leave without weight decay. The output RMSNorm runs over each value head with one
weight of size V shared by the heads (fla's `o_norm`).

Grouped value heads (`num_v_heads` = G · `num_heads`): each q/k head serves G consecutive value
heads (fla's GVA); the state, β and g are per value head: [B, H_v, K, V].

Packed documents restart the convolutions and the state at each document start. Decoding keeps per
layer the fp32 state [B, H_v, K, V] plus each convolution's last `conv_size − 1` inputs: O(1) in the
sequence length; prefill, single steps and sequence-parallel slices share one path
(`run_recurrent`). Under sequence parallelism (LASP-2) the slice's affine map (P [K, K], E [K, V]
per value head, now with the decay) goes to `context.sequence_parallel`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from lmstack.errors import ConfigError
from lmstack.model.config import LayerPaths, ModelConfig
from lmstack.model.mixers import register
from lmstack.model.mixers.base import BatchContext, MixerOutput, TokenMixer, head_rms_norm, run_recurrent
from lmstack.model.short_conv import ConvState, ShortConvolution
from lmstack_kernels.common.chunked import trailing_tokens
from lmstack_kernels.gated_deltanet import (
    MAX_HEAD_DIM,
    MIN_HEAD_DIM,
    TRITON_CHUNK,
    gated_delta_rule_affine_map,
    gated_delta_rule_attn,
)

# The paper's (and Mamba2's) initialisation of the decay: A ~ U(0, 16), Δ log-uniform in [1e-3, 1e-1].
A_INIT_RANGE = (0.0, 16.0)
DT_RANGE, DT_FLOOR = (1e-3, 1e-1), 1e-4


@dataclass
class GatedDeltaNetOptions:
    num_heads: int | None = None  # q/k heads; default model.n_heads
    head_dim: int | None = None  # K per head; default d_model / num_heads
    num_v_heads: int | None = None  # value heads, a multiple of num_heads; default num_heads
    expand_v: float = 2.0  # V = expand_v · head_dim
    use_gate: bool = True  # the output gate SiLU(x W_g)
    allow_neg_eigval: bool = False  # β = 2·sigmoid(·) ∈ (0, 2) instead of sigmoid(·) ∈ (0, 1)
    conv_size: int = 4  # kernel of the short causal convolutions on q, k and v
    # "auto": Triton on CUDA, the chunked PyTorch path elsewhere.
    backend: Literal["auto", "triton", "torch"] = "auto"

    def validate(self, prefix: str = "") -> None:
        for name, value in (
            ("num_heads", self.num_heads),
            ("head_dim", self.head_dim),
            ("num_v_heads", self.num_v_heads),
        ):
            if value is not None and value < 1:
                raise ConfigError(f"{prefix}{name}: expected a positive integer, got {value}")
        if not self.expand_v > 0:
            raise ConfigError(f"{prefix}expand_v: expected a positive number, got {self.expand_v}")
        if self.conv_size < 1:
            raise ConfigError(f"{prefix}conv_size: expected a positive integer, got {self.conv_size}")


@dataclass
class GatedDeltaNetState:
    """After the tokens seen so far: the recurrent state [B, H_v, K, V] fp32 and the windows of the
    q, k and v convolutions."""

    recurrent: torch.Tensor
    conv: tuple[ConvState, ConvState, ConvState]


def _shapes(config: ModelConfig, options: GatedDeltaNetOptions) -> tuple[int, int, int, float]:
    """(H, K, H_v, V) of a layer; V may come out fractional (refused by validate_config)."""
    H = options.num_heads or config.n_heads
    K = options.head_dim or config.d_model // H
    return H, K, options.num_v_heads or H, K * options.expand_v


@register("gated_deltanet")
class GatedDeltaNet(TokenMixer):
    Options = GatedDeltaNetOptions
    supports_sequence_parallel = True
    gate_parameters = ("a_proj", "b_proj", "A_log", "dt_bias")  # the decay g_t and the write strength β_t

    @classmethod
    def validate_config(cls, config: ModelConfig, options: GatedDeltaNetOptions, paths: LayerPaths) -> None:
        H, K, Hv, V = _shapes(config, options)
        if not MIN_HEAD_DIM <= K <= MAX_HEAD_DIM:
            raise ConfigError(
                f"{paths.option('head_dim')}: the key head size is {K}; mixer gated_deltanet supports "
                f"{MIN_HEAD_DIM}..{MAX_HEAD_DIM} (set head_dim, or change num_heads / model.d_model)"
            )
        if int(V) != V or not MIN_HEAD_DIM <= V <= MAX_HEAD_DIM:
            raise ConfigError(
                f"{paths.option('expand_v')}: head_dim · expand_v = {V:g} must be a whole number in "
                f"{MIN_HEAD_DIM}..{MAX_HEAD_DIM}"
            )
        if Hv % H:
            raise ConfigError(
                f"{paths.option('num_v_heads')}: expected a multiple of num_heads = {H}, got {Hv}"
            )

    def __init__(self, config: ModelConfig, layer_idx: int, options: GatedDeltaNetOptions) -> None:
        super().__init__(config, layer_idx, options)
        self.validate_config(config, options, config.layer_paths(layer_idx))
        D = config.d_model
        H, K, Hv, V = _shapes(config, options)
        self.n_heads, self.head_k, self.n_v_heads, self.head_v = H, K, Hv, int(V)
        key_dim, value_dim = H * K, Hv * self.head_v
        self.q_proj = nn.Linear(D, key_dim, bias=False)
        self.k_proj = nn.Linear(D, key_dim, bias=False)
        self.v_proj = nn.Linear(D, value_dim, bias=False)
        conv = lambda dim: ShortConvolution(  # noqa: E731
            dim, options.conv_size, layer_idx=layer_idx, bias=False, activation="silu"
        )
        self.q_conv, self.k_conv, self.v_conv = conv(key_dim), conv(key_dim), conv(value_dim)
        self.a_proj = nn.Linear(D, Hv, bias=False)
        self.b_proj = nn.Linear(D, Hv, bias=False)
        self.A_log = nn.Parameter(torch.empty(Hv))
        self.dt_bias = nn.Parameter(torch.empty(Hv))
        self.g_proj = nn.Linear(D, value_dim, bias=False) if options.use_gate else None
        self.norm_weight = nn.Parameter(torch.ones(self.head_v))
        self.o_proj = nn.Linear(value_dim, D, bias=False)
        self.o_proj.is_residual_out = True
        self._init_decay()

    @torch.no_grad()
    def _init_decay(self) -> None:
        A = torch.empty(self.n_v_heads, dtype=torch.float32).uniform_(*A_INIT_RANGE)
        self.A_log.copy_(torch.log(A))
        lo, hi = (math.log(d) for d in DT_RANGE)
        dt = torch.exp(torch.rand(self.n_v_heads) * (hi - lo) + lo).clamp(min=DT_FLOOR)
        self.dt_bias.copy_(dt + torch.log(-torch.expm1(-dt)))  # softplus⁻¹(Δ)

    @torch.no_grad()
    def reset_parameters(self) -> None:
        for conv in (self.q_conv, self.k_conv, self.v_conv):
            conv.reset_parameters()
        nn.init.ones_(self.norm_weight)
        self._init_decay()

    def forward(
        self,
        x: torch.Tensor,
        context: BatchContext,
        state: GatedDeltaNetState | None = None,
        use_cache: bool = False,
    ) -> MixerOutput:
        B, T, _ = x.shape
        H, K, Hv, V = self.n_heads, self.head_k, self.n_v_heads, self.head_v
        before = state.conv if state is not None else (None, None, None)
        convs = (self.q_conv, self.k_conv, self.v_conv)
        inputs = (self.q_proj(x), self.k_proj(x), self.v_proj(x))
        (q, k, v), conv_state = zip(*(c(t, context, s, use_cache) for c, t, s in zip(convs, inputs, before)))
        q = F.normalize(q.reshape(B, T, H, K), dim=-1, eps=1e-6)
        k = F.normalize(k.reshape(B, T, H, K), dim=-1, eps=1e-6)
        if Hv != H:  # each q/k head serves Hv / H consecutive value heads
            q, k = (t.repeat_interleave(Hv // H, dim=2) for t in (q, k))
        v = v.reshape(B, T, Hv, V)
        beta = torch.sigmoid(self.b_proj(x))
        if self.options.allow_neg_eigval:
            beta = 2 * beta
        # In fp32: the decay's sum over many tokens is what forgets the state.
        g = -self.A_log.float().exp() * F.softplus(self.a_proj(x).float() + self.dt_bias.float())

        def slice_map(lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            # The map of each row's last document: β = 0 and g = 0 make a token the identity, so
            # zeroing both before that document leaves exactly its map.
            in_last = trailing_tokens(T, lengths, x.device)[..., None]  # [B, T, 1]
            return gated_delta_rule_affine_map(k, v, beta * in_last, g * in_last)

        o, ht = run_recurrent(
            gated_delta_rule_attn, (q, k, v, beta, g), state.recurrent if state is not None else None,
            context, self.layer_idx, slice_map, use_cache, backend=self.options.backend,
        )  # fmt: skip
        gate = F.silu(self.g_proj(x)) if self.g_proj is not None else None
        y = self.o_proj(head_rms_norm(o, self.norm_weight, self.config.norm_eps, gate))
        return MixerOutput(y, GatedDeltaNetState(ht, conv_state) if use_cache else None)

    def flops_per_token(self, seq_len: int) -> float:
        """Projections (q, k, v, a, b and the optional gate in; o out), the three convolutions, and
        per value head and token the chunked kernels' block products (C = min(TRITON_CHUNK, T);
        masked entries counted): K Kᵀ, Q Kᵀ, W = T βK (2·C·K each), U⁰ = T βV, tril(Q Kᵀ) U
        (2·C·V each), W S, Q S, Kᵀ U (2·K·V each), and the UT transform's ⌈log2 C⌉ doubling steps of
        two C×C products (4·C² each). Norms, activations, β and the decays are O(K + V), not counted."""
        D, H, K, Hv, V = self.config.d_model, self.n_heads, self.head_k, self.n_v_heads, self.head_v
        C = min(TRITON_CHUNK, max(1, seq_len))
        steps = math.ceil(math.log2(C)) if C > 1 else 0
        inner = 2 * D * (2 * H * K + Hv * V + 2 * Hv + (Hv * V if self.g_proj is not None else 0))
        projections = inner + 2 * Hv * V * D
        convs = sum(c.flops_per_token() for c in (self.q_conv, self.k_conv, self.v_conv))
        op = 3 * 2 * C * K + 2 * 2 * C * V + 3 * 2 * K * V + steps * 4 * C * C
        return projections + convs + Hv * op
