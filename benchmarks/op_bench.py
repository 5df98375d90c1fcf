"""Shared machinery of the op benchmarks (`bench_lightning.py`, `bench_gla.py`, `bench_deltanet.py`): timing, peak memory,
the JSON record and the plot. An op's script supplies its methods and inputs and calls `run`.

Timing: medians (or `--stat min`) over `--reps` runs after `--warmup` runs (CUDA: events around each
call after a synchronize; CPU: perf_counter). Peak memory: CUDA `max_memory_allocated` above what was
allocated before the call; CPU: the peak of tensor storages allocated during the call (tracked with a
TorchDispatchMode in a separate, untimed run), inputs excluded. The 1-minute load average before and
after is recorded: on a shared host, timings are only as good as its idle time.
"""

from __future__ import annotations

import argparse
import importlib
import json
import math
import os
import platform
import re
import statistics
import time
import weakref
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
RESULTS = Path(__file__).resolve().parent / "results"


class CPUPeakMemory(TorchDispatchMode):
    """Peak bytes of CPU tensor storages created by ops run under this mode (inputs excluded)."""

    def __init__(self, exclude: list[torch.Tensor]) -> None:
        super().__init__()
        self.exclude = {t.untyped_storage().data_ptr() for t in exclude}
        self.refs: dict[int, list[int]] = {}
        self.live = self.peak = 0

    def _release(self, key: int) -> None:
        entry = self.refs.get(key)
        if entry is None:
            return
        entry[0] -= 1
        if entry[0] == 0:
            self.live -= entry[1]
            del self.refs[key]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if not isinstance(t, torch.Tensor) or t.device.type != "cpu":
                continue
            storage = t.untyped_storage()
            key = storage.data_ptr()
            if key == 0 or key in self.exclude:
                continue
            if key in self.refs:
                self.refs[key][0] += 1
            else:
                self.refs[key] = [1, storage.nbytes()]
                self.live += storage.nbytes()
                self.peak = max(self.peak, self.live)
            weakref.finalize(t, self._release, key)
        return out


def sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *_) -> torch.Tensor:
    """Causal softmax attention on [B, T, H, D] (flash attention on GPU): the baseline of every op."""
    o = F.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True
    )
    return o.transpose(1, 2)


def host_note(load_before: float, load_after: float) -> str:
    """How far to trust the timings, from the 1-minute load averages around the run."""
    cores = os.cpu_count() or 1
    if max(load_before, load_after) < 1.5:
        return f"quiet (load average below 1.5 on {cores} cores)"
    return (
        f"not quiet: load average {load_before}-{load_after} on {cores} cores from other processes; "
        "wall-clock times are inflated and noisy, CPU times (*_cpu_ms) less so"
    )


def unavailable(name: str, device: torch.device, fla_module: str) -> str | None:
    """Why method `name` cannot run here (None: it can): "triton" and "fla_*" methods need CUDA (the
    Triton interpreter on CPU is for tests, not timing), triton, and for "fla_*" `fla_module`."""
    if name != "triton" and not name.startswith("fla_"):
        return None
    if device.type != "cuda":
        return "needs a CUDA device (the Triton interpreter on CPU is for tests, not timing)"
    from lmstack_kernels.common.triton_utils import HAS_TRITON

    if not HAS_TRITON:
        return "triton is not installed"
    if name.startswith("fla_"):
        try:
            __import__(fla_module)
        except Exception as err:  # noqa: BLE001
            return f"fla not importable ({type(err).__name__})"
    return None


def timer(
    device: torch.device, fn: Callable[[], object], pre: Callable[[], object] | None, warmup, reps, stat
) -> tuple[float, float | None]:
    """Median (or min) ms of fn() (pre() runs untimed before each call): wall-clock, and on CPU also
    this process's CPU time (all threads), which other processes on a shared host disturb less."""
    times, cpu_times = [], []
    for i in range(warmup + reps):
        arg = pre() if pre is not None else None
        if device.type == "cuda":
            torch.cuda.synchronize()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn(arg)
            end.record()
            torch.cuda.synchronize()
            ms = start.elapsed_time(end)
        else:
            t0, c0 = time.perf_counter(), time.process_time()
            fn(arg)
            ms = (time.perf_counter() - t0) * 1e3
            cpu_times.append((time.process_time() - c0) * 1e3)
        if i >= warmup:
            times.append(ms)
    pick = min if stat == "min" else statistics.median
    return pick(times), (pick(cpu_times[warmup:]) if cpu_times else None)


def peak_mib(device: torch.device, fn: Callable[[], object], inputs: list[torch.Tensor]) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - base) / 2**20
    mode = CPUPeakMemory(inputs)
    with mode:
        fn()
    return mode.peak / 2**20


def measure(
    fn: Callable[[], torch.Tensor],
    params: list[torch.Tensor],
    do: torch.Tensor,
    tokens: int,
    device,
    warmup,
    reps,
    stat,
) -> dict:
    """Forward (no grad), backward and forward+backward times of `fn() -> o` and their peak memory;
    `params` are the leaves that take gradients, `do` the gradient of o, `tokens` the tokens per call."""

    def forward(_=None):
        with torch.no_grad():
            return fn()

    def make_graph():
        for x in params:
            x.grad = None
        return fn()

    def fwd_bwd(_=None):
        make_graph().backward(do)

    row = {}
    for name, call, pre in (
        ("fwd", forward, None),
        ("bwd", lambda o: o.backward(do), make_graph),
        ("fwdbwd", fwd_bwd, None),
    ):
        row[f"{name}_ms"], cpu_ms = timer(device, call, pre, warmup, reps, stat)
        if cpu_ms is not None:
            row[f"{name}_cpu_ms"] = cpu_ms
    row["fwd_peak_mib"] = peak_mib(device, forward, [*params, do])
    row["fwdbwd_peak_mib"] = peak_mib(device, fwd_bwd, [*params, do])
    row["fwd_tokens_per_s"] = tokens / (row["fwd_ms"] / 1e3)
    row["fwdbwd_tokens_per_s"] = tokens / (row["fwdbwd_ms"] / 1e3)
    return row


def device_tag(device: torch.device) -> str:
    if device.type != "cuda":
        return "cpu"
    return re.sub(r"[^a-z0-9]+", "-", torch.cuda.get_device_name(device).lower()).strip("-")


def plot(result: dict, path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plot")
        return
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for method in dict.fromkeys(r["method"] for r in result["results"]):
        rows = sorted((r for r in result["results"] if r["method"] == method), key=lambda r: r["T"])
        ax.plot([r["T"] for r in rows], [r["fwdbwd_tokens_per_s"] for r in rows], marker="o", label=method)
    s = result["shape"]
    batch = f"{s['tokens_per_batch']} tokens/batch" if s.get("tokens_per_batch") else f"B={s['B']}"
    ax.set(xscale="log", yscale="log", xlabel="sequence length T", ylabel="tokens/s (forward+backward)")
    op = result["op"].rsplit(".", 1)[-1]
    ax.set_title(f"{op}, {result['device']}: {batch}, H={s['H']}, D={s['D']}, {s['dtype']}", fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"wrote {path}")


def parser(description: str, methods: list[str], tag: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--T", type=int, nargs="+", default=[256, 512, 1024, 2048])
    p.add_argument("--B", type=int, default=1, help="batch size (ignored with --tokens-per-batch)")
    p.add_argument("--tokens-per-batch", type=int, default=None, help="B = tokens_per_batch // T for each T")
    p.add_argument("--H", type=int, default=4)
    p.add_argument("--D", type=int, default=64, help="head dim (K = V = D)")
    p.add_argument("--dtype", choices=list(DTYPES), default=None, help="default: bf16 on CUDA, fp32 on CPU")
    p.add_argument("--methods", nargs="+", default=methods)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument(
        "--stat", choices=["median", "min"], default="median", help="min: for a shared, noisy host"
    )
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", type=Path, default=None, help=f"default: benchmarks/results/{tag}_<device>.json")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    return p


def run(
    args: argparse.Namespace,
    op: str,
    tag: str,
    make_method: Callable[[str], Callable],
    unavailable: Callable[[str, torch.device], str | None],
    make_inputs: Callable[[int, int, int, int, torch.dtype, torch.device], list[torch.Tensor]],
    notes: dict,
) -> dict:
    """Benchmark every method at every T; write `results/<tag>_<device>.json` and its plot.

    make_inputs(B, T, H, D, dtype, device) -> leaf tensors with requires_grad (the method's
    arguments). The JSON also records, per method, the forward+backward cost per token at the
    longest T over that at the shortest (1.0: it does not grow with T), from wall-clock and (CPU)
    from CPU time."""
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtype_name = args.dtype or ("bf16" if device.type == "cuda" else "fp32")
    dtype = DTYPES[dtype_name]
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    result = {
        "op": op,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)",
        "torch": torch.__version__,
        "triton": triton_version,
        "python": platform.python_version(),
        "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "shape": {"B": args.B, "tokens_per_batch": args.tokens_per_batch, "H": args.H, "D": args.D, "dtype": dtype_name},
        **notes,
        "timing": f"{args.stat} of {args.reps} runs after {args.warmup} warmup; ms",
        "skipped": {},
        "results": [],
    }  # fmt: skip
    if hasattr(os, "getloadavg"):
        result["load_avg_1min_before"] = round(os.getloadavg()[0], 2)
    for name in args.methods:
        why = unavailable(name, device)
        if why:
            result["skipped"][name] = why
            print(f"skip {name}: {why}")
            continue
        fn = make_method(name)
        for T in args.T:
            B = max(1, args.tokens_per_batch // T) if args.tokens_per_batch else args.B
            inputs = make_inputs(B, T, args.H, args.D, dtype, device)
            do = torch.randn_like(inputs[2])
            row = {"method": name, "B": B, "T": T}
            try:
                call = lambda fn=fn, inputs=inputs: fn(*inputs)
                row |= measure(call, inputs, do, B * T, device, args.warmup, args.reps, args.stat)
            except torch.OutOfMemoryError:
                row["error"] = "out of memory"
                torch.cuda.empty_cache()
            result["results"].append(row)
            print(json.dumps({k: (round(v, 3) if isinstance(v, float) else v) for k, v in row.items()}))
    ok = [r for r in result["results"] if "error" not in r and math.isfinite(r["fwdbwd_ms"])]
    for key in ("fwdbwd_ms", "fwdbwd_cpu_ms"):
        ratios = {}
        for method in dict.fromkeys(r["method"] for r in ok):
            rows = sorted((r for r in ok if r["method"] == method and key in r), key=lambda r: r["T"])
            if len(rows) > 1:
                per_token = [r[key] / (r["B"] * r["T"]) for r in (rows[0], rows[-1])]
                ratios[method] = round(per_token[1] / per_token[0], 3)
        if ratios:
            result[f"{key[:-3]}_per_token_longest_over_shortest_T"] = ratios
    if hasattr(os, "getloadavg"):
        result["load_avg_1min_after"] = round(os.getloadavg()[0], 2)
        result["host"] = host_note(result["load_avg_1min_before"], result["load_avg_1min_after"])
    out = args.out or RESULTS / f"{tag}_{device_tag(device)}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")
    if ok:
        plot(result | {"results": ok}, out.with_suffix(".png"))
    return result


def run_standard_methods(
    argv: list[str] | None,
    description: str,
    op: str,
    tag: str,
    attn: Callable,
    fla: tuple[str, str],
    make_inputs: Callable[[int, int, int, int, torch.dtype, torch.device], list[torch.Tensor]],
    notes: dict,
) -> dict:
    """`run` for an op with one input x besides q, k, v, called attn(q, k, v, x, backend=…) -> (o, …).

    Methods: "triton" and "torch_chunk" (the op's two backends), "sdpa", and "fla_<name>" for
    fla = (module, name): fla's function, called (q, k, v, x, scale=K^-1/2)."""
    fla_module, fla_name = fla

    def make_method(name: str) -> Callable:
        if name in ("triton", "torch_chunk"):
            backend = "triton" if name == "triton" else "torch"
            return lambda q, k, v, x: attn(q, k, v, x, backend=backend)[0]
        if name == "sdpa":
            return sdpa
        if name == f"fla_{fla_name}":
            fn = getattr(importlib.import_module(fla_module), fla_name)
            return lambda q, k, v, x: fn(q, k, v, x, scale=q.shape[-1] ** -0.5)[0]
        raise ValueError(name)

    args = parser(description, ["triton", "torch_chunk", "sdpa", f"fla_{fla_name}"], tag).parse_args(argv)
    return run(
        args,
        op,
        tag,
        make_method,
        lambda name, device: unavailable(name, device, fla_module),
        make_inputs,
        notes,
    )
