"""`lightning_attn`: causal linear attention with a constant per-head decay (Lightning Attention-2).

Public API: `lightning_attn`, and `lightning_slice_state` (a slice's final state from a zero start, for
sequence parallelism). Files: `naive.py` (the ground-truth recurrence), `chunk.py`
(chunked PyTorch path), `triton_kernels.py` (Triton forward/backward and their autograd Function),
`MATH.md` (derivations), `compile_check.py` (compiles the kernels for a GPU target without a GPU).
"""

from __future__ import annotations

import torch

from lmstack_kernels.common.checks import (
    check_chunk_size,
    check_qkv,
    check_sequences,
    checks_values,
    use_triton,
)
from lmstack_kernels.common.chunked import trailing_tokens
from lmstack_kernels.common.compiler import disable_compile
from lmstack_kernels.lightning.chunk import chunk_lightning_attn

__all__ = ["lightning_attn", "lightning_slice_state"]

MIN_HEAD_DIM, MAX_HEAD_DIM = 16, 256


def _validate(q, k, v, decay, initial_state, cu_seqlens, backend, chunk_size) -> None:
    check_qkv("lightning_attn", q, k, v, MIN_HEAD_DIM, MAX_HEAD_DIM)
    H = q.shape[2]
    if not isinstance(decay, torch.Tensor) or decay.shape != (H,) or not decay.is_floating_point():
        raise ValueError(
            f"lightning_attn: decay must be a float tensor of shape [H] = [{H}] (log λ per head), got "
            f"{tuple(decay.shape) if isinstance(decay, torch.Tensor) else type(decay).__name__}"
        )
    # Value checks only in eager CPU calls (see lmstack_kernels.common.checks.checks_values).
    if checks_values(q) and (bool((decay > 0).any()) or not bool(torch.isfinite(decay).all())):
        raise ValueError("lightning_attn: decay is log λ and must be finite and ≤ 0 (0 < λ ≤ 1)")
    check_sequences("lightning_attn", q, v, initial_state, cu_seqlens, backend)
    check_chunk_size("lightning_attn", chunk_size)


@disable_compile  # the Triton launch graph-breaks under torch.compile
def _triton_path(q, k, v, decay, scale, initial_state, output_final_state, cu_seqlens, chunk_size):
    from lmstack_kernels.common.triton_utils import flatten_varlen
    from lmstack_kernels.lightning.triton_kernels import LightningAttnFunction

    B, T, H, _ = q.shape
    (q, k, v), cu = flatten_varlen((q, k, v), cu_seqlens)
    g = decay.detach().to(device=q.device, dtype=torch.float32).contiguous()
    h0 = None if initial_state is None else initial_state.float().contiguous()
    o, ht = LightningAttnFunction.apply(q, k, v, g, float(scale), h0, cu, output_final_state, chunk_size)
    return o.view(B, T, H, -1), ht


def lightning_attn(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    decay: torch.Tensor,
    *,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    cu_seqlens: torch.Tensor | None = None,
    chunk_size: int | None = None,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Causal linear attention with a constant per-head decay λ_h (Lightning Attention-2).

    Convention (also in MATH.md): per head h, with the state S ∈ R^{K×V} in fp32,

        S_t = λ_h S_{t-1} + k_t v_tᵀ,   S_{-1} = initial_state (or 0)
        o_t = scale · q_tᵀ S_t = scale · Σ_{s≤t} λ_h^{t-s} (q_t·k_s) v_s + scale · λ_h^{t+1} q_tᵀ S_{-1}

    Args:
        q, k: [B, T, H, K]; v: [B, T, H, V]; float32, bfloat16 or float16 (all the same); 16 ≤ K, V ≤ 256.
        decay: [H] float, log λ_h ≤ 0 (λ_h = exp(decay[h]); 0 means no decay). A constant: it gets no
            gradient.
        scale: multiplies q·k; default K^-0.5.
        initial_state: [B, H, K, V] (with cu_seqlens: [N, H, K, V], one per document), any float dtype
            (used in fp32); receives a gradient.
        output_final_state: also return the state after the last token ([B or N, H, K, V], fp32).
        cu_seqlens: [N+1] integer cumulative document lengths over the tokens of a flattened batch
            (B must be 1, the varlen convention of flash-attention/fla); the state restarts at each
            document start (from initial_state[n] when given, else 0).
        chunk_size: block length of the chunked algorithm (power of two, 16..128; default 64, or
            what fits the GPU's shared memory for the Triton kernels: `triton_kernels.block_and_stages`).
        backend: "auto" (Triton for CUDA tensors, the chunked PyTorch path otherwise), "triton"
            (CUDA, or CPU under TRITON_INTERPRET=1) or "torch".

    Returns:
        (o [B, T, H, V] in q's dtype, final state fp32 or None). Gradients flow to q, k, v and
        initial_state; all arithmetic accumulates in fp32.
    """
    _validate(q, k, v, decay, initial_state, cu_seqlens, backend, chunk_size)
    if scale is None:
        scale = q.shape[-1] ** -0.5
    if use_triton("lightning_attn", q, backend, "lmstack_kernels.lightning.triton_kernels"):
        o, ht = _triton_path(q, k, v, decay, scale, initial_state, output_final_state, cu_seqlens, chunk_size)
    else:
        o, ht = chunk_lightning_attn(
            q, k, v, decay.detach(), scale, initial_state, cu_seqlens=cu_seqlens, chunk_size=chunk_size or 64
        )
    return o, (ht if output_final_state else None)


def lightning_slice_state(
    k: torch.Tensor, v: torch.Tensor, decay: torch.Tensor, lengths: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """What a slice of T tokens does to the state (MATH.md, "Sequence slices"): S_out = λ^T S_in + E.

    Args:
        k: [B, T, H, K]; v: [B, T, H, V]; decay: [H] log λ_h (as in `lightning_attn`).
        lengths: [B] integer, the number of trailing tokens of each row that belong to its last
            document (default: all T); E covers only those.
    Returns:
        (transition λ^T [H] fp32, E = Σ_s λ^{T-1-s} k_s v_sᵀ over the trailing `lengths` tokens,
        [B, H, K, V] fp32). Gradients flow to k and v. Cost: one pass of K×V outer products, no output.
    """
    if k.dim() != 4 or v.dim() != 4 or k.shape[:3] != v.shape[:3]:
        raise ValueError(
            f"lightning_slice_state: k, v must be [B, T, H, K] and [B, T, H, V], got "
            f"{tuple(k.shape)} and {tuple(v.shape)}"
        )
    B, T, H, _ = k.shape
    if decay.shape != (H,):
        raise ValueError(
            f"lightning_slice_state: decay must have shape [H] = [{H}], got {tuple(decay.shape)}"
        )
    g = decay.detach().float().to(k.device)
    back = torch.arange(T - 1, -1, -1, device=k.device, dtype=torch.float32)  # T-1-s
    weight = torch.exp(back[:, None] * g).expand(B, T, H)  # λ^{T-1-s}
    if lengths is not None:
        weight = weight * trailing_tokens(T, lengths, k.device).float()[..., None]
    state = torch.einsum("bthk,bthv->bhkv", k.float() * weight[..., None], v.float())
    return torch.exp(g * T), state
