"""`shortconv`: a short causal depthwise convolution (Zoology's `ShortConvolution`).

Each channel d mixes the current and the previous `kernel_size - 1` inputs:

    y[t, d] = bias[d] + sum_{j=0}^{k-1} w[d, j] * x[t - (k-1) + j, d]

No projections: it is the cheap token-shift layer that lets the next layer see "the previous token"
(the first layer of Zoology's MQAR models). Inputs from another document count as zero, so no token
sees across a document start. The decoding state is the last `k - 1` inputs, `[B, k-1, D]`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from lmstack.model.config import ModelConfig
from lmstack.model.mixers import register
from lmstack.model.mixers.base import Segments, TokenMixer


@dataclass
class ShortConvOptions:
    kernel_size: int = 4
    bias: bool = True

    def validate(self, prefix: str = "") -> None:
        from lmstack.errors import ConfigError

        if self.kernel_size < 1:
            raise ConfigError(f"{prefix}kernel_size: expected a positive integer, got {self.kernel_size}")


@dataclass
class ConvState:
    """The last `k - 1` inputs of the current document (zeros before its start): [B, k-1, D]."""

    window: torch.Tensor


@register("shortconv")
class ShortConv(TokenMixer):
    Options = ShortConvOptions

    def __init__(self, config: ModelConfig, layer_idx: int, options: ShortConvOptions) -> None:
        super().__init__(config, layer_idx, options)
        D, k = config.d_model, options.kernel_size
        self.kernel_size = k
        self.weight = nn.Parameter(torch.empty(D, k))
        self.bias = nn.Parameter(torch.empty(D)) if options.bias else None
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        # nn.Conv1d's default init for a depthwise kernel: U(-1/sqrt(k), 1/sqrt(k)).
        bound = 1.0 / self.kernel_size**0.5
        nn.init.uniform_(self.weight, -bound, bound)
        if self.bias is not None:
            nn.init.uniform_(self.bias, -bound, bound)

    def forward(
        self,
        x: torch.Tensor,
        segments: Segments | None = None,
        state: ConvState | None = None,
        use_cache: bool = False,
    ) -> tuple[torch.Tensor, ConvState | None]:
        B, T, D = x.shape
        k = self.kernel_size
        if state is not None:
            prev = state.window.to(x.dtype)
        else:
            prev = x.new_zeros(B, k - 1, D)
        xp = torch.cat([prev, x], dim=1)  # [B, k-1+T, D]; xp[:, t + k-1] = x[:, t]
        weight = self.weight.to(x.dtype)
        if segments is None:
            y = F.conv1d(xp.transpose(1, 2), weight[:, None, :], groups=D).transpose(1, 2)
        else:
            # Document ids of the padded sequence; the window belongs to each row's first document.
            docs = segments.doc_ids
            docs_p = torch.cat([docs[:, :1].expand(B, k - 1), docs], dim=1)
            y = x * weight[:, k - 1]
            for j in range(k - 1):
                same = (docs_p[:, j : j + T] == docs).unsqueeze(-1)
                y = y + torch.where(same, xp[:, j : j + T], 0.0) * weight[:, j]
        if self.bias is not None:
            y = y + self.bias.to(x.dtype)
        new_state = None
        if use_cache:
            window = xp[:, xp.shape[1] - (k - 1) :]
            if segments is not None and k > 1:
                docs_w = docs_p[:, docs_p.shape[1] - (k - 1) :]
                window = torch.where((docs_w == docs[:, -1:]).unsqueeze(-1), window, 0.0)
            new_state = ConvState(window)
        return y, new_state

    def flops_per_token(self, seq_len: int) -> float:
        return 2.0 * self.config.d_model * self.kernel_size
