"""The kernel resource check: compile every Triton kernel variant the launchers can pick for a GPU
target without a GPU, exactly as the JIT would, and fail where one would not launch or spills past
a stated budget.

    python -m lmstack_kernels.common.compile_check                 # the full matrix, 2 processes
    python -m lmstack_kernels.common.compile_check --ops lightning --dims 256 --archs 90 --out DIR

"As the JIT would": the signature's pointer (and `TT`-like integer) arguments carry the
divisibility-16 hint the JIT passes for 16-byte-aligned tensors; tiles, block lengths, num_warps,
num_stages and ptxas options come from each op's `launch_configs`, the same function its launcher
calls; Triton's own ptxas (the one `triton.compile` runs for that arch) reports registers and spill
stores (its `-v` log), and shared memory is the compiled kernel's `metadata.shared` (what the launch compares with the
device's limit before raising `OutOfResources`). Every run compiles into a fresh cache directory:
nothing cached can hide a regression (and a cache hit would skip ptxas).

Registry: `OPS` maps an op to the module that lists its kernels (`<op>/compile_check.py`, with
`variants(K, V, lowp, arch)`, `FP32_ARGS` and optionally `ARG_TYPES`, `INT_HINTS` and
`SHAPES(D) -> [(K, V)]`); adding an op is one `OPS` entry and that module.

TRITON_INTERPRET must be unset (the interpreter does not compile); the pytest runs this in a
subprocess. Results: a table on stdout, and `kernel_resources.json` / `.md` in --out (with --update, the
rows checked now replace theirs in the existing table, and its command records both runs).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import io
import json
import os
import re
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

OPS = {
    "lightning": "lmstack_kernels.lightning.compile_check",
    "gla": "lmstack_kernels.gla.compile_check",
    "deltanet": "lmstack_kernels.deltanet.compile_check",
    "gated_deltanet": "lmstack_kernels.gated_deltanet.compile_check",
}
DIMS = (32, 64, 128, 256)
DTYPES = ("fp32", "bf16")
ARCHS = (90, 80)
# Shared memory per block with the opt-in (CUDA C Programming Guide, "Technical Specifications per
# Compute Capability"): 227 KB on 9.0 (H100/H200), 163 KB on 8.0 (A100).
SMEM_LIMIT = {90: 227 * 1024, 80: 163 * 1024}
# Spill stores per thread above which a variant fails: a regression alarm, not a target (the table
# shows every spill). 16 KB: local-memory traffic of that size per thread dominates these kernels.
SPILL_BUDGET = 16 * 1024
STATE_ARGS = {"h0", "ht", "dht", "dh0"}  # states are always fp32


def split(cfg: dict) -> tuple[dict, dict]:
    """(constexprs, launch options) of one kernel's `launch_configs` entry."""
    options = {n: v for n, v in cfg.items() if n.startswith("num_") or n == "ptx_options"}
    return {n: v for n, v in cfg.items() if n not in options}, options


def _shapes(module, D: int) -> list[tuple[int, int]]:
    return getattr(module, "SHAPES", lambda d: [(d, d)])(D)


def _signature(module, fn, consts: dict, dtype: str) -> tuple[dict, dict]:
    """(signature, attrs) as the JIT builds them for aligned tensors: pointers of `dtype` (fp32 for
    states and the module's FP32_ARGS), i32 `cu`, fp32 `scale`; divisibility 16 on every pointer and
    on the integers named in INT_HINTS (the JIT hints an int divisible by 16)."""
    types = {"cu": "*i32", "scale": "fp32"} | getattr(module, "ARG_TYPES", {})
    fp32 = STATE_ARGS | getattr(module, "FP32_ARGS", set())
    sig = {
        n: "constexpr" if n in consts else types.get(n, "*fp32" if n in fp32 else f"*{dtype}")
        for n in fn.arg_names
    }
    hinted = set(getattr(module, "INT_HINTS", ()))
    attrs = {
        (i,): [["tt.divisibility", 16]]
        for i, n in enumerate(fn.arg_names)
        if n not in consts and (sig[n].startswith("*") or n in hinted)
    }
    return sig, attrs


def compile_variant(job: tuple[str, int, int, str, int, str]) -> dict:
    """Compile one kernel variant (op, K, V, dtype, arch, kernel name); its resources as a row."""
    op, K, V, dtype, arch, name = job
    import triton
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    module = importlib.import_module(OPS[op])
    (fn, consts, options), = [(f, c, o) for n, f, c, o in module.variants(K, V, dtype != "fp32", arch) if n == name]  # fmt: skip
    sig, attrs = _signature(module, fn, consts, dtype)
    row = {"op": op, "kernel": name, "K": K, "V": V, "dtype": dtype, "arch": arch}
    row.update({n: consts[n] for n in ("BT", "BK", "BV", "BKS") if n in consts})
    row.update(num_warps=options.get("num_warps", 4), num_stages=options.get("num_stages", 3))
    row.update(ptxas=options.get("ptx_options", "default"))
    log = io.StringIO()
    t0 = time.perf_counter()
    knobs.nvidia.dump_ptxas_log = True  # Triton prints its own ptxas -v log
    try:
        with contextlib.redirect_stdout(log):
            kernel = triton.compile(
                ASTSource(fn=fn, signature=sig, constexprs=consts, attrs=attrs),
                target=GPUTarget("cuda", arch, 32),
                options=options,
            )
    except Exception as e:  # a compile failure is a result of the check, not its end
        return row | {"error": f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"}
    text = log.getvalue()
    regs = re.findall(r"Used (\d+) registers", text)
    spills = re.findall(r"(\d+) bytes spill stores", text)
    return row | {
        "registers": int(regs[-1]) if regs else None,
        "spill_stores_B": int(spills[-1]) if spills else None,
        "shared_B": int(kernel.metadata.shared),
        "compile_s": round(time.perf_counter() - t0, 1),
    }


def problems(row: dict) -> list[str]:
    """Why a variant fails the check (empty: it passes)."""
    if "error" in row:
        return [f"does not compile: {row['error']}"]
    out = []
    if row["shared_B"] > SMEM_LIMIT[row["arch"]]:
        out.append(f"shared memory {row['shared_B']} B > sm_{row['arch']}'s {SMEM_LIMIT[row['arch']]} B")
    if row["spill_stores_B"] is None or row["registers"] is None:
        out.append("no ptxas register/spill report")
    elif row["spill_stores_B"] > SPILL_BUDGET:
        out.append(f"spill stores {row['spill_stores_B']} B > budget {SPILL_BUDGET} B")
    return out


def jobs(ops, dims, dtypes, archs) -> list[tuple]:
    out = []
    for op in ops:
        module = importlib.import_module(OPS[op])
        for D in dims:
            for K, V in _shapes(module, D):
                for dtype in dtypes:
                    for arch in archs:
                        names = [n for n, *_ in module.variants(K, V, dtype != "fp32", arch)]
                        out += [(op, K, V, dtype, arch, n) for n in names]
    return out


def _init_worker(cache: str) -> None:
    os.environ["TRITON_CACHE_DIR"] = cache


def run(ops=tuple(OPS), dims=DIMS, dtypes=DTYPES, archs=ARCHS, workers: int = 2) -> list[dict]:
    """Compile every variant in `workers` processes (fresh Triton cache); rows in job order."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise SystemExit("compile_check: unset TRITON_INTERPRET (the interpreter does not compile)")
    todo = jobs(ops, dims, dtypes, archs)
    with tempfile.TemporaryDirectory(prefix="lmstack-compile-check-") as cache:
        _init_worker(cache)
        with ProcessPoolExecutor(workers, initializer=_init_worker, initargs=(cache,)) as pool:
            rows = list(pool.map(compile_variant, todo))
    for row in rows:
        row["problems"] = problems(row)
    return rows


def table(rows: list[dict]) -> str:
    head = "| op | kernel | K | V | dtype | arch | BT | BK | BV | warps | stages | ptxas | regs | spills B | smem B | limit B | s | problems |"  # fmt: skip
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        cells = [r["op"], r["kernel"], r["K"], r["V"], r["dtype"], f"sm_{r['arch']}", r.get("BT", ""),
                 r.get("BK", ""), r.get("BV", ""), r["num_warps"], r["num_stages"], r.get("ptxas", "default"), r.get("registers", ""),
                 r.get("spill_stores_B", ""), r.get("shared_B", ""), SMEM_LIMIT[r["arch"]],
                 r.get("compile_s", ""), "; ".join(r["problems"])]  # fmt: skip
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    return "\n".join(lines)


def _updated(old: list[dict], new: list[dict]) -> list[dict]:
    """The rows of `old` with those checked again replaced by `new` (same place), new ones appended."""
    key = lambda r: (r["op"], r["kernel"], r["K"], r["V"], r["dtype"], r["arch"])  # noqa: E731
    fresh = {key(r): r for r in new}
    kept = [fresh.pop(key(r), r) for r in old]
    return kept + [r for r in new if key(r) in fresh]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ops", nargs="+", choices=sorted(OPS), default=list(OPS))
    p.add_argument("--dims", type=int, nargs="+", default=list(DIMS), help="head dims D (shapes per op)")
    p.add_argument("--dtypes", nargs="+", choices=DTYPES, default=list(DTYPES))
    p.add_argument("--archs", type=int, nargs="+", choices=ARCHS, default=list(ARCHS))
    p.add_argument("--workers", type=int, default=2, help="compile processes")
    p.add_argument("--out", type=Path, help="write kernel_resources.json and .md here")
    p.add_argument(
        "--update",
        action="store_true",
        help="with --out: replace only the rows checked now in the existing table (the others are kept)",
    )
    args = p.parse_args(argv)
    import triton

    t0 = time.perf_counter()
    rows = run(args.ops, args.dims, args.dtypes, args.archs, args.workers)
    md = table(rows)
    print(md)
    bad = [r for r in rows if r["problems"]]
    seconds = round(time.perf_counter() - t0, 1)
    print(f"\n{len(rows)} variants, {len(bad)} failing, {seconds} s with {args.workers} processes (triton {triton.__version__})")  # fmt: skip
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        command = "python -m lmstack_kernels.common.compile_check " + " ".join(argv or sys.argv[1:])
        if args.update and (args.out / "kernel_resources.json").exists():
            old = json.loads((args.out / "kernel_resources.json").read_text())
            command = f"{old['command']} && {command}"  # the commands that made the table, in order
            rows = _updated(old["results"], rows)
            md = table(rows)
        meta = {
            "command": command,
            "versions": {"triton": triton.__version__, "python": sys.version.split()[0]},
            "smem_limit_B": {f"sm_{a}": b for a, b in SMEM_LIMIT.items()},
            "spill_budget_B": SPILL_BUDGET,
            "seconds": seconds,
            "workers": args.workers,
            "device": "none (compiled for GPUTarget('cuda', arch, 32) without a GPU)",
        }
        (args.out / "kernel_resources.json").write_text(json.dumps(meta | {"results": rows}, indent=2) + "\n")
        (args.out / "kernel_resources.md").write_text(
            f"# Kernel resources (`{meta['command']}`)\n\ntriton {triton.__version__}; limits: {meta['smem_limit_B']}, "
            f"spill budget {SPILL_BUDGET} B per thread; no GPU (compiled for the target).\n\n{md}\n"
        )  # fmt: skip
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
