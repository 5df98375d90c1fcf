"""Sequence parallelism through the CLI, as a user runs it: for each mixer, `lmstack train CONFIG`
in one process and `torchrun --nproc_per_node 2 -m lmstack.cli train CONFIG
parallel.sequence_parallel_size=2` on the same data, then the largest relative difference of their
per-step training losses (and of the validation loss), and the first step where it exceeds 1e-5.

    python benchmarks/sp_check.py                        # configs/tiny.yaml, 30 steps, every mixer
    python benchmarks/sp_check.py --steps 150 --mixers lightning,deltanet
    python benchmarks/sp_check.py --control --mixers lightning,gla   # one process against itself

Needs the config's prepared data (`lmstack prepare-data configs/tiny.yaml`). Writes
benchmarks/results/sp_check_cpu.json and prints one line per mixer.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
MIXERS = ["attention", "swa", "moh", "lightning", "gla", "deltanet"]
# swa's default window (512) covers configs/tiny.yaml's 256 tokens: a window of 64 reaches across the
# cut between the two slices of 128 tokens without covering the row.
MIXER_OVERRIDES = {"swa": ['model.mixer_options={"swa": {"window": 64}}']}


def train(config: str, run_dir: Path, overrides: list[str], nproc: int) -> None:
    cli = ["-m", "lmstack.cli", "train", config, f"train.run_dir={run_dir}", *overrides]
    if nproc > 1:
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node",
            str(nproc),
            "--standalone",
            *cli,
        ]
    else:
        cmd = [sys.executable, *cli]
    env = dict(os.environ, OMP_NUM_THREADS=str(max(1, (os.cpu_count() or 2) // nproc)))
    res = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    if res.returncode != 0:
        sys.exit(f"sp_check: {' '.join(cmd)} failed:\n{res.stderr[-3000:]}")


def read_losses(run_dir: Path) -> tuple[dict[int, float], list[float]]:
    from lmstack.train.metrics import read_metrics

    metrics = read_metrics(run_dir)
    return {r["step"]: r["loss"] for r in metrics["train"]}, [r["val_loss"] for r in metrics["val"]]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="configs/tiny.yaml")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--mixers", default=",".join(MIXERS))
    p.add_argument(
        "--control",
        action="store_true",
        help="compare against one process with half the micro-batch instead (the same maths summed in "
        "another order: how far fp32 rounding alone moves the losses)",
    )
    p.add_argument(
        "--out", default=None, help="default: results/sp_check_cpu.json (--control: sp_control_cpu.json)"
    )
    args = p.parse_args()
    out = args.out or str(
        REPO / "benchmarks" / "results" / ("sp_control_cpu.json" if args.control else "sp_check_cpu.json")
    )
    import torch

    base = [
        f"train.max_steps={args.steps}",
        f"train.eval_every={args.steps}",
        "train.save_every=1000000",
        "train.log_every=1",
    ]
    if args.control:  # the same sums in another order: half the micro-batch, twice the accumulation
        from lmstack.config import load_config

        half = load_config(args.config, base).train.micro_batch_size // 2
        second, nproc = [f"train.micro_batch_size={half}"], 1
    else:
        second, nproc = ["parallel.sequence_parallel_size=2"], 2
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for mixer in args.mixers.split(","):
            start = time.perf_counter()
            overrides = [*base, f"model.mixer={mixer}", *MIXER_OVERRIDES.get(mixer, [])]
            one, sp = Path(tmp) / f"{mixer}-one", Path(tmp) / f"{mixer}-sp"
            train(args.config, one, overrides, 1)
            train(args.config, sp, [*overrides, *second], nproc)
            (loss_one, val_one), (loss_sp, val_sp) = read_losses(one), read_losses(sp)
            if sorted(loss_one) != sorted(loss_sp) or len(loss_one) == 0:
                sys.exit(f"sp_check: {mixer}: logged steps differ: {sorted(loss_one)} vs {sorted(loss_sp)}")
            per_step = {s: abs(loss_sp[s] - loss_one[s]) / abs(loss_one[s]) for s in sorted(loss_one)}
            rel = max(per_step.values())
            beyond = [s for s, r in per_step.items() if r > 1e-5]
            val_rel = max((abs(b - a) / abs(a) for a, b in zip(val_one, val_sp)), default=None)
            row = {
                "mixer": mixer,
                "steps_logged": len(loss_one),
                "max_rel_loss_diff": rel,
                "first_step_beyond_1e-5": beyond[0] if beyond else None,
                "rel_loss_diff_per_step": per_step,
                "val_rel_diff": val_rel,
                "first_loss": loss_one[min(loss_one)],
                "last_loss": loss_one[max(loss_one)],
                "seconds": round(time.perf_counter() - start, 1),
            }
            rows.append(row)
            print(
                f"{mixer:>10}: {row['steps_logged']} steps, max rel. loss difference {rel:.1e} "
                f"(first step beyond 1e-5: {row['first_step_beyond_1e-5']}), "
                f"validation {val_rel:.1e}, loss {row['first_loss']:.3f} -> {row['last_loss']:.3f} "
                f"({row['seconds']:.0f} s)",
                flush=True,
            )
    result = {
        "command": "python benchmarks/sp_check.py " + " ".join(sys.argv[1:]),
        "config": args.config,
        "second_run": "one process, half the micro-batch"
        if args.control
        else "2 ranks, sequence_parallel_size=2",
        "steps": args.steps,
        "rows": rows,
        "torch": torch.__version__,
        "device": f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores), gloo",
    }
    Path(out).write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
