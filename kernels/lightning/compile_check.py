"""Compile the Triton kernels for a GPU target without a GPU, and report registers and spills.

    python -m lmstack_kernels.lightning.compile_check --dims 64 128 --dtype bf16 --arch 90

Lowers each kernel (the tile sizes and num_warps that `lightning_fwd`/`lightning_bwd` would pick)
through TTIR -> TTGIR -> LLVM -> PTX -> cubin with triton's bundled ptxas, so type errors and
unsupported constructs that the CPU interpreter accepts show up here. TRITON_INTERPRET must be unset.
A development tool: nothing imports it.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import tempfile

FP32_ARGS = {"h0", "ht", "dht", "dh0", "g"}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dims", type=int, nargs="+", default=[64, 128], help="head dims (K = V)")
    p.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], default="bf16")
    p.add_argument("--arch", type=int, default=90, help="CUDA compute capability, e.g. 80, 90")
    p.add_argument("--bt", type=int, default=64)
    args = p.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise SystemExit("unset TRITON_INTERPRET: the interpreter does not compile")
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from lmstack_kernels.lightning import triton_kernels as tk

    bin_dir = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
    ptxas = next((os.path.join(bin_dir, n) for n in ("ptxas-blackwell", "ptxas") if os.path.exists(os.path.join(bin_dir, n))), None)  # fmt: skip
    arch = f"sm_{args.arch}a" if args.arch >= 90 else f"sm_{args.arch}"
    for D in args.dims:
        BK, BV = tk._tiles(D, D)  # forward and dv: [K, V-tile]
        BVf, BKt = tk._tiles(D, D)  # dq and dk: [K-tile, V]
        lowp = args.dtype != "fp32"
        jobs = [
            (tk._fwd_kernel, BK, BV, {"USE_H0": True, "STORE_HT": True}),
            (tk._bwd_dq_kernel, BKt, BVf, {"USE_H0": True}),
            (tk._bwd_dk_kernel, BKt, BVf, {"USE_DHT": True, "STORE_DH0": True}),
            (tk._bwd_dv_kernel, BK, BV, {"USE_DHT": True}),
        ]
        for fn, bk, bv, extra in jobs:
            consts = dict(H=8, K=D, V=D, BT=args.bt, BK=bk, BV=bv, LOWP=lowp, **extra)
            sig = {
                n: "constexpr" if n in consts else "*i32" if n == "cu" else "fp32" if n == "scale"
                else "*fp32" if n in FP32_ARGS else f"*{args.dtype}"
                for n in fn.arg_names
            }  # fmt: skip
            num_warps = tk._launch_opts(max(bk, bv)).get("num_warps", 4)
            kernel = triton.compile(
                ASTSource(fn=fn, signature=sig, constexprs=consts),
                target=GPUTarget("cuda", args.arch, 32),
                options={"num_warps": num_warps},
            )
            info = "ptxas not found"
            if ptxas:
                with tempfile.NamedTemporaryFile("w", suffix=".ptx") as f:
                    f.write(kernel.asm["ptx"])
                    f.flush()
                    out = subprocess.run([ptxas, "-v", "--gpu-name", arch, f.name, "-o", os.devnull],
                                         capture_output=True, text=True).stderr  # fmt: skip
                regs = re.findall(r"Used (\d+) registers", out)
                spills = re.findall(r"(\d+) bytes spill stores", out)
                info = f"registers {regs[0] if regs else '?'}, spill stores {spills[0] if spills else '?'} B"
            print(
                f"D={D} {args.dtype} {fn.__name__}: BK={bk} BV={bv} num_warps={num_warps}: compiled; {info}"
            )


if __name__ == "__main__":
    main()
