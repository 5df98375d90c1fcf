"""The chunk layout and the across-chunk state recurrence of the chunked PyTorch paths.

Every chunked linear-attention op splits T into chunks of C tokens, does the work inside a chunk as
matrix multiplies and carries a state S [K, V] from chunk to chunk:

    S_0 = initial state,   S_{n+1} = diag(d_n) S_n + U_n      (d_n: the chunk's decay per key row)

`scan_states` runs that recurrence as one autograd node: a Python loop of one fused op per chunk
forward and one per chunk backward, writing into preallocated contiguous buffers. (Run through
autograd op by op, each `U[:, :, n]` read costs a full-size zero gradient in backward and each step
adds graph nodes, so the backward grows faster than T.)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def pow2(n: int) -> int:
    """The smallest power of two ≥ n (1 for n ≤ 1)."""
    return 1 << max(0, n - 1).bit_length()


def trailing_tokens(T: int, lengths: torch.Tensor, device: torch.device) -> torch.Tensor:
    """[B, T] bool: token s of row b is among the row's last `lengths[b]` tokens (a slice's last
    document, which its summary for sequence parallelism covers)."""
    back = torch.arange(T - 1, -1, -1, device=device)  # T-1-s
    return back[None, :] < lengths.to(device)[:, None]


def to_chunks(x: torch.Tensor, n_chunks: int, C: int) -> torch.Tensor:
    """[B, T, H, D] -> [B, H, n_chunks, C, D] in fp32, zero-padded at the end to n_chunks * C tokens."""
    B, T, H, D = x.shape
    x = F.pad(x.float(), (0, 0, 0, 0, 0, n_chunks * C - T))
    return x.view(B, n_chunks, C, H, D).permute(0, 3, 1, 2, 4)


def from_chunks(o: torch.Tensor, T: int) -> torch.Tensor:
    """[B, H, n_chunks, C, V] -> [B, T, H, V] (the padding dropped)."""
    B, H, n, C, V = o.shape
    return o.permute(0, 2, 3, 1, 4).reshape(B, n * C, H, V)[:, :T]


class _StateScan(torch.autograd.Function):
    @staticmethod
    def forward(ctx, increments, decays, initial):
        n = increments.shape[0]
        states = increments.new_empty(n + 1, *increments.shape[1:])
        states[0] = initial
        for i in range(n):
            torch.addcmul(increments[i], states[i], decays[i].unsqueeze(-1), out=states[i + 1])
        ctx.save_for_backward(decays, states)
        return states

    @staticmethod
    def backward(ctx, d_states):
        decays, states = ctx.saved_tensors
        n = states.shape[0] - 1
        d_states = d_states.contiguous()
        # d_incr[i] = ∂L/∂S_{i+1} (all uses of S_{i+1}): the gradient of increment i.
        d_incr = torch.empty_like(d_states[1:])
        d_incr[n - 1] = d_states[n]
        for i in range(n - 1, 0, -1):
            torch.addcmul(d_states[i], d_incr[i], decays[i].unsqueeze(-1), out=d_incr[i - 1])
        d_initial = torch.addcmul(d_states[0], d_incr[0], decays[0].unsqueeze(-1))
        d_decays = None
        if ctx.needs_input_grad[1]:
            d_decays = (d_incr * states[:-1]).sum(-1).sum_to_size(decays.shape)
        return d_incr, d_decays, d_initial


def scan_states(increments: torch.Tensor, decays: torch.Tensor, initial: torch.Tensor) -> torch.Tensor:
    """S_0 = initial, S_{i+1} = decays[i] ⊙_rows S_i + increments[i] for i < n.

    increments: [n, B, H, K, V] fp32; decays: [n, B, H, K] or broadcastable to it (e.g. [n, 1, H, 1]);
    initial: [B, H, K, V] fp32. Returns [n + 1, B, H, K, V]: the state entering each chunk, then the
    final state. Differentiable in all three inputs; needs n ≥ 1.
    """
    return _StateScan.apply(increments.contiguous(), decays, initial)
