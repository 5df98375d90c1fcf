"""The shared short causal depthwise convolution: packed documents and a decoding state.

Each channel d mixes the current and the previous `k - 1` inputs of the same document:

    y[t, d] = bias[d] + Σ_{j=0}^{k-1} w[d, k-1-j] · x[t - j, d]        (terms before the document start: 0)

Used as a whole mixer (`shortconv`) and on q/k/v inside linear-attention mixers (GLA, DeltaNet).
The state is the last `k - 1` inputs of each row's last document, `[B, k-1, D]` (zeros before its
start); a row that continues a document takes its inputs from the incoming state (under sequence
parallelism: the previous ranks' last `k - 1` inputs, gathered).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from lmstack.model.mixers.base import BatchContext


@dataclass
class ConvState:
    """The last `k - 1` inputs of the current document (zeros before its start): [B, k-1, D]."""

    window: torch.Tensor


class ShortConvolution(nn.Module):
    """Depthwise causal convolution over `[B, T, D]` with kernel `kernel_size`, optional bias and
    optional activation (`"silu"` or None), document-aware through the batch context. `layer_idx`:
    the layer of the mixer it belongs to (its sequence-parallel bytes are counted there)."""

    def __init__(
        self, dim: int, kernel_size: int, *, layer_idx: int, bias: bool = True, activation: str | None = None
    ) -> None:
        super().__init__()
        if activation not in (None, "silu"):
            raise ValueError(f"activation: expected None or 'silu', got {activation!r}")
        self.kernel_size, self.activation, self.layer_idx = kernel_size, activation, layer_idx
        self.weight = nn.Parameter(torch.empty(dim, kernel_size))
        self.bias = nn.Parameter(torch.empty(dim)) if bias else None
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        # nn.Conv1d's default init for a depthwise kernel: U(-1/sqrt(k), 1/sqrt(k)).
        bound = 1.0 / self.kernel_size**0.5
        nn.init.uniform_(self.weight, -bound, bound)
        if self.bias is not None:
            nn.init.uniform_(self.bias, -bound, bound)

    def forward(
        self, x: torch.Tensor, context: BatchContext, state: ConvState | None = None, use_cache: bool = False
    ) -> tuple[torch.Tensor, ConvState | None]:
        """x: [B, T, D] -> (y [B, T, D], state after x or None)."""
        B, T, D = x.shape
        k = self.kernel_size
        if context.sequence_parallel is not None:  # the previous ranks' last k - 1 inputs
            state = ConvState(context.sequence_parallel.preceding(x, k - 1, self.layer_idx))
        if state is not None:
            # A row looks back only as far as its first document began: window slot i lies
            # k - 1 - i tokens before the slice (see BatchContext: same document iff distance <= position).
            back = torch.arange(k - 1, 0, -1, device=x.device)
            inside = back[None, :] <= context.positions[:, :1]
            prev = state.window.to(x.dtype) * inside[..., None].to(x.dtype)
        else:
            prev = x.new_zeros(B, k - 1, D)
        xp = torch.cat([prev, x], dim=1)  # [B, k-1+T, D]; xp[:, t + k-1] = x[:, t]
        weight = self.weight.to(x.dtype)
        if not context.packed:
            # On CPU, depthwise conv1d in bf16 takes seconds per call (5 s at B=16, T=256, D=384
            # against 40 ms in fp32, torch 2.13): convolve in fp32 there.
            dtype = x.dtype if x.is_cuda else torch.float32
            y = F.conv1d(xp.transpose(1, 2).to(dtype), weight[:, None, :].to(dtype), groups=D)
            y = y.transpose(1, 2).to(x.dtype)
        else:
            # x[t - j] is in t's document exactly when positions[t] >= j (see BatchContext).
            pos = context.positions[..., None]
            y = x * weight[:, k - 1]
            for j in range(1, k):
                y = y + torch.where(pos >= j, xp[:, k - 1 - j : k - 1 - j + T], 0.0) * weight[:, k - 1 - j]
        if self.bias is not None:
            y = y + self.bias.to(x.dtype)
        if self.activation == "silu":
            y = F.silu(y)
        new_state = None
        if use_cache:
            window = xp[:, xp.shape[1] - (k - 1) :]
            if context.packed and k > 1:
                # Inputs before the start of the row's last document are not part of its window.
                back = torch.arange(k - 2, -1, -1, device=x.device)  # each slot's distance to the last token
                window = torch.where((back[None] <= context.positions[:, -1:])[..., None], window, 0.0)
            new_state = ConvState(window)
        return y, new_state

    def flops_per_token(self) -> float:
        return 2.0 * self.weight.shape[0] * self.kernel_size
