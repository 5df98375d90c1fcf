"""`gla_attn`: gated linear attention (GLA) with a data-dependent, per-key-channel forget gate.

Public API: `gla_attn` and `gla_slice_state` (a slice's affine map, for sequence parallelism).
Files: `naive.py` (the ground-truth recurrence), `chunk.py` (chunked PyTorch path),
`triton_kernels.py` (Triton forward/backward and their autograd Function), `MATH.md` (convention, the
stable chunked form, the gradient of the gates, sequence slices), `compile_check.py` (compiles the
kernels for a GPU target without a GPU).
"""

from __future__ import annotations

import torch

from lmstack_kernels.common.checks import (
    check_float_tensor,
    check_qkv,
    check_sequences,
    checks_values,
    use_triton,
)
from lmstack_kernels.common.chunked import trailing_tokens
from lmstack_kernels.common.compiler import disable_compile
from lmstack_kernels.gla.chunk import chunk_gla

__all__ = ["gla_attn", "gla_slice_state"]

MIN_HEAD_DIM, MAX_HEAD_DIM = 1, 256


def _validate(q, k, v, g, initial_state, cu_seqlens, backend) -> None:
    check_qkv("gla_attn", q, k, v, MIN_HEAD_DIM, MAX_HEAD_DIM)
    check_float_tensor("gla_attn", "g", g, q.shape, "[B, T, H, K]", q.device)
    # Value checks only in eager CPU calls (see lmstack_kernels.common.checks.checks_values).
    if checks_values(q) and g.numel() and not bool((g <= 0).all()):
        raise ValueError("gla_attn: g holds log forget gates and must be ≤ 0 (no NaN), got a positive value")
    check_sequences("gla_attn", q, v, initial_state, cu_seqlens, backend)


def _recurrent_step(q, k, v, g, scale, initial_state):
    """One token per row (decoding): S = diag(exp g) S + k vᵀ, o = Sᵀ (scale · q), in fp32."""
    B, _, H, K = q.shape
    V = v.shape[-1]
    S = q.new_zeros(B, H, K, V, dtype=torch.float32) if initial_state is None else initial_state.float()
    kv = k[:, 0].float().unsqueeze(-1) * v[:, 0].float().unsqueeze(-2)
    S = g[:, 0].float().exp().unsqueeze(-1) * S + kv
    o = torch.einsum("bhk,bhkv->bhv", q[:, 0].float() * scale, S)
    return o.unsqueeze(1).to(q.dtype), S


@disable_compile  # the Triton launch graph-breaks under torch.compile
def _triton_path(q, k, v, g, scale, initial_state, output_final_state, cu_seqlens):
    from lmstack_kernels.common.triton_utils import flatten_varlen
    from lmstack_kernels.gla.triton_kernels import GLAFunction

    B, T, H, _ = q.shape
    (q, k, v, g), cu = flatten_varlen((q, k, v, g), cu_seqlens)
    h0 = None if initial_state is None else initial_state.float().contiguous()
    o, ht = GLAFunction.apply(q, k, v, g, float(scale), h0, cu, output_final_state)
    return o.view(B, T, H, -1), ht


def gla_attn(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    cu_seqlens: torch.Tensor | None = None,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Gated linear attention: per head, with the state S ∈ R^{K×V} in fp32 (MATH.md),

        S_t = diag(exp g_t) S_{t-1} + k_t v_tᵀ,   S_{-1} = initial_state (or 0)
        o_t = S_tᵀ (scale · q_t)

    the convention of flash-linear-attention's `chunk_gla` / `naive_recurrent_gla`.

    Args:
        q, k: [B, T, H, K]; v: [B, T, H, V]; float32, bfloat16 or float16 (all the same);
            1 ≤ K, V ≤ 256 (both paths: the Triton kernels pad head dims to a power of two ≥ 16).
        g: [B, T, H, K], any of those float dtypes: log forget gates, ≤ 0 (checked on CPU tensors).
            Strong gates are fine: every exponent the op forms is ≤ 0, so nothing overflows.
        scale: multiplies q; default K^-0.5.
        initial_state: [B, H, K, V] (with cu_seqlens: [N, H, K, V], one per document), any float
            dtype (used in fp32).
        output_final_state: also return the state after the last token ([B or N, H, K, V], fp32).
        cu_seqlens: [N+1] integer cumulative document lengths over the tokens of a flattened batch
            (B must be 1, the varlen convention of flash-attention/fla); the state restarts at each
            document start (from initial_state[n] when given, else 0).
        backend: "auto" (Triton for CUDA tensors, the chunked PyTorch path otherwise), "triton"
            (CUDA, or CPU under TRITON_INTERPRET=1) or "torch". A single token per row (T = 1, no
            cu_seqlens; decoding) always takes one recurrent step in PyTorch.

    Returns:
        (o [B, T, H, V] in q's dtype, final state fp32 or None). Gradients flow to q, k, v, g and
        initial_state; all arithmetic accumulates in fp32.
    """
    _validate(q, k, v, g, initial_state, cu_seqlens, backend)
    if scale is None:
        scale = q.shape[-1] ** -0.5
    if q.shape[1] == 1 and cu_seqlens is None:
        o, ht = _recurrent_step(q, k, v, g, scale, initial_state)
    elif use_triton("gla_attn", q, backend, "lmstack_kernels.gla.triton_kernels"):
        o, ht = _triton_path(q, k, v, g, scale, initial_state, output_final_state, cu_seqlens)
    else:
        o, ht = chunk_gla(q, k, v, g, scale, initial_state, cu_seqlens=cu_seqlens)
    return o, (ht if output_final_state else None)


def gla_slice_state(
    k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, lengths: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """What a slice of T tokens does to the state (MATH.md, "Sequence slices"):
    S_out = diag(exp Σ_t g_t) S_in + E.

    Args:
        k, g: [B, T, H, K]; v: [B, T, H, V] (as in `gla_attn`).
        lengths: [B] integer, the number of trailing tokens of each row that belong to its last
            document (default: all T); E covers only those.
    Returns:
        (transition exp(Σ_t g_t) [B, H, K] fp32, over the whole slice: a row whose last document
        starts inside it cuts the chain, which the caller applies; E = Σ_s exp(Σ_{r>s} g_r) ⊙ k_s v_sᵀ
        over the trailing `lengths` tokens, [B, H, K, V] fp32). Gradients flow to k, v and g. Cost:
        one pass of K×V outer products, no output.
    """
    check_qkv("gla_slice_state", k, k, v, MIN_HEAD_DIM, MAX_HEAD_DIM)
    check_float_tensor("gla_slice_state", "g", g, k.shape, "[B, T, H, K]", k.device)
    T = k.shape[1]
    # Suffix sums Σ_{r>s} g_r as sums (never differences of prefix sums: a small one next to a large
    # prefix stays exact), each ≤ 0.
    after = g.float().flip(1).cumsum(1).flip(1)  # Σ_{r≥s}
    transition = after[:, 0].exp()
    weight = torch.cat([after[:, 1:], after.new_zeros(after[:, :1].shape)], dim=1).exp()
    if lengths is not None:
        weight = weight * trailing_tokens(T, lengths, k.device)[..., None, None]
    state = torch.einsum("bthk,bthv->bhkv", k.float() * weight, v.float())
    return transition, state
