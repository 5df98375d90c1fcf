"""`delta_rule_attn`: linear attention with the delta rule (DeltaNet), and the affine map of a segment.

Public API: `delta_rule_attn` and `delta_rule_affine_map`. Files: `naive.py` (the ground-truth
recurrence), `chunk.py` (chunked PyTorch path, also the affine map), `recurrent.py` (the single-step
decoding path), `triton_kernels.py` (Triton forward/backward and their autograd Function), `MATH.md`
(convention and derivations), `compile_check.py` (compiles the kernels for a GPU target without a GPU).
"""

from __future__ import annotations

import torch

from lmstack_kernels.deltanet.chunk import chunk_delta_rule, chunk_delta_rule_affine_map
from lmstack_kernels.deltanet.recurrent import recurrent_delta_rule_step

__all__ = ["delta_rule_attn", "delta_rule_affine_map", "MIN_HEAD_DIM", "MAX_HEAD_DIM"]

_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# The Triton kernels hold whole key rows ([chunk, K]) and a [K, V-tile] state per program.
MIN_HEAD_DIM, MAX_HEAD_DIM = 16, 256
DEFAULT_CHUNK = 64


def _validate(op, q, k, v, beta, initial_state, cu_seqlens, backend, chunk_size) -> None:
    for name, x in (("q", q), ("k", k), ("v", v)):
        if x is None:
            continue
        if not isinstance(x, torch.Tensor) or x.dim() != 4:
            raise ValueError(
                f"{op}: {name} must be a 4-D tensor [B, T, H, D], got "
                f"{tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}"
            )
        if x.dtype not in _DTYPES:
            raise ValueError(f"{op}: {name} has dtype {x.dtype}; expected float32, bfloat16 or float16")
        if x.device != k.device:
            raise ValueError(f"{op}: {name} is on {x.device}, k on {k.device}")
    if q is not None and q.shape != k.shape:
        raise ValueError(f"{op}: q shape {tuple(q.shape)} != k shape {tuple(k.shape)} ([B, T, H, K])")
    if v.shape[:3] != k.shape[:3]:
        raise ValueError(
            f"{op}: v shape {tuple(v.shape)} must be [B, T, H, V] with B, T, H of k {tuple(k.shape[:3])}"
        )
    if not (k.dtype == v.dtype == (k.dtype if q is None else q.dtype)):
        raise ValueError(
            f"{op}: q, k, v dtypes differ ({'-' if q is None else q.dtype}, {k.dtype}, {v.dtype})"
        )
    B, T, H, K = k.shape
    V = v.shape[-1]
    for name, d in (("key head dim K", K), ("value head dim V", V)):
        if not MIN_HEAD_DIM <= d <= MAX_HEAD_DIM:
            raise ValueError(f"{op}: {name} = {d} is not supported; expected {MIN_HEAD_DIM}..{MAX_HEAD_DIM}")
    if not isinstance(beta, torch.Tensor) or beta.shape != k.shape[:3] or beta.dtype not in _DTYPES:
        raise ValueError(
            f"{op}: beta must be a float tensor [B, T, H] = {list(k.shape[:3])}, got "
            f"{(tuple(beta.shape), beta.dtype) if isinstance(beta, torch.Tensor) else type(beta).__name__}"
        )
    if beta.device != k.device:
        raise ValueError(f"{op}: beta is on {beta.device}, k on {k.device}")
    # Value checks read tensors back to the host: on CUDA that would stall the stream at every call of
    # every layer, so they run only for CPU tensors (where tests and small runs catch the mistakes).
    check_values = not k.is_cuda
    if check_values and beta.numel() and not bool(((beta >= 0) & (beta <= 2)).all()):
        raise ValueError(
            f"{op}: beta must lie in [0, 2] (0..1: a contraction; up to 2: negative eigenvalues)"
        )
    n_seq = B
    if cu_seqlens is not None:
        if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2 or cu_seqlens.is_floating_point():
            raise ValueError(f"{op}: cu_seqlens must be a 1-D integer tensor [N+1]")
        if B != 1:
            raise ValueError(f"{op}: with cu_seqlens the batch must be flattened to B = 1, got B = {B}")
        if check_values:
            cu = cu_seqlens.tolist()
            if cu[0] != 0 or cu[-1] != T or any(b < a for a, b in zip(cu, cu[1:])):
                raise ValueError(f"{op}: cu_seqlens must rise from 0 to T = {T}, got {cu}")
        n_seq = cu_seqlens.numel() - 1
    if initial_state is not None:
        if tuple(initial_state.shape) != (n_seq, H, K, V) or not initial_state.is_floating_point():
            what = "[N, H, K, V] (one per document)" if cu_seqlens is not None else "[B, H, K, V]"
            raise ValueError(
                f"{op}: initial_state must be a float tensor {what} = {[n_seq, H, K, V]}, got "
                f"{tuple(initial_state.shape)}"
            )
        if initial_state.device != k.device:
            raise ValueError(f"{op}: initial_state is on {initial_state.device}, k on {k.device}")
    if backend not in ("auto", "triton", "torch"):
        raise ValueError(f"{op}: backend must be 'auto', 'triton' or 'torch', got {backend!r}")
    if chunk_size is not None and (chunk_size < 16 or chunk_size > 128 or chunk_size & (chunk_size - 1)):
        raise ValueError(f"{op}: chunk_size must be a power of two in 16..128, got {chunk_size}")


def _use_triton(q: torch.Tensor, backend: str) -> bool:
    if backend == "torch":
        return False
    from lmstack_kernels.deltanet import triton_kernels

    interp = triton_kernels.interpreting()
    if backend == "triton":
        if not triton_kernels.HAS_TRITON:
            raise RuntimeError("delta_rule_attn: backend='triton' but triton is not installed")
        if not q.is_cuda and not interp:
            raise RuntimeError(
                "delta_rule_attn: backend='triton' needs CUDA tensors (or TRITON_INTERPRET=1 "
                "set before lmstack_kernels.deltanet.triton_kernels is imported)"
            )
        return True
    return triton_kernels.HAS_TRITON and q.is_cuda and not interp


@torch.compiler.disable
def _triton_path(q, k, v, beta, scale, initial_state, output_final_state, cu_seqlens, chunk_size):
    from lmstack_kernels.deltanet.triton_kernels import DeltaRuleFunction

    B, T, H, K = q.shape
    V = v.shape[-1]
    if cu_seqlens is None:
        cu = (torch.arange(B + 1, device=q.device) * T).to(torch.int32)
    else:
        cu = cu_seqlens.to(device=q.device, dtype=torch.int32).contiguous()
    flat = lambda x: x.reshape(1, B * T, *x.shape[2:]).contiguous()
    h0 = None if initial_state is None else initial_state.float().contiguous()
    o, ht = DeltaRuleFunction.apply(
        flat(q), flat(k), flat(v), flat(beta), float(scale), h0, cu, output_final_state, chunk_size
    )
    return o.view(B, T, H, V), ht


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
        chunk_size: block length of the chunked algorithm (power of two, 16..128; default 64).

    Returns:
        (o [B, T, H, V] in q's dtype, final state fp32 or None). Gradients flow to q, k, v, beta and
        initial_state; all arithmetic accumulates in fp32.
    """
    _validate("delta_rule_attn", q, k, v, beta, initial_state, cu_seqlens, backend, chunk_size)
    if scale is None:
        scale = q.shape[-1] ** -0.5
    chunk_size = chunk_size or DEFAULT_CHUNK
    if q.shape[1] == 1 and cu_seqlens is None:
        o, ht = recurrent_delta_rule_step(q, k, v, beta, scale, initial_state)
    elif _use_triton(q, backend):
        o, ht = _triton_path(q, k, v, beta, scale, initial_state, output_final_state, cu_seqlens, chunk_size)
    else:
        o, ht = chunk_delta_rule(q, k, v, beta, scale, initial_state, cu_seqlens, chunk_size)
    return o, (ht if output_final_state else None)


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
    _validate("delta_rule_affine_map", None, k, v, beta, None, cu_seqlens, "torch", chunk_size)
    return chunk_delta_rule_affine_map(k, v, beta, cu_seqlens, chunk_size or DEFAULT_CHUNK)
