"""Benchmark of `lightning_attn`: forward, backward and forward+backward time and peak memory over T.

Methods (each where it can run):
- `triton`:      the Lightning Attention-2 Triton kernels (CUDA only);
- `torch_chunk`: the chunked PyTorch path of the same op (any device);
- `sdpa`:        torch `scaled_dot_product_attention`, causal (flash attention on GPU), the softmax
                 baseline of the same shapes;
- `fla_simple_gla`: flash-linear-attention's `chunk_simple_gla` with the same constant decay (CUDA
                 only, when `fla` is importable).

Writes `benchmarks/results/lightning_<device>.json` (device, versions, shapes, timings in ms, peak
memory in MiB, tokens/s of forward+backward) and a plot of tokens/s against T next to it.

Timing: medians (or `--stat min`) over `--reps` runs after `--warmup` runs (CUDA: events around each call after a
synchronize; CPU: perf_counter). Peak memory: CUDA `max_memory_allocated` above what was allocated
before the call; CPU: the peak of tensor storages allocated during the call (tracked with a
TorchDispatchMode in a separate, untimed run), inputs excluded.

Examples:
    python benchmarks/bench_lightning.py --T 256 512 1024 2048 --B 1 --H 4 --D 64          # CPU
    python benchmarks/bench_lightning.py --T 1024 2048 4096 8192 16384 32768 65536 \\
        --tokens-per-batch 65536 --H 32 --D 128 --dtype bf16                                # GPU
"""

from __future__ import annotations

import argparse
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

from lmstack_kernels.lightning import lightning_attn

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


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


def alibi_decay(H: int) -> torch.Tensor:
    start = 2 ** (-8 / H)
    return -torch.tensor([start ** (i + 1) for i in range(H)])


def make_method(name: str, decay: torch.Tensor) -> Callable | None:
    """A function (q, k, v) -> o with q, k, v in [B, T, H, D], or None where it cannot run."""
    if name == "triton":
        return lambda q, k, v: lightning_attn(q, k, v, decay, backend="triton")[0]
    if name == "torch_chunk":
        return lambda q, k, v: lightning_attn(q, k, v, decay, backend="torch")[0]
    if name == "sdpa":

        def sdpa(q, k, v):
            o = F.scaled_dot_product_attention(
                q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True
            )
            return o.transpose(1, 2)

        return sdpa
    if name == "fla_simple_gla":
        from fla.ops.simple_gla import chunk_simple_gla

        def fla(q, k, v):
            B, T, H, _ = q.shape
            g = decay.to(q.device).view(1, 1, H).expand(B, T, H).contiguous()
            return chunk_simple_gla(q, k, v, g, scale=q.shape[-1] ** -0.5)[0]

        return fla
    raise ValueError(name)


def unavailable(name: str, device: torch.device) -> str | None:
    """Why `name` cannot run here (None: it can)."""
    if name in ("triton", "fla_simple_gla") and device.type != "cuda":
        return "needs a CUDA device (the Triton interpreter on CPU is for tests, not timing)"
    if name == "triton":
        from lmstack_kernels.lightning import triton_kernels

        if not triton_kernels.HAS_TRITON:
            return "triton is not installed"
    if name == "fla_simple_gla":
        try:
            import fla.ops.simple_gla  # noqa: F401
        except Exception as err:  # noqa: BLE001
            return f"fla not importable ({type(err).__name__})"
    return None


def timer(
    device: torch.device, fn: Callable[[], object], pre: Callable[[], object] | None, warmup, reps, stat
):
    """Median (or min) ms of fn() (pre() runs untimed before each call)."""
    times = []
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
            t0 = time.perf_counter()
            fn(arg)
            ms = (time.perf_counter() - t0) * 1e3
        if i >= warmup:
            times.append(ms)
    return min(times) if stat == "min" else statistics.median(times)


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

    def fwd_bwd(_=None):
        for x in params:
            x.grad = None
        fn().backward(do)

    def make_graph():
        for x in params:
            x.grad = None
        return fn()

    row = {"fwd_ms": timer(device, forward, None, warmup, reps, stat)}
    row["bwd_ms"] = timer(device, lambda o: o.backward(do), make_graph, warmup, reps, stat)
    row["fwdbwd_ms"] = timer(device, fwd_bwd, None, warmup, reps, stat)
    row["fwd_peak_mib"] = peak_mib(device, forward, [*params, do])
    row["fwdbwd_peak_mib"] = peak_mib(device, fwd_bwd, [*params, do])
    row["fwd_tokens_per_s"] = tokens / (row["fwd_ms"] / 1e3)
    row["fwdbwd_tokens_per_s"] = tokens / (row["fwdbwd_ms"] / 1e3)
    return row


def bench_one(name, fn, device, B, T, H, D, dtype, warmup, reps, stat) -> dict:
    g = torch.Generator(device="cpu").manual_seed(0)
    mk = lambda: (torch.randn(B, T, H, D, generator=g) * 0.5).to(device=device, dtype=dtype)
    q, k, v = (mk().requires_grad_() for _ in range(3))
    row = {"method": name, "B": B, "T": T}
    row.update(measure(lambda: fn(q, k, v), [q, k, v], mk(), B * T, device, warmup, reps, stat))
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
    ax.set_title(
        f"lightning_attn, {result['device']}: {batch}, H={s['H']}, D={s['D']}, {s['dtype']}", fontsize=9
    )
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"wrote {path}")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--T", type=int, nargs="+", default=[256, 512, 1024, 2048])
    p.add_argument("--B", type=int, default=1, help="batch size (ignored with --tokens-per-batch)")
    p.add_argument("--tokens-per-batch", type=int, default=None, help="B = tokens_per_batch // T for each T")
    p.add_argument("--H", type=int, default=4)
    p.add_argument("--D", type=int, default=64, help="head dim (K = V = D)")
    p.add_argument("--dtype", choices=list(DTYPES), default=None, help="default: bf16 on CUDA, fp32 on CPU")
    p.add_argument("--methods", nargs="+", default=["triton", "torch_chunk", "sdpa", "fla_simple_gla"])
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument(
        "--stat", choices=["median", "min"], default="median", help="min: for a shared, noisy host"
    )
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument(
        "--out", type=Path, default=None, help="default: benchmarks/results/lightning_<device>.json"
    )
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtype_name = args.dtype or ("bf16" if device.type == "cuda" else "fp32")
    dtype = DTYPES[dtype_name]
    decay = alibi_decay(args.H).to(device)
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    result = {
        "op": "lmstack_kernels.lightning.lightning_attn",
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)",
        "torch": torch.__version__,
        "triton": triton_version,
        "python": platform.python_version(),
        "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "shape": {"B": args.B, "tokens_per_batch": args.tokens_per_batch, "H": args.H, "D": args.D, "dtype": dtype_name},
        "decay": "ALiBi slopes: log λ_h = -2^(-8(h+1)/H)",
        "timing": f"{args.stat} of {args.reps} runs after {args.warmup} warmup; ms",
        "skipped": {},
        "results": [],
    }  # fmt: skip
    if hasattr(os, "getloadavg"):  # timings on a shared host are only as good as its idle time
        result["load_avg_1min_before"] = round(os.getloadavg()[0], 2)
    for name in args.methods:
        why = unavailable(name, device)
        if why:
            result["skipped"][name] = why
            print(f"skip {name}: {why}")
            continue
        fn = make_method(name, decay)
        for T in args.T:
            B = max(1, args.tokens_per_batch // T) if args.tokens_per_batch else args.B
            try:
                row = bench_one(
                    name, fn, device, B, T, args.H, args.D, dtype, args.warmup, args.reps, args.stat
                )
            except torch.OutOfMemoryError:
                row = {"method": name, "B": B, "T": T, "error": "out of memory"}
                torch.cuda.empty_cache()
            result["results"].append(row)
            print(json.dumps({k: (round(v, 3) if isinstance(v, float) else v) for k, v in row.items()}))
    out = args.out or Path(__file__).resolve().parent / "results" / f"lightning_{device_tag(device)}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    ok = [r for r in result["results"] if "error" not in r and math.isfinite(r["fwdbwd_ms"])]
    if hasattr(os, "getloadavg"):
        result["load_avg_1min_after"] = round(os.getloadavg()[0], 2)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")
    if ok:
        plot(result | {"results": ok}, out.with_suffix(".png"))


if __name__ == "__main__":
    main()
