"""The Gated DeltaNet kernels as the resource check compiles them (`lmstack_kernels.common.compile_check`):
DeltaNet's `launch_configs` (the launchers call the same function); the forward kernel twice, as the
forward and in its state-recomputing form.
"""

from __future__ import annotations

from lmstack_kernels.deltanet.compile_check import ARG_TYPES, INT_HINTS

__all__ = ["ARG_TYPES", "FP32_ARGS", "INT_HINTS", "variants"]

FP32_ARGS = {"states", "dq", "dk", "dbeta", "dg"}  # the states and the per-V-tile gradient shares


def variants(K: int, V: int, lowp: bool, arch: int) -> list[tuple[str, object, dict, dict]]:
    """(kernel name, kernel, constexprs, launch options) of every kernel the launchers start."""
    from lmstack_kernels.common.compile_check import split
    from lmstack_kernels.deltanet.triton_kernels import launch_configs
    from lmstack_kernels.gated_deltanet import TRITON_CHUNK
    from lmstack_kernels.gated_deltanet import triton_kernels as tk

    cfg = launch_configs(K, V, lowp, arch)
    flags = {
        "fwd": (tk._fwd_kernel, {"USE_H0": True, "STORE_O": True, "STORE_HT": True, "STORE_STATES": False}),
        "states": (tk._fwd_kernel, {"USE_H0": True, "STORE_O": False, "STORE_HT": False, "STORE_STATES": True}),
        "bwd": (tk._bwd_kernel, {"USE_DHT": True, "STORE_DH0": True}),
    }  # fmt: skip
    out = []
    for name, (fn, extra) in flags.items():
        consts, options = split(cfg[name])
        out.append((name, fn, dict(H=8, K=K, V=V, BT=TRITON_CHUNK, LOWP=lowp, **consts, **extra), options))
    return out
