"""Benchmark of `gla_attn`: forward, backward and forward+backward time and peak memory over T.

Methods (each where it can run):
- `triton`:      the GLA Triton kernels (CUDA only);
- `torch_chunk`: the chunked PyTorch path of the same op (any device), gradients of q, k, v and g;
- `sdpa`:        torch `scaled_dot_product_attention`, causal, the softmax baseline of the same shapes;
- `fla_chunk_gla`: flash-linear-attention's `chunk_gla` (CUDA only, when `fla` is importable).

Gates as the mixer makes them: g = logsigmoid(x) / 16, x ~ N(0, 1). Writes
`benchmarks/results/gla_<device>.json` and a plot next to it; timing and memory as in `op_bench.py`.

Examples:
    python benchmarks/bench_gla.py --T 512 1024 2048 4096 --tokens-per-batch 8192 --stat min   # CPU
    python benchmarks/bench_gla.py --T 1024 4096 16384 65536 --tokens-per-batch 65536 --H 16 --D 128
"""

from __future__ import annotations

import op_bench
import torch
import torch.nn.functional as F

from lmstack_kernels.gla import gla_attn


def make_inputs(B, T, H, D, dtype, device) -> list[torch.Tensor]:
    gen = torch.Generator(device="cpu").manual_seed(0)
    mk = lambda: torch.randn(B, T, H, D, generator=gen)
    q, k, v = (mk() * 0.5 for _ in range(3))
    g = F.logsigmoid(mk()) / 16
    return [x.to(device=device, dtype=dtype).requires_grad_() for x in (q, k, v, g)]


def main(argv: list[str] | None = None) -> None:
    notes = {"gates": "g = logsigmoid(N(0, 1)) / 16"}
    op_bench.run_standard_methods(
        argv, __doc__.split("\n\n")[0], "lmstack_kernels.gla.gla_attn", "gla",
        gla_attn, ("fla.ops.gla", "chunk_gla"), make_inputs, notes,
    )  # fmt: skip


if __name__ == "__main__":
    main()
