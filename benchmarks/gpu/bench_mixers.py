"""Step `mixers_throughput`: training tokens/s, MFU and peak memory of a 350M model of each main mixer.

Each of THROUGHPUT_MIXERS (the mixers the project compares; each child imports, builds a 350M model
and compiles its kernels, ~half a minute, so the others wait for a later run) in turn as the mixer of all layers of the gpu-350m preset of
benchmarks/bench_train.py (d_model 1024, 24 layers, 16 heads, vocab 50304, B = 8, T = 2048, bf16
autocast, a plain AdamW loop; fewer timed steps to fit the suite's time), each in its own process
(`bench_train._spawn`, so peak memory is its own). MFU = tokens/s x the model's own
`flops_per_token(T)` (each mixer counts its own FLOPs) / the device's dense bf16 peak from
`lmstack.train.metrics.peak_flops` (989e12 FLOP/s for an H200, the datasheet figure; the suite's
measured matmul rate on the H200 is about 790e12, KINDS.md). `compile_s`: the children's warm-up
steps beyond as many median steps, summed. Dry run: a tiny model on CPU, no MFU.
"""

from __future__ import annotations

import argparse

import bench_train
import torch
from common import Report, step_args

from lmstack.model.mixers import MIXERS
from lmstack.train.metrics import peak_flops

THROUGHPUT_MIXERS = ("attention", "lightning", "gla", "deltanet", "gated_deltanet")
SHAPES = {
    "gpu": {**bench_train.PRESETS["gpu-350m"], "steps": 8, "warmup": 3},
    "dry": dict(d_model=64, n_layers=2, n_heads=2, vocab=256, seq=32, batch=2, steps=1, warmup=1),
}


def main() -> None:
    args = step_args(__doc__.split("\n\n")[0])
    device = torch.device("cpu" if args.dry_run else "cuda")
    shape = SHAPES["dry" if args.dry_run else "gpu"]
    peak = peak_flops(device, bf16=True, override=None)
    report = Report(
        "mixers_throughput", args, shape=shape, precision="fp32" if args.dry_run else "bf16 autocast",
        peak_flops=peak, mixers=[m for m in THROUGHPUT_MIXERS if m in MIXERS],
        timing="dry run: not a measurement" if args.dry_run else "median step after warm-up",
    )  # fmt: skip
    if peak is None:
        report.skip("mfu", f"no dense bf16 peak known for {report.data['device']}")
    names = list(report.data["mixers"])
    for name in sorted(set(THROUGHPUT_MIXERS) - set(MIXERS)):
        report.skip(name, "not a registered mixer")
    if args.dry_run:  # the path is the same for every mixer; on CPU one child process shows it works
        for name in names[1:]:
            report.skip(name, "dry run: only the first mixer runs (the same path for all)")
        names = names[:1]
    for name in names:
        try:
            r = bench_train._spawn(argparse.Namespace(**shape, mixer=name), "lmstack")
        except SystemExit as err:  # the child's stderr is already printed
            report.fail(f"{name}: {err}")
            continue
        r["mixer"] = name
        r["mfu"] = r["tokens_per_s"] * r["flops_per_token"] / peak if peak else None
        report.data["compile_s"] = round((report.data["compile_s"] or 0) + max(r["compile_s"], 0.0), 1)
        report.add(r)
        print(f"{name}: {r['tokens_per_s']:.0f} tok/s, MFU {r['mfu']}, {r.get('peak_cuda_alloc_gib')} GiB")


if __name__ == "__main__":
    main()
