"""Benchmark of `delta_rule_attn`: forward, backward and forward+backward time and peak memory over T.

Methods (each where it can run):
- `triton`:      the DeltaNet Triton kernels (CUDA only);
- `torch_chunk`: the chunked PyTorch path of the same op (any device), gradients of q, k, v and β;
- `sdpa`:        torch `scaled_dot_product_attention`, causal, the softmax baseline of the same shapes;
- `fla_chunk_delta_rule`: flash-linear-attention's `chunk_delta_rule` (CUDA only, when `fla` is
                 importable).

Inputs as the mixer makes them: q, k L2-normalised per head, β = sigmoid(N(0, 1)). Writes
`benchmarks/results/deltanet_<device>.json` and a plot next to it; timing and memory as in
`op_bench.py`.

Examples:
    python benchmarks/bench_deltanet.py --T 512 1024 2048 4096 --tokens-per-batch 8192 --stat min \\
        --threads 1                                                               # CPU, shared host: read the *_cpu_ms fields
    python benchmarks/bench_deltanet.py --T 1024 4096 16384 65536 --tokens-per-batch 65536 --H 16 --D 128
"""

from __future__ import annotations

import op_bench
import torch
import torch.nn.functional as F

from lmstack_kernels.deltanet import delta_rule_attn


def make_inputs(B, T, H, D, dtype, device) -> list[torch.Tensor]:
    gen = torch.Generator(device="cpu").manual_seed(0)
    mk = lambda: torch.randn(B, T, H, D, generator=gen)
    q, k = (F.normalize(mk(), dim=-1) for _ in range(2))
    v, beta = mk(), torch.sigmoid(torch.randn(B, T, H, generator=gen))
    return [x.to(device=device, dtype=dtype).requires_grad_() for x in (q, k, v, beta)]


def main(argv: list[str] | None = None) -> None:
    notes = {"inputs": "q, k L2-normalised N(0, 1) rows; beta = sigmoid(N(0, 1))"}
    op_bench.run_standard_methods(
        argv, __doc__.split("\n\n")[0], "lmstack_kernels.deltanet.delta_rule_attn", "deltanet",
        delta_rule_attn, ("fla.ops.delta_rule", "chunk_delta_rule"), make_inputs, notes,
    )  # fmt: skip


if __name__ == "__main__":
    main()
