"""How far sequence parallelism's fp32 gradients are from exact, next to one process's: train `--steps`
steps of CONFIG in one process, then on the next batch compute the loss gradient three ways: one
process in fp32, one process in fp64 (the reference), and 2 sequence-parallel ranks in fp32 (gloo).
Prints (and adds to benchmarks/results/sp_precision_cpu.json) the relative RMSE against fp64 of each
fp32 run's logits, of all its gradients flattened, and of its worst parameter's gradient.

    python benchmarks/sp_precision.py --mixer lightning --steps 6      # configs/tiny.yaml

Used to tell a state-passing error (the parallel run far from fp64, the single one close) from fp32
rounding that training amplifies (both equally far). Needs the config's prepared data.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from sp_check import REPO, train  # this folder is on the path (run as a script, also by torchrun)

sys.path.insert(0, str(REPO / "tests"))
from helpers import rel_rmse  # noqa: E402  (the test suite's tolerance measure, as benchmarks/gpu uses)

OUT = REPO / "benchmarks" / "results" / "sp_precision_cpu.json"


def loss_and_grads(model, ids, labels, context, total_tokens: int):
    """(logits, flattened gradients) of the summed token cross-entropy over `total_tokens`."""
    import torch
    import torch.nn.functional as F

    model.zero_grad()
    logits = model(ids, context).logits
    loss = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100, reduction="sum")
    (loss / total_tokens).backward()
    return logits.detach(), torch.cat([p.grad.flatten() for p in model.parameters()])


def worker(mixer: str, export: str, data: str, seq_len: int, batch_size: int, seed: int, step: int) -> None:
    """torchrun entry: rank r holds columns [rT/2, (r+1)T/2) of the batch after `step` batches."""
    import torch
    import torch.distributed as dist

    import lmstack_kernels.common.checks as checks
    from lmstack.data.reader import TrainReader
    from lmstack.eval.loading import load_model
    from lmstack.model import BatchContext
    from lmstack.parallel import build_layout

    checks.DTYPES = (*checks.DTYPES, torch.float64)  # the ops' chunked paths compute in fp64 too
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    sp = build_layout(rank, world, world).sequence
    reader = TrainReader(data, seq_len, batch_size, seed=seed)
    for _ in range(step):
        reader.next_batch()
    batch = reader.next_batch()
    model = load_model(export, hf=False, device="cpu").model.train()
    total = int((batch.labels != -100).sum())
    n = seq_len // world
    cols = slice(rank * n, (rank + 1) * n)
    context = BatchContext.for_slice(batch.doc_ids, cols.start, cols.stop)
    context.sequence_parallel = sp
    logits, grads = loss_and_grads(model, batch.input_ids[:, cols], batch.labels[:, cols], context, total)
    dist.all_reduce(grads, group=sp.group)
    pieces = [torch.empty_like(logits) for _ in range(world)]
    dist.all_gather(pieces, logits, group=sp.group)
    if rank == 0:
        full = BatchContext.from_doc_ids(batch.doc_ids)
        one = loss_and_grads(model, batch.input_ids, batch.labels, full, total)
        exact = loss_and_grads(copy.deepcopy(model).double(), batch.input_ids, batch.labels, full, total)
        names = [name for name, _ in model.named_parameters()]
        sizes = [p.numel() for p in model.parameters()]
        report = {"mixer": mixer, "after_steps": step}
        for label, (lg, gr) in (("one_process", one), ("sequence_parallel", (torch.cat(pieces, 1), grads))):
            per_param = {n: rel_rmse(a, b) for n, a, b in zip(names, gr.split(sizes), exact[1].split(sizes))}
            worst = max(per_param, key=per_param.get)
            report[label] = {
                "logits": rel_rmse(lg, exact[0]),
                "gradients": rel_rmse(gr, exact[1]),
                "worst_parameter": worst,
                "worst_parameter_error": per_param[worst],
            }
            print(
                f"{label:>17} fp32 vs fp64: logits {report[label]['logits']:.1e}, all gradients "
                f"{report[label]['gradients']:.1e}, worst parameter {worst} {per_param[worst]:.1e}"
            )
        results = (
            json.loads(OUT.read_text()) if OUT.is_file() else {"note": __doc__.splitlines()[0], "runs": []}
        )
        runs = [r for r in results["runs"] if (r["mixer"], r["after_steps"]) != (mixer, step)]
        results["runs"] = sorted([*runs, report], key=lambda r: (r["mixer"], r["after_steps"]))
        results["torch"] = torch.__version__
        OUT.write_text(json.dumps(results, indent=1) + "\n")
    dist.destroy_process_group()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="configs/tiny.yaml")
    p.add_argument("--mixer", default="lightning")
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--worker", nargs=7, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        mixer, export, data, *numbers = args.worker
        worker(mixer, export, data, *map(int, numbers))
        return
    from lmstack.config import load_config

    cfg = load_config(args.config, [f"model.mixer={args.mixer}"])
    with tempfile.TemporaryDirectory() as tmp:
        run, export = Path(tmp) / "run", Path(tmp) / "hf"
        overrides = [f"model.mixer={args.mixer}", f"train.max_steps={args.steps}"]
        overrides += [f"train.save_every={args.steps}", "train.eval_every=1000000"]
        train(args.config, run, overrides, 1)
        cmd = [sys.executable, "-m", "lmstack.cli", "export", str(run), str(export)]
        subprocess.run(cmd, cwd=REPO, check=True, capture_output=True)
        # Each rank reads the whole global batch of one process and keeps its columns.
        batch = cfg.train.global_batch_size
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node",
            "2",
            "--standalone",
            __file__,
        ]
        cmd += ["--worker", args.mixer, str(export), cfg.data.path]
        cmd += [str(v) for v in (cfg.data.seq_len, batch, cfg.data.seed, args.steps)]
        subprocess.run(cmd, cwd=REPO, check=True, env=dict(os.environ, OMP_NUM_THREADS="1"))


if __name__ == "__main__":
    main()
