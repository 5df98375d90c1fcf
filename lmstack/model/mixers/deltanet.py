"""`deltanet`: linear attention with the delta rule (DeltaNet, Yang et al. 2024; fla's layer).

    q, k, v = SiLU(conv(x W_q)), SiLU(conv(x W_k)), SiLU(conv(x W_v))     (shared short causal conv)
    q, k    = q / ‖q‖, k / ‖k‖                                             (per head)
    β       = sigmoid(x W_β)  per head           (× 2 with `allow_neg_eigval`: β ∈ (0, 2))
    o       = delta_rule_attn(q, k, v, β)                                   (lmstack_kernels/deltanet/MATH.md)
    y       = W_o (RMSNorm_head(o) [⊙ SiLU(x W_g) with `gate`])

The state update S_t = (I − β_t k_t k_tᵀ) S_{t-1} + β_t k_t v_tᵀ overwrites the value stored under
k_t instead of adding to it; L2-normalised keys keep every transition a contraction (β ≤ 1) or, with
`allow_neg_eigval`, give it the eigenvalue 1 − β ∈ (−1, 1) along k (Grazzi et al. 2024: state
tracking needs negative eigenvalues). The output RMSNorm runs over each head with one weight of size
head_dim shared by the heads (fla's `o_norm`); the op's scale is immaterial after it (up to its eps).

Packed documents restart both the convolution and the recurrent state at each document start.
Decoding keeps per layer the fp32 state [B, H, K, V] plus the convolution's last `conv_size − 1`
inputs: O(1) memory in the sequence length. A chunk of T > 1 tokens with a state continues from it,
so prefill, single-step decoding (the op's recurrent step) and sequence-parallel slices share one path.
Under sequence parallelism (LASP-2) the slice's affine map (P [K, K], E [K, V] per head;
`delta_rule_affine_map`) goes to `context.sequence_parallel`, which returns the state after the
earlier slices.
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
from lmstack.model.mixers.base import (
    BatchContext,
    MixerOutput,
    TokenMixer,
    check_head_dim,
    head_rms_norm,
    run_recurrent,
)
from lmstack.model.short_conv import ConvState, ShortConvolution
from lmstack_kernels.common.chunked import trailing_tokens
from lmstack_kernels.deltanet import (
    MAX_HEAD_DIM,
    MIN_HEAD_DIM,
    TRITON_CHUNK,
    delta_rule_affine_map,
    delta_rule_attn,
)


@dataclass
class DeltaNetOptions:
    conv_size: int = 4  # kernel of the short causal convolution on q, k and v
    allow_neg_eigval: bool = False  # β = 2·sigmoid(·) ∈ (0, 2) instead of sigmoid(·) ∈ (0, 1)
    gate: bool = False  # multiply the normalised output by SiLU(x W_g)
    # "auto": Triton on CUDA, the chunked PyTorch path elsewhere.
    backend: Literal["auto", "triton", "torch"] = "auto"

    def validate(self, prefix: str = "") -> None:
        if self.conv_size < 1:
            raise ConfigError(f"{prefix}conv_size: expected a positive integer, got {self.conv_size}")


@dataclass
class DeltaNetState:
    """After the tokens seen so far: the recurrent state [B, H, K, V] fp32 and the convolution's
    window over the concatenated q, k, v inputs."""

    recurrent: torch.Tensor
    conv: ConvState


@register("deltanet")
class DeltaNet(TokenMixer):
    Options = DeltaNetOptions
    supports_sequence_parallel = True
    gate_parameters = ("beta_proj",)  # the write strength β_t

    @classmethod
    def validate_config(cls, config: ModelConfig, options: DeltaNetOptions, paths: LayerPaths) -> None:
        check_head_dim("deltanet", config, paths, MIN_HEAD_DIM, MAX_HEAD_DIM)

    def __init__(self, config: ModelConfig, layer_idx: int, options: DeltaNetOptions) -> None:
        super().__init__(config, layer_idx, options)
        self.validate_config(config, options, config.layer_paths(layer_idx))
        D, H, Dh = config.d_model, config.n_heads, config.head_dim
        self.n_heads, self.head_dim = H, Dh
        self.qkv_proj = nn.Linear(D, 3 * H * Dh, bias=False)
        self.conv = ShortConvolution(
            3 * H * Dh, options.conv_size, layer_idx=layer_idx, bias=False, activation="silu"
        )
        self.beta_proj = nn.Linear(D, H, bias=False)
        self.g_proj = nn.Linear(D, H * Dh, bias=False) if options.gate else None
        self.norm_weight = nn.Parameter(torch.ones(Dh))
        self.o_proj = nn.Linear(H * Dh, D, bias=False)
        self.o_proj.is_residual_out = True

    @torch.no_grad()
    def reset_parameters(self) -> None:
        self.conv.reset_parameters()
        nn.init.ones_(self.norm_weight)

    def forward(
        self,
        x: torch.Tensor,
        context: BatchContext,
        state: DeltaNetState | None = None,
        use_cache: bool = False,
    ) -> MixerOutput:
        B, T, _ = x.shape
        H, Dh = self.n_heads, self.head_dim
        qkv, conv_state = self.conv(
            self.qkv_proj(x), context, state.conv if state is not None else None, use_cache
        )
        q, k, v = (t.reshape(B, T, H, Dh) for t in qkv.chunk(3, dim=-1))
        q, k = F.normalize(q, dim=-1, eps=1e-6), F.normalize(k, dim=-1, eps=1e-6)
        beta = torch.sigmoid(self.beta_proj(x))
        if self.options.allow_neg_eigval:
            beta = 2 * beta

        def slice_map(lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            # The map of each row's last document: β = 0 makes a token the identity, so zeroing β
            # before that document leaves exactly its map (one op call over dense rows).
            in_last = trailing_tokens(T, lengths, x.device)  # [B, T]
            return delta_rule_affine_map(k, v, beta * in_last[..., None])

        o, ht = run_recurrent(
            delta_rule_attn, (q, k, v, beta), state.recurrent if state is not None else None, context,
            self.layer_idx, slice_map, use_cache, backend=self.options.backend,
        )  # fmt: skip
        gate = F.silu(self.g_proj(x)) if self.g_proj is not None else None
        y = self.o_proj(head_rms_norm(o, self.norm_weight, self.config.norm_eps, gate))
        return MixerOutput(y, DeltaNetState(ht, conv_state) if use_cache else None)

    def flops_per_token(self, seq_len: int) -> float:
        """Projections (q, k, v, β and the optional gate in; o out), the convolution, and per head and
        token the Triton kernels' block products (C = min(32, T), K = V = Dh; masked entries
        counted): K Kᵀ, Q Kᵀ, W = T βK, U⁰ = T βV, tril(Q Kᵀ) U (2·C·Dh each), W S, Q S, Kᵀ U
        (2·Dh² each), and the UT transform's ⌈log2 C⌉ doubling steps of two C×C products
        (4·C² each). Norms, activations and β are O(Dh) and not counted."""
        D, H, Dh = self.config.d_model, self.n_heads, self.head_dim
        C = min(TRITON_CHUNK, max(1, seq_len))
        steps = math.ceil(math.log2(C)) if C > 1 else 0
        inner = 2 * D * (3 * H * Dh + H + (H * Dh if self.g_proj is not None else 0))
        projections = inner + 2 * H * Dh * D
        op = 5 * 2 * C * Dh + 3 * 2 * Dh * Dh + steps * 4 * C * C
        return projections + self.conv.flops_per_token() + H * op
