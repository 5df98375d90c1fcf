"""The DeltaNet kernels as the resource check compiles them (`lmstack_kernels.common.compile_check`):
tiles and launch options from `launch_configs`, the one function the launchers also call; the
forward kernel twice, as the forward and in its state-recomputing form.
"""

from __future__ import annotations

FP32_ARGS = {"states", "dq", "dk", "dbeta"}  # the states and the per-V-tile gradient shares
ARG_TYPES = {"chunk_offsets": "*i32", "TT": "i32"}
INT_HINTS = ("TT",)  # the flattened token count: a multiple of 16 at training shapes, hinted by the JIT


def variants(K: int, V: int, lowp: bool, arch: int) -> list[tuple[str, object, dict, dict]]:
    """(kernel name, kernel, constexprs, launch options) of every kernel the launchers start."""
    from lmstack_kernels.deltanet import TRITON_CHUNK, triton_kernels

    return kernel_variants(triton_kernels, TRITON_CHUNK, K, V, lowp, arch)


def kernel_variants(
    tk, BT: int, K: int, V: int, lowp: bool, arch: int
) -> list[tuple[str, object, dict, dict]]:
    """The variants of a module `tk` with DeltaNet's `_fwd_kernel`/`_bwd_kernel` flags and launch
    configs (DeltaNet's, and Gated DeltaNet's, whose programs take one more per-token input)."""
    from lmstack_kernels.common.compile_check import split
    from lmstack_kernels.deltanet.triton_kernels import launch_configs

    cfg = launch_configs(K, V, lowp, arch)
    flags = {
        "fwd": (tk._fwd_kernel, {"USE_H0": True, "STORE_O": True, "STORE_HT": True, "STORE_STATES": False}),
        "states": (tk._fwd_kernel, {"USE_H0": True, "STORE_O": False, "STORE_HT": False, "STORE_STATES": True}),
        "bwd": (tk._bwd_kernel, {"USE_DHT": True, "STORE_DH0": True}),
    }  # fmt: skip
    out = []
    for name, (fn, extra) in flags.items():
        consts, options = split(cfg[name])
        out.append((name, fn, dict(H=8, K=K, V=V, BT=BT, LOWP=lowp, **consts, **extra), options))
    return out
