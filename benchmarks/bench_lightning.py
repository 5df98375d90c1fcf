"""Benchmark of `lightning_attn`: forward, backward and forward+backward time and peak memory over T.

Methods (each where it can run):
- `triton`:      the Lightning Attention-2 Triton kernels (CUDA only);
- `torch_chunk`: the chunked PyTorch path of the same op (any device);
- `sdpa`:        torch `scaled_dot_product_attention`, causal (flash attention on GPU), the softmax
                 baseline of the same shapes;
- `fla_simple_gla`: flash-linear-attention's `chunk_simple_gla` with the same constant decay (CUDA
                 only, when `fla` is importable).

Writes `benchmarks/results/lightning_<device>.json` (device, versions, shapes, timings in ms, peak
memory in MiB, tokens/s of forward+backward) and a plot of tokens/s against T next to it; timing and
memory as in `op_bench.py`.

Examples:
    python benchmarks/bench_lightning.py --T 512 1024 2048 4096 --tokens-per-batch 8192 --stat min  # CPU
    python benchmarks/bench_lightning.py --T 1024 2048 4096 8192 16384 32768 65536 \\
        --tokens-per-batch 65536 --H 32 --D 128 --dtype bf16                                # GPU
"""

from __future__ import annotations

from collections.abc import Callable

import op_bench
import torch

from lmstack_kernels.lightning import lightning_attn

METHODS = ["triton", "torch_chunk", "sdpa", "fla_simple_gla"]


def alibi_decay(H: int) -> torch.Tensor:
    start = 2 ** (-8 / H)
    return -torch.tensor([start ** (i + 1) for i in range(H)])


def make_inputs(B, T, H, D, dtype, device) -> list[torch.Tensor]:
    g = torch.Generator(device="cpu").manual_seed(0)
    mk = lambda: (torch.randn(B, T, H, D, generator=g) * 0.5).to(device=device, dtype=dtype)
    return [mk().requires_grad_() for _ in range(3)]


def make_method(name: str, decay: torch.Tensor) -> Callable:
    """A function (q, k, v) -> o with q, k, v in [B, T, H, D]."""
    if name in ("triton", "torch_chunk"):
        backend = "triton" if name == "triton" else "torch"
        return lambda q, k, v: lightning_attn(q, k, v, decay.to(q.device), backend=backend)[0]
    if name == "sdpa":
        return op_bench.sdpa
    if name == "fla_simple_gla":
        from fla.ops.simple_gla import chunk_simple_gla

        def fla(q, k, v):
            B, T, H, _ = q.shape
            g = decay.to(q.device).view(1, 1, H).expand(B, T, H).contiguous()
            return chunk_simple_gla(q, k, v, g, scale=q.shape[-1] ** -0.5)[0]

        return fla
    raise ValueError(name)


def main(argv: list[str] | None = None) -> None:
    args = op_bench.parser(__doc__.split("\n\n")[0], METHODS, "lightning").parse_args(argv)
    decay = alibi_decay(args.H)
    notes = {"decay": "ALiBi slopes: log λ_h = -2^(-8(h+1)/H)"}
    op_bench.run(
        args, "lmstack_kernels.lightning.lightning_attn", "lightning",
        lambda name: make_method(name, decay),
        lambda name, device: op_bench.unavailable(name, device, "fla.ops.simple_gla"), make_inputs, notes,
    )  # fmt: skip


if __name__ == "__main__":
    main()
