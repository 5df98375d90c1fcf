"""Fixtures of the trainer tests: a tiny prepared corpus and a runner for `lmstack train` processes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).parent
REPO = HERE.parent.parent


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> Path:
    """A prepared folder: the first 12 documents of the embedded corpus, a 512-token BPE."""
    from lmstack.config import DataConfig
    from lmstack.data import prepare_data

    path = tmp_path_factory.mktemp("train-data") / "data"
    cfg = DataConfig(
        path=str(path), source="default", max_documents=12, vocab_size=512, val_fraction=0.25, num_workers=1
    )
    prepare_data(cfg, progress=False)
    return path


def prepare_with_tokenizer(path: Path, docs: list[str], tokenizer: Path, val_fraction: float) -> Path:
    """`docs` prepared into `path` (from a jsonl file written next to it) with `tokenizer` (a
    tokenizer.json, e.g. tiny_data's), every round(1 / val_fraction)-th document held out."""
    from lmstack.config import DataConfig
    from lmstack.data import prepare_data

    src = path.with_name(path.name + ".jsonl")
    src.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    options = {"jsonl": {"inputs": [str(src)]}}
    cfg = DataConfig(
        path=str(path),
        source="jsonl",
        source_options=options,
        tokenizer=str(tokenizer),
        val_fraction=val_fraction,
        num_workers=1,
    )
    prepare_data(cfg, progress=False)
    return path


def base_overrides(data: Path, run_dir: Path, **extra) -> list[str]:
    """A tiny model and run: 2 layers of width 32, sequences of 32 tokens, global batch 8."""
    values = {
        "model.vocab_size": 512,
        "model.d_model": 32,
        "model.n_layers": 2,
        "model.n_heads": 2,
        "model.max_seq_len": 64,
        "data.path": str(data),
        "data.seq_len": 32,
        "train.run_dir": str(run_dir),
        "train.max_steps": 6,
        "train.global_batch_size": 8,
        "train.micro_batch_size": 4,
        "train.lr": 3e-3,
        "train.warmup_steps": 2,
        "train.log_every": 1,
        "train.eval_every": 100,
        "train.eval_batches": 2,
        "train.save_every": 100,
        "train.progress_bar": False,
        "train.tensorboard": False,
        "train.dist_timeout_s": 60,
    }
    values.update(extra)
    return [f"{k}={json.dumps(v) if not isinstance(v, str) else v}" for k, v in values.items()]


def env(fault: str | None = None) -> dict[str, str]:
    # The repository first; an existing PYTHONPATH after it (a worktree's lmstack_kernels link).
    path = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)
    out = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=path)
    out.pop("LMSTACK_FAULT", None)
    if fault:
        out["LMSTACK_FAULT"] = fault
    return out


def run_trainings(runs: list[dict], nproc: int = 1, fault: str | None = None, timeout: int = 180):
    """Run `runs` ([{"overrides": [...], "resume": ...}]) one after the other in one process (or one
    torchrun of `nproc` processes sharing a process group). Returns the CompletedProcess."""
    script = [str(HERE / "run_trainings.py"), json.dumps(runs)]
    if nproc == 1:
        cmd = [sys.executable, *script]
    else:
        cmd = [
            sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
            "--standalone", "--monitor-interval", "0.2", *script,
        ]  # fmt: skip
    return subprocess.run(cmd, env=env(fault), capture_output=True, text=True, timeout=timeout, cwd=REPO)


def cli_train(overrides: list[str], *args: str, fault: str | None = None, timeout: int = 180):
    cmd = [sys.executable, "-m", "lmstack.cli", "train", *overrides, *args]
    return subprocess.run(cmd, env=env(fault), capture_output=True, text=True, timeout=timeout, cwd=REPO)


def losses(run_dir: Path) -> dict[int, float]:
    from lmstack.train.metrics import read_metrics

    return {r["step"]: r["loss"] for r in read_metrics(run_dir).get("train", [])}


def records(run_dir: Path, kind: str) -> list[dict]:
    """Every `kind` record of `run_dir`'s metrics.jsonl in file order, repeats kept (unlike
    read_metrics: a step logged twice shows); [] before the file exists, a line being written skipped."""
    path = run_dir / "metrics.jsonl"
    out = []
    for line in path.read_text().splitlines() if path.is_file() else []:
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if record["kind"] == kind:
            out.append(record)
    return out
