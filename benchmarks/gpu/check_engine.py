"""Step `engine`: the real path on one GPU, as a user runs it; with --compile-probe, step `compile_probe`.

1. `lmstack train` (DeepSpeed ZeRO-2, precision auto = bf16 on CUDA, one process, `train.compile=false`:
   what torch.compile costs is the probe's to measure, not this step's to pay) for 30 steps of
   configs/tiny.yaml's recipe with a hybrid mixer pattern (lightning, attention every 2nd layer, so
   the Triton kernels run inside the engine) on the corpus that prepare.sh tokenized into .gpu/data;
2. `lmstack export` of the last checkpoint (the exporter reloads it and compares logits);
3. greedy generation from the export through transformers (`AutoModelForCausalLM`,
   trust_remote_code), with and without the cache: the tokens must be equal.
--compile-probe: the same training with `train.compile=true` (every block torch.compiled) for
PROBE_STEPS steps, no eval, no export, stopped by itself before the step's cap (STEP_CAP_S, set by
suite.sh) so that what it measured is written: per-step times from metrics.jsonl and `compile_s`, the
first COMPILED_STEPS steps' time beyond as many steady steps (their median); fewer steps than that
give only a lower bound (`compile_s_is_lower_bound`).
Dry run: CPU (gloo, fp32), 2 steps of a tiny model on a small corpus it prepares in a temp folder
(the probe: an attention model, inductor on CPU).
"""

from __future__ import annotations

import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from common import REPO, Report, step_args

from lmstack.train.metrics import read_metrics

DATA = REPO / ".gpu" / "data"
MODEL = ["model.mixer=lightning", "model.attention_every=2"]
TRAIN = {
    "gpu": ["train.max_steps=30", "train.log_every=5", "train.eval_every=30", "train.eval_batches=4"],
    "dry": [
        "train.max_steps=2", "train.log_every=1", "train.eval_every=2", "train.eval_batches=1",
        "model.d_model=64", "model.n_layers=2", "model.vocab_size=512", "model.max_seq_len=64",
        "data.seq_len=64", "train.global_batch_size=4", "train.micro_batch_size=4",
    ],
}  # fmt: skip
COMMON = ["train.zero_stage=2", "train.precision=auto", "train.progress_bar=false", "train.tensorboard=false"]
PROBE_STEPS = {"gpu": 6, "dry": 3}
COMPILED_STEPS = 2  # steps that compile: the first (training graphs), the second (recompiles seen on CPU)
PROBE = ["train.compile=true", "train.log_every=1", "train.eval_batches=0", f"train.save_every={10**9}"]
PROBE_MARGIN_S = 20  # of the step's cap, kept for reading the metrics and writing the file
DRY_DATA = ["data.max_documents=12", "data.vocab_size=512", "data.seq_len=64"]


def lmstack(report: Report, what: str, *argv: str, timeout: float | None = None) -> bool:
    """Run `lmstack ARGV` in a child process; True if it succeeded (else a failure is recorded). After
    `timeout` seconds its process group is killed and `<what>_stopped_after_s` recorded (no failure)."""
    t0 = time.perf_counter()
    cmd = [sys.executable, "-m", "lmstack.cli", *argv]
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # its compile workers too
        stdout, stderr = proc.communicate()
        report.data[f"{what}_stopped_after_s"] = timeout
    print(stdout[-3000:], stderr[-3000:], sep="\n", flush=True)
    report.data[f"{what}_seconds"] = round(time.perf_counter() - t0, 1)
    if proc.returncode != 0 and f"{what}_stopped_after_s" not in report.data:
        last = (stderr.strip().splitlines() or ["(no output)"])[-1]
        report.fail(f"lmstack {what} exited {proc.returncode}: {last}")
    return proc.returncode == 0


def generate(export_dir: Path, device: torch.device, new_tokens: int) -> dict:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(export_dir, trust_remote_code=True).to(device).eval()
    tokenizer = AutoTokenizer.from_pretrained(export_dir)
    prompt = tokenizer("ROMEO:", return_tensors="pt").input_ids.to(device)
    kw = dict(max_new_tokens=new_tokens, do_sample=False, pad_token_id=tokenizer.eos_token_id)
    t0 = time.perf_counter()
    cached = model.generate(prompt, use_cache=True, **kw)
    seconds = time.perf_counter() - t0
    uncached = model.generate(prompt, use_cache=False, **kw)
    return {
        "new_tokens": cached.shape[1] - prompt.shape[1],
        "cached_equals_uncached": torch.equal(cached, uncached),
        "cached_generate_s": round(seconds, 3),
        "text": tokenizer.decode(cached[0, prompt.shape[1] :]),
    }


def compile_estimate(step_times: list[float]) -> dict:
    """Seconds the first COMPILED_STEPS steps took beyond as many steady steps (their median)."""
    first, rest = step_times[:COMPILED_STEPS], step_times[COMPILED_STEPS:]
    if not rest:  # no steady step: everything measured is a lower bound on compile + steps
        return {"compile_s": round(sum(first), 1), "compile_s_is_lower_bound": True}
    steady = statistics.median(rest)
    return {"compile_s": round(sum(first) - len(first) * steady, 1), "steady_step_s": steady}


def compile_probe(report: Report, data: Path, run_dir: Path, mode: str) -> None:
    cap = float(os.environ.get("STEP_CAP_S", 600))
    train = [s for s in TRAIN[mode] if not s.startswith(("train.max_steps", "train.log_every", "train.eval"))]
    model = ["model.mixer=attention"] if mode == "dry" else MODEL
    overrides = [
        *model,
        *train,
        *COMMON,
        *PROBE,
        f"train.max_steps={PROBE_STEPS[mode]}",
        f"train.run_dir={run_dir}",
    ]
    report.data["overrides"] = overrides
    report.data["limit_s"] = cap - PROBE_MARGIN_S
    lmstack(
        report,
        "train",
        "train",
        "configs/tiny.yaml",
        f"data.path={data}",
        *overrides,
        timeout=cap - PROBE_MARGIN_S,
    )
    records = read_metrics(run_dir).get("train", []) if (run_dir / "metrics.jsonl").exists() else []
    times = [r["step_time_s"] for r in records]
    if not times:
        estimate = {"compile_s": report.data["train_seconds"], "compile_s_is_lower_bound": True}
    else:
        estimate = compile_estimate(times)
    report.data["compile_s"] = estimate["compile_s"]
    report.add({"what": "train.compile=true", "steps": len(times), "step_times_s": times, **estimate})
    print(report.data["results"][-1], flush=True)


def main() -> None:
    args = step_args(__doc__.split("\n\n")[0], compile_probe="step compile_probe: train.compile=true")
    mode = "dry" if args.dry_run else "gpu"
    device = torch.device("cpu" if args.dry_run else "cuda")
    work = Path(tempfile.mkdtemp(prefix="lmstack-engine-"))
    data, run_dir, export_dir = DATA, work / "run", work / "hf"
    overrides = [*MODEL, *TRAIN[mode], *COMMON, "train.compile=false", f"train.run_dir={run_dir}"]
    name = "compile_probe" if args.compile_probe else "engine"
    report = Report(name, args, config="configs/tiny.yaml", overrides=overrides)
    if args.dry_run:  # a corpus small enough for CPU, whatever prepare.sh left in .gpu/data
        data = work / "data"
        if not lmstack(
            report, "prepare_data", "prepare-data", "configs/tiny.yaml", f"data.path={data}", *DRY_DATA, "-q"
        ):
            return
    if not data.exists():
        return report.skip(
            "engine", f"no prepared data at {data}: run benchmarks/gpu/prepare.sh and carry .gpu"
        )
    if args.compile_probe:
        return compile_probe(report, data, run_dir, mode)
    if not lmstack(report, "train", "train", "configs/tiny.yaml", f"data.path={data}", *overrides):
        return
    metrics = read_metrics(run_dir)
    train = metrics["train"]
    report.data["run"] = metrics["run"][0]
    report.add({
        "what": "train", "steps": train[-1]["step"], "first_loss": train[0]["loss"], "last_loss": train[-1]["loss"],
        "median_tokens_per_s": sorted(r["tokens_per_s"] for r in train)[len(train) // 2],
        "last_record": train[-1], "val": metrics.get("val", []),
    })  # fmt: skip
    if not lmstack(report, "export", "export", str(run_dir), str(export_dir), "--overwrite"):
        return
    row = {"what": "generate", **generate(export_dir, device, 8 if args.dry_run else 32)}
    report.add(row)
    print(row, flush=True)
    if not row["cached_equals_uncached"]:
        report.fail("generation from the export: cached and uncached greedy tokens differ")


if __name__ == "__main__":
    main()
