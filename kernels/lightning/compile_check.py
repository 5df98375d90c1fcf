"""Compile the lightning Triton kernels for a GPU target without a GPU, and report registers and spills.

    python -m lmstack_kernels.lightning.compile_check --dims 64 128 --dtype bf16 --arch 90

The tile sizes and num_warps are those `lightning_fwd`/`lightning_bwd` would pick (see
`lmstack_kernels.common.compile_check`). A development tool: nothing imports it.
"""

from __future__ import annotations

from lmstack_kernels.common.compile_check import main as compile_main

BT = 64  # the op's default chunk_size


def jobs(D: int, lowp: bool) -> list[tuple[object, dict, int]]:
    from lmstack_kernels.common.triton_utils import launch_opts, state_tiles
    from lmstack_kernels.lightning import triton_kernels as tk

    BK, BV = state_tiles(D, D)  # forward and dv: [K, V-tile]
    BVf, BKt = state_tiles(D, D)  # dq and dk: [K-tile, V]
    out = []
    for fn, bk, bv, extra in [
        (tk._fwd_kernel, BK, BV, {"USE_H0": True, "STORE_HT": True}),
        (tk._bwd_dq_kernel, BKt, BVf, {"USE_H0": True}),
        (tk._bwd_dk_kernel, BKt, BVf, {"USE_DHT": True, "STORE_DH0": True}),
        (tk._bwd_dv_kernel, BK, BV, {"USE_DHT": True}),
    ]:
        consts = dict(H=8, K=D, V=D, BT=BT, BK=bk, BV=bv, LOWP=lowp, **extra)
        out.append((fn, consts, launch_opts(max(bk, bv)).get("num_warps", 4)))
    return out


def main(argv: list[str] | None = None) -> None:
    compile_main(__doc__.split("\n\n")[0], jobs, {"g"}, argv)


if __name__ == "__main__":
    main()
