"""The GLA kernels as the resource check compiles them (`lmstack_kernels.common.compile_check`):
tiles and launch options from `launch_configs`, the one function the launchers also call.
"""

from __future__ import annotations

FP32_ARGS = {"dq"}  # dq: an fp32 buffer until dg is formed from it (MATH.md)


def SHAPES(D: int) -> list[tuple[int, int]]:
    """(K, V) per head dim D: K = V, and the GLA mixer's default K = expand_k · V = V / 2."""
    return [(D, D)] + ([(D // 2, D)] if D // 2 >= 16 else [])


def variants(K: int, V: int, lowp: bool, arch: int) -> list[tuple[str, object, dict, dict]]:
    """(kernel name, kernel, constexprs, launch options) of every kernel the launchers start."""
    from lmstack_kernels.common.compile_check import split
    from lmstack_kernels.gla import triton_kernels as tk

    cfg = tk.launch_configs(K, V, lowp, arch)
    flags = {
        "fwd": (tk._fwd_kernel, {"USE_H0": True, "STORE_HT": True}),
        "bwd_dq": (tk._bwd_dq_kernel, {"USE_H0": True}),
        "bwd_dk": (tk._bwd_dk_kernel, {"USE_DHT": True, "STORE_DH0": True}),
        "bwd_dv": (tk._bwd_dv_kernel, {"USE_DHT": True}),
    }
    out = []
    for name, (fn, extra) in flags.items():
        consts, options = split(cfg[name])
        out.append((name, fn, dict(H=8, K=K, V=V, BT=tk.BT, LOWP=lowp, **consts, **extra), options))
    return out
