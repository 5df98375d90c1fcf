"""`delta_rule_attn`: linear attention with the delta rule (DeltaNet), and the affine map of a segment.

Public API: `delta_rule_attn` and `delta_rule_affine_map`. Files: `naive.py` (the ground-truth
recurrence), `chunk.py` (chunked PyTorch path, also the affine map), `recurrent.py` (the single-step
decoding path), `triton_kernels.py` (Triton forward/backward and their autograd Function), `MATH.md`
(convention and derivations), `compile_check.py` (compiles the kernels for a GPU target without a GPU).
"""

from __future__ import annotations

import torch

from lmstack_kernels.common.checks import (
    DTYPES,
    check_chunk_size,
    check_float_tensor,
    check_qkv,
    check_sequences,
    checks_values,
    use_triton,
)
from lmstack_kernels.common.compiler import disable_compile
from lmstack_kernels.deltanet.chunk import chunk_delta_rule, chunk_delta_rule_affine_map
from lmstack_kernels.deltanet.recurrent import recurrent_delta_rule_step

__all__ = ["delta_rule_attn", "delta_rule_affine_map", "MIN_HEAD_DIM", "MAX_HEAD_DIM"]

# The Triton kernels hold whole key rows ([chunk, K]) and a [K, V-tile] state per program.
MIN_HEAD_DIM, MAX_HEAD_DIM = 16, 256
# Default block lengths: 32 in Triton (sm_90 compiles of 64 spill kilobytes of registers; at 32 the
# spills per kernel are in benchmarks/results/kernel_resources.md, from
# `python -m lmstack_kernels.common.compile_check`), 64 in PyTorch (fewer steps of the state loop).
TRITON_CHUNK, TORCH_CHUNK = 32, 64


def _check_beta(op: str, k: torch.Tensor, beta) -> None:
    check_float_tensor(op, "beta", beta, k.shape[:3], "[B, T, H]", k.device)
    # Value checks only in eager CPU calls (see lmstack_kernels.common.checks.checks_values).
    if checks_values(k) and beta.numel() and not bool(((beta >= 0) & (beta <= 2)).all()):
        raise ValueError(
            f"{op}: beta must lie in [0, 2] (up to 1: a contraction; above: negative eigenvalues)"
        )


@disable_compile  # the Triton launch graph-breaks under torch.compile
def _triton_path(q, k, v, beta, scale, initial_state, output_final_state, cu_seqlens, chunk_size, g=None):
    """With the log decays g [B, T, H], the gated delta rule (`lmstack_kernels.gated_deltanet`)."""
    from lmstack_kernels.common.triton_utils import flatten_varlen
    from lmstack_kernels.deltanet.triton_kernels import DeltaRuleFunction

    B, T, H, _ = q.shape
    inputs = (q, k, v, beta) if g is None else (q, k, v, beta, g)
    (q, k, v, beta, *decays), cu = flatten_varlen(inputs, cu_seqlens)
    g = decays[0] if decays else None
    h0 = None if initial_state is None else initial_state.float().contiguous()
    o, ht = DeltaRuleFunction.apply(q, k, v, beta, g, float(scale), h0, cu, output_final_state, chunk_size)
    return o.view(B, T, H, -1), ht


def run_delta_rule(
    op, q, k, v, beta, g, scale, initial_state, output_final_state, cu_seqlens, backend, chunk_size
):
    """The delta rule (gated with the log decays g, else g = None) on checked inputs, by path: the
    recurrent step for a single token, Triton, or the chunked PyTorch path."""
    if scale is None:
        scale = q.shape[-1] ** -0.5
    if q.shape[1] == 1 and cu_seqlens is None:
        o, ht = recurrent_delta_rule_step(q, k, v, beta, scale, initial_state, g)
    elif use_triton(op, q, backend, "lmstack_kernels.deltanet.triton_kernels"):
        chunk_size = chunk_size or TRITON_CHUNK
        o, ht = _triton_path(
            q, k, v, beta, scale, initial_state, output_final_state, cu_seqlens, chunk_size, g
        )
    else:
        chunk_size = chunk_size or TORCH_CHUNK
        o, ht = chunk_delta_rule(
            q, k, v, beta, scale, initial_state, cu_seqlens=cu_seqlens, chunk_size=chunk_size, g=g
        )
    return o, (ht if output_final_state else None)


def delta_rule_attn(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    beta: torch.Tensor,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    cu_seqlens: torch.Tensor | None = None,
    backend: str = "auto",
    chunk_size: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Causal linear attention with the delta rule (DeltaNet; fla's `chunk_delta_rule` convention).

    Per head, with the state S ∈ R^{K×V} in fp32 (MATH.md):

        S_t = (I − β_t k_t k_tᵀ) S_{t-1} + β_t k_t v_tᵀ,   S_{-1} = initial_state (or 0)
        o_t = S_tᵀ (scale · q_t)

    Args:
        q, k: [B, T, H, K]; v: [B, T, H, V]; float32, bfloat16 or float16 (all the same);
            16 ≤ K, V ≤ 256. q and k are used as given: L2-normalise them first (with ‖k‖ = 1 and
            0 ≤ β ≤ 1 every transition is a contraction).
        beta: [B, T, H], any of the three float dtypes, in [0, 2] (checked for CPU tensors); receives
            a gradient.
        scale: multiplies q; default K^-0.5.
        initial_state: [B, H, K, V] (with cu_seqlens: [N, H, K, V], one per document), any float dtype
            (used in fp32); receives a gradient.
        output_final_state: also return the state after the last token ([B or N, H, K, V], fp32).
        cu_seqlens: [N+1] integer cumulative document lengths over the tokens of a flattened batch
            (B must be 1, the varlen convention of flash-attention/fla); the state restarts at each
            document start (from initial_state[n] when given, else 0).
        backend: "auto" (Triton for CUDA tensors, the chunked PyTorch path otherwise), "triton"
            (CUDA, or CPU under TRITON_INTERPRET=1) or "torch". A single token (T = 1, no
            cu_seqlens) always takes the recurrent step, the decoding path, whatever the backend.
        chunk_size: block length of the chunked algorithm (power of two, 16..128; default 32 in
            Triton, 64 in PyTorch).

    Returns:
        (o [B, T, H, V] in q's dtype, final state fp32 or None). Gradients flow to q, k, v, beta and
        initial_state; all arithmetic accumulates in fp32.
    """
    op = "delta_rule_attn"
    check_qkv(op, q, k, v, MIN_HEAD_DIM, MAX_HEAD_DIM)
    _check_beta(op, k, beta)
    check_sequences(op, q, v, initial_state, cu_seqlens, backend)
    check_chunk_size(op, chunk_size)
    return run_delta_rule(
        op, q, k, v, beta, None, scale, initial_state, output_final_state, cu_seqlens, backend, chunk_size
    )


def delta_rule_affine_map(
    k: torch.Tensor,
    v: torch.Tensor,
    beta: torch.Tensor,
    cu_seqlens: torch.Tensor | None = None,
    chunk_size: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The affine map of each sequence (or document) of a segment, for sequence parallelism.

    For any initial state S_in, running `delta_rule_attn` over the segment ends in

        S_out = P · S_in + E,   P = (I − β_{T-1} k_{T-1} k_{T-1}ᵀ) ⋯ (I − β_0 k_0 k_0ᵀ)

    (later transitions on the left) and E the final state from a zero start (MATH.md, "The affine
    map of a segment"). Inputs as `delta_rule_attn` (q is not needed); computed by the chunked
    PyTorch path on any device, differentiable with respect to k, v and beta.

    Returns:
        (P [B or N, H, K, K], E [B or N, H, K, V]), fp32. An empty document maps to (I, 0).
    """
    op = "delta_rule_affine_map"
    if not isinstance(k, torch.Tensor) or k.dim() != 4 or k.dtype not in DTYPES:
        got = (tuple(k.shape), k.dtype) if isinstance(k, torch.Tensor) else type(k).__name__
        raise ValueError(f"{op}: k must be a 4-D float tensor [B, T, H, K], got {got}")
    check_qkv(op, k, k, v, MIN_HEAD_DIM, MAX_HEAD_DIM)  # k stands in for q (checked just above)
    _check_beta(op, k, beta)
    check_sequences(op, k, v, None, cu_seqlens, "torch")
    check_chunk_size(op, chunk_size)
    return chunk_delta_rule_affine_map(k, v, beta, cu_seqlens, chunk_size or TORCH_CHUNK)
