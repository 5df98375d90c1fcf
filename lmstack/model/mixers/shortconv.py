"""`shortconv`: a short causal depthwise convolution as a whole mixer (Zoology's `ShortConvolution`).

No projections: it is the cheap token-shift layer that lets the next layer see "the previous token"
(the first layer of Zoology's MQAR models). The convolution itself, with packed documents and its
decoding state (`ConvState`: the last `k - 1` inputs), is `lmstack.model.short_conv`, shared with the
mixers that convolve q/k/v.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lmstack.errors import ConfigError
from lmstack.model.config import ModelConfig
from lmstack.model.mixers import register
from lmstack.model.mixers.base import BatchContext, MixerOutput, TokenMixer
from lmstack.model.short_conv import ConvState, ShortConvolution


@dataclass
class ShortConvOptions:
    kernel_size: int = 4
    bias: bool = True

    def validate(self, prefix: str = "") -> None:
        if self.kernel_size < 1:
            raise ConfigError(f"{prefix}kernel_size: expected a positive integer, got {self.kernel_size}")


@register("shortconv")
class ShortConv(TokenMixer):
    Options = ShortConvOptions
    supports_sequence_parallel = True

    def __init__(self, config: ModelConfig, layer_idx: int, options: ShortConvOptions) -> None:
        super().__init__(config, layer_idx, options)
        self.conv = ShortConvolution(
            config.d_model, options.kernel_size, layer_idx=layer_idx, bias=options.bias
        )

    @torch.no_grad()
    def reset_parameters(self) -> None:
        self.conv.reset_parameters()

    def forward(
        self,
        x: torch.Tensor,
        context: BatchContext,
        state: ConvState | None = None,
        use_cache: bool = False,
    ) -> MixerOutput:
        return MixerOutput(*self.conv(x, context, state, use_cache))

    def flops_per_token(self, seq_len: int) -> float:
        return self.conv.flops_per_token()
