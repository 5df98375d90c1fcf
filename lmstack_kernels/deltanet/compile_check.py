"""The DeltaNet kernels as the resource check compiles them (`lmstack_kernels.common.compile_check`):
tiles and launch options from `launch_configs`, the one function the launchers also call; the
forward kernel twice, as the forward and in its state-recomputing form. Gated DeltaNet's variants
are the same kernels with USE_G (`lmstack_kernels.gated_deltanet.compile_check`).
"""

from __future__ import annotations

FP32_ARGS = {"states", "dq", "dk", "dbeta"}  # the states and the per-V-tile gradient shares
ARG_TYPES = {"chunk_offsets": "*i32", "TT": "i32"}
INT_HINTS = ("TT",)  # the flattened token count: a multiple of 16 at training shapes, hinted by the JIT


def variants(K: int, V: int, lowp: bool, arch: int) -> list[tuple[str, object, dict, dict]]:
    """(kernel name, kernel, constexprs, launch options) of every kernel the launchers start."""
    return kernel_variants(K, V, lowp, arch, gated=False)


def kernel_variants(
    K: int, V: int, lowp: bool, arch: int, gated: bool
) -> list[tuple[str, object, dict, dict]]:
    """The variants of `_fwd_kernel`/`_bwd_kernel`, without or with the log decays (USE_G)."""
    from lmstack_kernels.common.compile_check import split
    from lmstack_kernels.deltanet import TRITON_CHUNK
    from lmstack_kernels.deltanet import triton_kernels as tk

    cfg = tk.launch_configs(K, V, lowp, arch, TRITON_CHUNK, gated)  # the mixers' chunk_size
    # Without decays the launchers pass g (and dg) as None, which the JIT makes a constexpr.
    fwd_g, bwd_g = (
        ({"USE_G": True}, {"USE_G": True})
        if gated
        else ({"USE_G": False, "g": None}, {"USE_G": False, "g": None, "dg": None})
    )
    flags = {
        "fwd": (tk._fwd_kernel, {"USE_H0": True, "STORE_O": True, "STORE_HT": True, "STORE_STATES": False, **fwd_g}),
        "states": (tk._fwd_kernel, {"USE_H0": True, "STORE_O": False, "STORE_HT": False, "STORE_STATES": True, **fwd_g}),
        "bwd": (tk._bwd_kernel, {"USE_DHT": True, "STORE_DH0": True, **bwd_g}),
    }  # fmt: skip
    out = []
    for name, (fn, extra) in flags.items():
        consts, options = split(cfg[name])
        out.append((name, fn, dict(H=8, K=K, V=V, LOWP=lowp, **consts, **extra), options))
    return out
