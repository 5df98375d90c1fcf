"""`gla`: gated linear attention (Yang et al., ICML 2024), the layer of fla's `GatedLinearAttention`.

    q = x W_q, k = x W_k             [B, T, H, K], H·K = expand_k · d_model (default 0.5)
    v = x W_v                        [B, T, H, V], H·V = d_model
    (use_short_conv: q, k, v each through the shared causal short convolution + SiLU)
    g = logsigmoid(x W_gate_down W_gate_up + b) / τ      [B, T, H, K], low rank d_model → 16 → H·K
    o = gla_attn(q, k, v, g)         S_t = diag(e^{g_t}) S_{t-1} + k_t v_tᵀ, o_t = S_tᵀ q_t / √K
    y = W_o (RMSNorm(o) ⊙ swish(x W_r))                  RMSNorm over each head's V, one weight [V]

τ (`gate_logit_normalizer`, 16) keeps the gates close to 1 at initialisation (e^{logsigmoid(0)/16}
≈ 0.96 per token) so memories start long; the gate is computed in fp32 (its sum over many tokens is
what decays the state). The op and its math: `lmstack_kernels/gla/` (MATH.md).

Packed documents restart the state at each document start (the op's `cu_seqlens`, through
`run_by_pieces`). Decoding keeps one fp32 matrix [B, H, K, V] per layer (plus, with the short
convolution, the last `conv_size − 1` inputs of q, k and v): O(1) in the sequence length; a chunk of
T > 1 tokens with a state uses it as the initial state, so prefill, single steps and sequence
slices share one path. Under sequence parallelism (LASP-2) the slice's summary (exp Σ g, E) goes to
`context.sequence_parallel`, which returns the state after the earlier slices.
"""

from __future__ import annotations

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
from lmstack_kernels.gla import MAX_HEAD_DIM, gla_attn, gla_slice_state

CHUNK = 16  # the Triton kernels' chunk length (the GPU training path, which MFU is about)


@dataclass
class GLAOptions:
    expand_k: float = 0.5  # all heads' key dim = expand_k · d_model
    gate_low_rank_dim: int = 16
    gate_logit_normalizer: float = 16.0  # τ in g = logsigmoid(·) / τ
    use_short_conv: bool = False
    conv_size: int = 4
    # "auto": Triton on CUDA, the chunked PyTorch path elsewhere.
    backend: Literal["auto", "triton", "torch"] = "auto"

    def validate(self, prefix: str = "") -> None:
        for name, ok, expected in (
            ("expand_k", self.expand_k > 0, "a positive number"),
            ("gate_low_rank_dim", self.gate_low_rank_dim >= 1, "a positive integer"),
            ("gate_logit_normalizer", self.gate_logit_normalizer > 0, "a positive number"),
            ("conv_size", self.conv_size >= 1, "a positive integer"),
        ):
            if not ok:
                raise ConfigError(f"{prefix}{name}: expected {expected}, got {getattr(self, name)}")


@dataclass
class GLAState:
    """After the tokens seen so far: kv [B, H, K, V] fp32; conv: the short convolutions' states of q,
    k and v (None without `use_short_conv`)."""

    kv: torch.Tensor
    conv: tuple[ConvState, ConvState, ConvState] | None = None


@register("gla")
class GatedLinearAttention(TokenMixer):
    Options = GLAOptions
    supports_sequence_parallel = True
    gate_parameters = ("gate_down", "gate_up")  # the forget gate α_t

    @classmethod
    def validate_config(cls, config: ModelConfig, options: GLAOptions, paths: LayerPaths) -> None:
        H = config.n_heads
        key_dim = config.d_model * options.expand_k
        if key_dim != int(key_dim) or int(key_dim) % H or not 1 <= key_dim // H <= MAX_HEAD_DIM:
            raise ConfigError(
                f"{paths.option('expand_k')}: d_model · expand_k = {key_dim:g} must be a whole "
                f"multiple of n_heads = {H} with at most {MAX_HEAD_DIM} per head"
            )
        if config.head_dim > MAX_HEAD_DIM:
            raise ConfigError(
                f"{paths.model('d_model')}: head_dim = d_model / n_heads = {config.head_dim} is not supported by "
                f"mixer gla; expected at most {MAX_HEAD_DIM} (change model.d_model or model.n_heads)"
            )

    def __init__(self, config: ModelConfig, layer_idx: int, options: GLAOptions) -> None:
        super().__init__(config, layer_idx, options)
        self.validate_config(config, options, config.layer_paths(layer_idx))
        D, H = config.d_model, config.n_heads
        self.n_heads, self.head_k, self.head_v = H, int(D * options.expand_k) // H, config.head_dim
        key_dim, value_dim = H * self.head_k, H * self.head_v
        self.q_proj = nn.Linear(D, key_dim, bias=False)
        self.k_proj = nn.Linear(D, key_dim, bias=False)
        self.v_proj = nn.Linear(D, value_dim, bias=False)
        self.gate_down = nn.Linear(D, options.gate_low_rank_dim, bias=False)
        self.gate_up = nn.Linear(options.gate_low_rank_dim, key_dim, bias=True)
        self.r_proj = nn.Linear(D, value_dim, bias=False)  # the output gate
        self.o_proj = nn.Linear(value_dim, D, bias=False)
        self.o_proj.is_residual_out = True
        self.norm_weight = nn.Parameter(torch.ones(self.head_v))
        self.convs = None
        if options.use_short_conv:
            self.convs = nn.ModuleList(
                ShortConvolution(dim, options.conv_size, layer_idx=layer_idx, bias=False, activation="silu")
                for dim in (key_dim, key_dim, value_dim)
            )

    @torch.no_grad()
    def reset_parameters(self) -> None:
        nn.init.ones_(self.norm_weight)
        if self.convs is not None:
            for conv in self.convs:
                conv.reset_parameters()

    def forward(
        self,
        x: torch.Tensor,
        context: BatchContext,
        state: GLAState | None = None,
        use_cache: bool = False,
    ) -> MixerOutput:
        B, T, _ = x.shape
        H, K, V = self.n_heads, self.head_k, self.head_v
        q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        conv_state = None
        if self.convs is not None:
            before = state.conv if state is not None else (None, None, None)
            outs = [conv(t, context, s, use_cache) for conv, t, s in zip(self.convs, (q, k, v), before)]
            (q, k, v), conv_state = zip(*outs)
        g = F.logsigmoid(self.gate_up(self.gate_down(x)).float()) / self.options.gate_logit_normalizer
        q, k, g = (t.reshape(B, T, H, K) for t in (q, k, g))
        v = v.reshape(B, T, H, V)
        o, ht = run_recurrent(
            gla_attn, (q, k, v, g), state.kv if state is not None else None, context, self.layer_idx,
            lambda lengths: gla_slice_state(k, v, g, lengths), use_cache, backend=self.options.backend,
        )  # fmt: skip
        o = head_rms_norm(o, self.norm_weight, self.config.norm_eps, F.silu(self.r_proj(x)))
        y = self.o_proj(o)
        return MixerOutput(y, GLAState(ht, conv_state) if use_cache else None)

    def flops_per_token(self, seq_len: int) -> float:
        """Projections (q, k, v, the output gate r, the low-rank gate, o), the short convolutions if
        used, and per head what the Triton kernels compute per token with C = min(16, T): the full
        C×C chunk of scores q·k (2·C·K, masked pairs included) and of their products with v
        (2·C·V), q·S (2·K·V) and the state update k vᵀ (2·K·V). Norm, gates and exps are O(K + V)
        per token and not counted."""
        D, H, K, V = self.config.d_model, self.n_heads, self.head_k, self.head_v
        R = self.options.gate_low_rank_dim
        C = min(CHUNK, max(1, seq_len))
        projections = 2 * D * (2 * H * K + 2 * H * V) + 2 * (D * R + R * H * K) + 2 * H * V * D
        conv = sum(c.flops_per_token() for c in self.convs) if self.convs is not None else 0
        return projections + conv + H * (2 * C * K + 2 * C * V + 2 * 2 * K * V)
