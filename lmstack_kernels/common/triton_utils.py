"""Triton helpers shared by the ops' kernels: the import guard, the interpreter switch, a masked
tile load, tile sizes and launch options.

Triton is imported under a guard: without it `HAS_TRITON` is False and only the PyTorch paths of
the ops are usable (exported models load where only torch is installed).
"""

from __future__ import annotations

import os

import torch

from lmstack_kernels.common.chunked import pow2  # noqa: F401  (also imported from here by the kernels)

try:
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:
    triton = None
    tl = None
    HAS_TRITON = False


def interpreting() -> bool:
    """Triton's CPU interpreter is on (read by @triton.jit when a kernel module is imported)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


if HAS_TRITON:

    @triton.jit
    def load_tile(ptr, mask, LOWP: tl.constexpr):
        """Masked load (0 outside); kept 16-bit only when LOWP (GPU tl.dot operands), else fp32:
        the interpreter's bf16 arithmetic is wrong, and fp32 inputs stay fp32."""
        x = tl.load(ptr, mask=mask, other=0.0)
        if not LOWP:
            x = x.to(tl.float32)
        return x

    @triton.jit
    def program_sequence(cu, H: tl.constexpr):
        """This program's (sequence, head) pair, program_id(0) = n·H + h: returns (n·H + h, h, the
        sequence's first token in the flattened batch, its length), from `cu_seqlens`."""
        i_nh = tl.program_id(0)
        i_n = i_nh // H
        bos = tl.load(cu + i_n).to(tl.int64)
        return i_nh, i_nh % H, bos, tl.load(cu + i_n + 1).to(tl.int64) - bos

    @triton.jit
    def state_tile(i_nh, o_k, o_v, K: tl.constexpr, V: tl.constexpr):
        """Offsets and mask of rows o_k, columns o_v of state i_nh in an [N·H, K, V] tensor."""
        p = i_nh.to(tl.int64) * K * V + o_k[:, None] * V + o_v[None, :]
        return p, (o_k < K)[:, None] & (o_v < V)[None, :]

    @triton.jit
    def load_state(ptr, p, m, USE: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr):
        """The [BK, BV] fp32 state tile at ptr + p, or zeros unless USE (then ptr may be None)."""
        b = tl.zeros([BK, BV], dtype=tl.float32)
        if USE:
            b += tl.load(ptr + p, mask=m, other=0.0).to(tl.float32)
        return b


def state_tiles(full: int, other: int) -> tuple[int, int]:
    """(padded full dim, tile of the other dim) of a kernel's state block [full, tile]: the tile is
    64 for full ≤ 64 and 32 above, which kept register spills small in sm_90 compiles with
    triton 3.9 (ptxas -v; e.g. K = V = 64: no spills). Not yet tuned on a GPU."""
    f = max(16, pow2(full))
    return f, max(16, min(64, pow2(other), max(32, 4096 // f)))


def device_arch(x: torch.Tensor) -> int | None:
    """The compute capability of x's GPU as one number (90 for sm_90), or None when interpreting:
    the launchers pick tiles and stages per architecture (`launch_opts`)."""
    if interpreting() or not x.is_cuda:
        return None
    major, minor = torch.cuda.get_device_capability(x.device)
    return major * 10 + minor


# ptxas at its default -O3 gives some of these kernels 32 or 128 registers instead of up to 255 and
# spills the rest: DeltaNet's backward on sm_80 at K = 256 39,500 B per thread with 32 registers;
# -O1 gives the same PTX 255 registers and 6,380 B (ptxas 12.8 of Triton 3.6 and 12.9 of Triton 3.9
# alike). Where -O3 does allocate 255, -O1 spills a little more (DeltaNet's sm_80 backward at K = 32:
# 804 -> 1,116 B), so each op's `launch_configs` asks for -O1 only for the kernels the resource
# table shows collapsing (one rule per kernel and arch: 35 variants, 25 of which collapsed). An
# explicit ptx_options replaces TRITON_PTXAS_OPTIONS for those kernels. Not yet timed on a GPU.
PTXAS_O1 = "--opt-level 1"


def launch_opts(f: int, num_stages: int | None = None, ptxas_o1: bool = False) -> dict:
    """num_warps for a state block whose padded full dim is f, num_stages when given (Triton's
    default, 3, otherwise) and ptxas -O1 when asked (`PTXAS_O1`); none when interpreting."""
    if interpreting():
        return {}
    return (
        {"num_warps": 8 if f >= 32 else 4}
        | ({} if num_stages is None else {"num_stages": num_stages})
        | ({"ptx_options": PTXAS_O1} if ptxas_o1 else {})
    )


def flatten_varlen(tensors, cu_seqlens):
    """Flatten [B, T, H, D] tensors to contiguous [1, B*T, H, D] and return the int32 `cu_seqlens`
    the kernels address sequences with (a dense batch is B documents of length T)."""
    B, T = tensors[0].shape[:2]
    device = tensors[0].device
    if cu_seqlens is None:
        cu = (torch.arange(B + 1, device=device) * T).to(torch.int32)
    else:
        cu = cu_seqlens.to(device=device, dtype=torch.int32).contiguous()
    flat = [x.reshape(1, B * T, *x.shape[2:]).contiguous() for x in tensors]
    return flat, cu
