"""The Gated DeltaNet kernels as the resource check compiles them (`lmstack_kernels.common.compile_check`):
DeltaNet's kernels with USE_G, its flags and `launch_configs` (the launchers call the same function).
"""

from __future__ import annotations

from lmstack_kernels.deltanet.compile_check import ARG_TYPES, INT_HINTS, kernel_variants

__all__ = ["ARG_TYPES", "FP32_ARGS", "INT_HINTS", "variants"]

FP32_ARGS = {"states", "dq", "dk", "dbeta", "dg"}  # the states and the per-V-tile gradient shares


def variants(K: int, V: int, lowp: bool, arch: int) -> list[tuple[str, object, dict, dict]]:
    """(kernel name, kernel, constexprs, launch options) of every kernel the launchers start."""
    return kernel_variants(K, V, lowp, arch, gated=True)
