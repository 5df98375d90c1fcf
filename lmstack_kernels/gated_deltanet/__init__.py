"""`gated_delta_rule_attn`: linear attention with the gated delta rule (Gated DeltaNet), and the
affine map of a slice.

Public API: `gated_delta_rule_attn`, `gated_delta_rule_step` (one decoding token) and
`gated_delta_rule_affine_map`. Files: `naive.py` (the ground-truth recurrence), `MATH.md` (convention
and derivations), `compile_check.py` (compiles the kernels for a GPU target without a GPU). The
computing paths are DeltaNet's (`lmstack_kernels.deltanet`: chunked PyTorch, recurrent step, Triton
forward/backward) run with the log decays g: the same programs and state loop, with the decays
applied where MATH.md puts them (g = None there is DeltaNet's arithmetic unchanged).
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
)
from lmstack_kernels.deltanet import (  # DeltaNet's kernels: whole key rows, a [K, V-tile] state
    MAX_HEAD_DIM,
    MIN_HEAD_DIM,
    TORCH_CHUNK,
    TRITON_CHUNK,
    _check_beta,
    run_delta_rule,
)
from lmstack_kernels.deltanet.chunk import chunk_delta_rule_affine_map
from lmstack_kernels.deltanet.recurrent import recurrent_delta_rule_step

__all__ = [
    "gated_delta_rule_attn",
    "gated_delta_rule_step",
    "gated_delta_rule_affine_map",
    "MIN_HEAD_DIM",
    "MAX_HEAD_DIM",
    "TRITON_CHUNK",
]


def _check_beta_g(op: str, k: torch.Tensor, beta, g) -> None:
    _check_beta(op, k, beta)
    check_float_tensor(op, "g", g, k.shape[:3], "[B, T, H]", k.device)
    # Value checks only in eager CPU calls (see lmstack_kernels.common.checks.checks_values).
    if checks_values(k) and g.numel() and not bool((g <= 0).all()):
        raise ValueError(f"{op}: g must be a log decay, g <= 0 (with NaN refused), got max {g.max().item()}")


def gated_delta_rule_attn(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    beta: torch.Tensor,
    g: torch.Tensor,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    cu_seqlens: torch.Tensor | None = None,
    backend: str = "auto",
    chunk_size: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Causal linear attention with the gated delta rule (Gated DeltaNet; fla's
    `naive_recurrent_gated_delta_rule` / `chunk_gated_delta_rule` convention).

    Per head, with the state S ∈ R^{K×V} in fp32 (MATH.md):

        S_t = exp(g_t) (I − β_t k_t k_tᵀ) S_{t-1} + β_t k_t v_tᵀ,   S_{-1} = initial_state (or 0)
        o_t = S_tᵀ (scale · q_t)

    Args:
        q, k: [B, T, H, K]; v: [B, T, H, V]; float32, bfloat16 or float16 (all the same);
            16 ≤ K, V ≤ 256. q and k are used as given: L2-normalise them first.
        beta: [B, T, H], any of the three float dtypes, in [0, 2] (checked for CPU tensors).
        g: [B, T, H], the log decay of each token and head, g ≤ 0 (checked for CPU tensors); any
            float dtype, used in fp32. Strong decay (g = −20 and below) is exact: decays are only
            ever exponentials of non-positive numbers.
        scale: multiplies q; default K^-0.5.
        initial_state: [B, H, K, V] (with cu_seqlens: [N, H, K, V], one per document), any float dtype
            (used in fp32).
        output_final_state: also return the state after the last token ([B or N, H, K, V], fp32).
        cu_seqlens: [N+1] integer cumulative document lengths over the tokens of a flattened batch
            (B must be 1); the state restarts at each document start (from initial_state[n] or 0).
        backend: "auto" (Triton for CUDA tensors, the chunked PyTorch path otherwise), "triton"
            (CUDA, or CPU under TRITON_INTERPRET=1) or "torch". A single token (T = 1, no
            cu_seqlens) always takes the recurrent step, the decoding path, whatever the backend.
        chunk_size: block length of the chunked algorithm (power of two, 16..128; default 32 in
            Triton, 64 in PyTorch).

    Returns:
        (o [B, T, H, V] in q's dtype, final state fp32 or None). Gradients flow to q, k, v, beta, g
        and initial_state; all arithmetic accumulates in fp32.
    """
    op = "gated_delta_rule_attn"
    check_qkv(op, q, k, v, MIN_HEAD_DIM, MAX_HEAD_DIM)
    _check_beta_g(op, k, beta, g)
    check_sequences(op, q, v, initial_state, cu_seqlens, backend)
    check_chunk_size(op, chunk_size)
    return run_delta_rule(
        op, q, k, v, beta, g, scale, initial_state, output_final_state, cu_seqlens, backend, chunk_size
    )


def gated_delta_rule_step(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    beta: torch.Tensor,
    g: torch.Tensor,
    state: torch.Tensor | None = None,
    scale: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One decoding token: q, k [B, 1, H, K], v [B, 1, H, V], beta, g [B, 1, H], state [B, H, K, V]
    or None (zero). Returns (o [B, 1, H, V] in q's dtype, the new state fp32), exactly
    `gated_delta_rule_attn(..., initial_state=state, output_final_state=True)` for T = 1."""
    op = "gated_delta_rule_step"
    check_qkv(op, q, k, v, MIN_HEAD_DIM, MAX_HEAD_DIM)
    if q.shape[1] != 1:
        raise ValueError(f"{op}: q must hold one token per row ([B, 1, H, K]), got T = {q.shape[1]}")
    _check_beta_g(op, k, beta, g)
    check_sequences(op, q, v, state, None, "torch")
    return recurrent_delta_rule_step(q, k, v, beta, q.shape[-1] ** -0.5 if scale is None else scale, state, g)


def gated_delta_rule_affine_map(
    k: torch.Tensor,
    v: torch.Tensor,
    beta: torch.Tensor,
    g: torch.Tensor,
    cu_seqlens: torch.Tensor | None = None,
    chunk_size: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The affine map of each sequence (or document) of a slice, for sequence parallelism (LASP-2).

    For any initial state S_in, running `gated_delta_rule_attn` over the slice ends in

        S_out = P · S_in + E,   P = e^{g_{T-1}} (I − β_{T-1} k_{T-1} k_{T-1}ᵀ) ⋯ e^{g_0} (I − β_0 k_0 k_0ᵀ)

    (later transitions on the left) and E the final state from a zero start (MATH.md, "The affine
    map of a slice"). Inputs as `gated_delta_rule_attn` (q is not needed); computed by the chunked
    PyTorch path on any device, differentiable with respect to k, v, beta and g. A token with β = 0
    and g = 0 is the identity, so zeroing both before a row's last document gives that document's map.

    Returns:
        (P [B or N, H, K, K], E [B or N, H, K, V]), fp32. An empty document maps to (I, 0).
    """
    op = "gated_delta_rule_affine_map"
    if not isinstance(k, torch.Tensor) or k.dim() != 4 or k.dtype not in DTYPES:
        got = (tuple(k.shape), k.dtype) if isinstance(k, torch.Tensor) else type(k).__name__
        raise ValueError(f"{op}: k must be a 4-D float tensor [B, T, H, K], got {got}")
    check_qkv(op, k, k, v, MIN_HEAD_DIM, MAX_HEAD_DIM)  # k stands in for q (checked just above)
    _check_beta_g(op, k, beta, g)
    check_sequences(op, k, v, None, cu_seqlens, "torch")
    check_chunk_size(op, chunk_size)
    return chunk_delta_rule_affine_map(k, v, beta, cu_seqlens, chunk_size or TORCH_CHUNK, g)
