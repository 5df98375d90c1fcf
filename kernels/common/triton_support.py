"""Triton under a guard, and the small helpers every op's kernels share.

Without triton installed, `HAS_TRITON` is False and only the PyTorch paths of the ops are usable
(exported models load where only torch is installed). TRITON_INTERPRET is read when `@triton.jit`
decorates, so it must be set before this module is imported.
"""

from __future__ import annotations

import os

try:
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:
    triton = None
    tl = None
    HAS_TRITON = False


def interpreting() -> bool:
    """True when kernels run in Triton's CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def pow2(n: int) -> int:
    """The smallest power of two ≥ n (1 for n ≤ 1)."""
    return 1 << max(0, n - 1).bit_length()


if HAS_TRITON:

    @triton.jit
    def load_tile(ptr, mask, LOWP: tl.constexpr):
        """Masked load (0 outside the mask), kept in its own dtype when LOWP (16-bit tl.dot operands on
        a GPU), else cast to fp32 (fp32 inputs, and the interpreter, whose 16-bit arithmetic is wrong)."""
        x = tl.load(ptr, mask=mask, other=0.0)
        if not LOWP:
            x = x.to(tl.float32)
        return x
