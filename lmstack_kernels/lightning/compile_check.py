"""The lightning kernels as the resource check compiles them (`lmstack_kernels.common.compile_check`):
tiles and launch options from `launch_configs`, the one function the launchers also call.
"""

from __future__ import annotations

FP32_ARGS = {"g"}  # the per-head log decays


def variants(K: int, V: int, lowp: bool, arch: int) -> list[tuple[str, object, dict, dict]]:
    """(kernel name, kernel, constexprs, launch options) of every kernel the launchers start."""
    from lmstack_kernels.common.compile_check import split
    from lmstack_kernels.lightning import triton_kernels as tk

    cfg = tk.launch_configs(K, V, lowp, arch, None)  # the default chunk_size, as the mixers use
    flags = {
        "fwd": (tk._fwd_kernel, {"USE_H0": True, "STORE_HT": True}),
        "bwd_dq": (tk._bwd_dq_kernel, {"USE_H0": True}),
        "bwd_dk": (tk._bwd_dk_kernel, {"USE_DHT": True, "STORE_DH0": True}),
        "bwd_dv": (tk._bwd_dv_kernel, {"USE_DHT": True}),
    }
    out = []
    for name, (fn, extra) in flags.items():
        consts, options = split(cfg[name])
        out.append((name, fn, dict(H=8, K=K, V=V, LOWP=lowp, **consts, **extra), options))
    return out
