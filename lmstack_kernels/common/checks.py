"""Input checks shared by the public ops: one-line ValueErrors that name the op and the argument.

Value checks (that read a tensor back to the host) run only for CPU tensors (`checks_values`): on
CUDA they would stall the stream at every call of every layer, and under torch.compile each read is a
graph break per layer per step; eager tests and small CPU runs catch those mistakes.
"""

from __future__ import annotations

import torch

DTYPES = (torch.float32, torch.bfloat16, torch.float16)
BACKENDS = ("auto", "triton", "torch")


def checks_values(x: torch.Tensor) -> bool:
    """Whether to run the value checks that read `x`'s values back to the host: eager CPU calls only."""
    return not x.is_cuda and not torch.compiler.is_compiling()


def _shape(x) -> str:
    return str(tuple(x.shape)) if isinstance(x, torch.Tensor) else type(x).__name__


def check_qkv(op: str, q, k, v, min_dim: int, max_dim: int) -> None:
    """q, k: [B, T, H, K]; v: [B, T, H, V]; one float dtype and device; min_dim ≤ K, V ≤ max_dim."""
    for name, x in (("q", q), ("k", k), ("v", v)):
        if not isinstance(x, torch.Tensor) or x.dim() != 4:
            raise ValueError(f"{op}: {name} must be a 4-D tensor [B, T, H, D], got {_shape(x)}")
        if x.dtype not in DTYPES:
            raise ValueError(f"{op}: {name} has dtype {x.dtype}; expected float32, bfloat16 or float16")
        if x.device != q.device:
            raise ValueError(f"{op}: {name} is on {x.device}, q on {q.device}")
    if k.shape != q.shape:
        raise ValueError(f"{op}: k shape {tuple(k.shape)} != q shape {tuple(q.shape)} ([B, T, H, K])")
    if v.shape[:3] != q.shape[:3]:
        raise ValueError(
            f"{op}: v shape {tuple(v.shape)} must be [B, T, H, V] with B, T, H of q {tuple(q.shape[:3])}"
        )
    if not (k.dtype == v.dtype == q.dtype):
        raise ValueError(f"{op}: q, k, v dtypes differ ({q.dtype}, {k.dtype}, {v.dtype})")
    for name, d in (("key head dim K", q.shape[-1]), ("value head dim V", v.shape[-1])):
        if not min_dim <= d <= max_dim:
            raise ValueError(f"{op}: {name} = {d} is not supported; expected {min_dim}..{max_dim}")


def check_float_tensor(op: str, name: str, x, shape, dims: str, device: torch.device) -> None:
    """x: a tensor of `shape` (written `dims`, e.g. "[B, T, H]") in one of DTYPES, on `device`."""
    if not isinstance(x, torch.Tensor) or tuple(x.shape) != tuple(shape) or x.dtype not in DTYPES:
        got = f"{tuple(x.shape)} {x.dtype}" if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"{op}: {name} must be a float tensor {dims} = {list(shape)}, got {got}")
    if x.device != device:
        raise ValueError(f"{op}: {name} is on {x.device}, the other inputs on {device}")


def check_chunk_size(op: str, chunk_size: int | None) -> None:
    """None (the op's default) or a power of two in 16..128."""
    if chunk_size is not None and (chunk_size < 16 or chunk_size > 128 or chunk_size & (chunk_size - 1)):
        raise ValueError(f"{op}: chunk_size must be a power of two in 16..128, got {chunk_size}")


def check_sequences(op: str, q, v, initial_state, cu_seqlens, backend: str) -> None:
    """cu_seqlens ([N+1], B = 1), initial_state ([B or N, H, K, V]) and backend."""
    B, T, H, K = q.shape
    V = v.shape[-1]
    n_seq = B
    if cu_seqlens is not None:
        if (
            not isinstance(cu_seqlens, torch.Tensor)
            or cu_seqlens.dim() != 1
            or cu_seqlens.numel() < 2
            or cu_seqlens.is_floating_point()
        ):
            raise ValueError(f"{op}: cu_seqlens must be a 1-D integer tensor [N+1]")
        if B != 1:
            raise ValueError(f"{op}: with cu_seqlens the batch must be flattened to B = 1, got B = {B}")
        if checks_values(q):
            cu = cu_seqlens.tolist()
            if cu[0] != 0 or cu[-1] != T or any(b < a for a, b in zip(cu, cu[1:])):
                raise ValueError(f"{op}: cu_seqlens must rise from 0 to T = {T}, got {cu}")
        n_seq = cu_seqlens.numel() - 1
    if initial_state is not None:
        if (
            not isinstance(initial_state, torch.Tensor)
            or tuple(initial_state.shape) != (n_seq, H, K, V)
            or not initial_state.is_floating_point()
        ):
            what = "[N, H, K, V] (one per document)" if cu_seqlens is not None else "[B, H, K, V]"
            raise ValueError(
                f"{op}: initial_state must be a float tensor {what} = {[n_seq, H, K, V]}, "
                f"got {_shape(initial_state)}"
            )
        if initial_state.device != q.device:
            raise ValueError(f"{op}: initial_state is on {initial_state.device}, q on {q.device}")
    if backend not in BACKENDS:
        raise ValueError(f"{op}: backend must be 'auto', 'triton' or 'torch', got {backend!r}")


def use_triton(op: str, q: torch.Tensor, backend: str, triton_module: str) -> bool:
    """Whether to run the Triton kernels: `backend` "triton" (CUDA, or CPU under TRITON_INTERPRET=1
    set before `triton_module` is imported), or "auto" with CUDA tensors."""
    if backend == "torch":
        return False
    from lmstack_kernels.common.triton_utils import HAS_TRITON, interpreting

    if backend == "triton":
        if not HAS_TRITON:
            raise RuntimeError(f"{op}: backend='triton' but triton is not installed")
        if not q.is_cuda and not interpreting():
            raise RuntimeError(
                f"{op}: backend='triton' needs CUDA tensors (or TRITON_INTERPRET=1 set before "
                f"{triton_module} is imported)"
            )
        return True
    return HAS_TRITON and q.is_cuda and not interpreting()
