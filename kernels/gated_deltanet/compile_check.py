"""Compile the Gated DeltaNet Triton kernels for a GPU target without a GPU, and report registers and spills.

    python -m lmstack_kernels.gated_deltanet.compile_check --dims 64 128 256 --dtype bf16 --arch 90

The tile sizes, block length and num_warps are those `gated_delta_rule_fwd`/`gated_delta_rule_bwd`
would pick; the forward kernel is compiled twice: as the forward and in its state-recomputing form
(see `lmstack_kernels.common.compile_check`). A development tool: nothing imports it.
"""

from __future__ import annotations

from lmstack_kernels.common.compile_check import main as compile_main
from lmstack_kernels.deltanet.compile_check import ARG_TYPES

FP32_ARGS = {"states", "dq", "dk", "dbeta", "dg"}  # the states and the per-V-tile gradient shares


def jobs(D: int, lowp: bool) -> list[tuple[object, dict, int]]:
    from lmstack_kernels.common.triton_utils import launch_opts
    from lmstack_kernels.deltanet.triton_kernels import tiles
    from lmstack_kernels.gated_deltanet import TRITON_CHUNK
    from lmstack_kernels.gated_deltanet import triton_kernels as tk

    BK, BV = tiles(D, D)
    forward = {"USE_H0": True, "STORE_O": True, "STORE_HT": True, "STORE_STATES": False}
    states = {"USE_H0": True, "STORE_O": False, "STORE_HT": False, "STORE_STATES": True}
    backward = {"USE_DHT": True, "STORE_DH0": True}
    return [
        (
            fn,
            dict(H=8, K=D, V=D, BT=TRITON_CHUNK, BK=BK, BV=BV, LOWP=lowp, **flags),
            launch_opts(BK)["num_warps"],
        )
        for fn, flags in ((tk._fwd_kernel, forward), (tk._fwd_kernel, states), (tk._bwd_kernel, backward))
    ]


def main(argv: list[str] | None = None) -> None:
    compile_main(__doc__.split("\n\n")[0], jobs, FP32_ARGS, argv, ARG_TYPES)


if __name__ == "__main__":
    main()
