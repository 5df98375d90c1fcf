"""Compile an op's Triton kernels for a GPU target without a GPU, and report registers and spills.

Each op's `compile_check.py` lists its kernels (with the tile sizes and num_warps its launcher would
pick) and calls `main`. Every kernel is lowered through TTIR -> TTGIR -> LLVM -> PTX -> cubin with
triton's bundled ptxas, so type errors and unsupported constructs that the CPU interpreter accepts
show up here. TRITON_INTERPRET must be unset. A development tool: nothing imports it.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import tempfile
from collections.abc import Callable

FP32_ARGS = {"h0", "ht", "dht", "dh0"}  # states are always fp32


def _ptxas_report(ptx: str, arch: int) -> str:
    import triton

    bin_dir = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
    ptxas = next((os.path.join(bin_dir, n) for n in ("ptxas-blackwell", "ptxas") if os.path.exists(os.path.join(bin_dir, n))), None)  # fmt: skip
    if ptxas is None:
        return "ptxas not found"
    gpu = f"sm_{arch}a" if arch >= 90 else f"sm_{arch}"
    with tempfile.NamedTemporaryFile("w", suffix=".ptx") as f:
        f.write(ptx)
        f.flush()
        out = subprocess.run([ptxas, "-v", "--gpu-name", gpu, f.name, "-o", os.devnull],
                             capture_output=True, text=True).stderr  # fmt: skip
    regs = re.findall(r"Used (\d+) registers", out)
    spills = re.findall(r"(\d+) bytes spill stores", out)
    return f"registers {regs[0] if regs else '?'}, spill stores {spills[0] if spills else '?'} B"


def main(
    description: str,
    jobs: Callable[[int, bool], list[tuple[object, dict, int]]],
    fp32_args: set[str] = frozenset(),
    argv: list[str] | None = None,
    arg_types: dict[str, str] | None = None,
) -> None:
    """`jobs(D, lowp)` -> [(kernel, constexprs, num_warps)] for head dims K = V = D; pointer
    arguments are fp32 when named in FP32_ARGS or `fp32_args`, else of --dtype; `arg_types` names
    the type of any other argument (e.g. {"TT": "i32"})."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--dims", type=int, nargs="+", default=[64, 128], help="head dims (K = V)")
    p.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], default="bf16")
    p.add_argument("--arch", type=int, default=90, help="CUDA compute capability, e.g. 80, 90")
    args = p.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise SystemExit("unset TRITON_INTERPRET: the interpreter does not compile")
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    for D in args.dims:
        for fn, consts, num_warps in jobs(D, args.dtype != "fp32"):
            types = {"cu": "*i32", "scale": "fp32"} | (arg_types or {})
            sig = {
                n: "constexpr" if n in consts else types[n] if n in types
                else "*fp32" if n in FP32_ARGS | fp32_args else f"*{args.dtype}"
                for n in fn.arg_names
            }  # fmt: skip
            kernel = triton.compile(
                ASTSource(fn=fn, signature=sig, constexprs=consts),
                target=GPUTarget("cuda", args.arch, 32),
                options={"num_warps": num_warps},
            )
            tiles = " ".join(f"{n}={consts[n]}" for n in ("BK", "BV", "BKS") if n in consts)
            print(
                f"D={D} {args.dtype} {fn.__name__}: {tiles} num_warps={num_warps}: compiled; "
                f"{_ptxas_report(kernel.asm['ptx'], args.arch)}"
            )
