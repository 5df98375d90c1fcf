"""benchmarks/gpu/suite.sh --cpu-dry-run: the GPU suite's own logic on CPU (interpreter, tiny shapes),
so that a broken suite cannot land; and its time budget, which skips what no longer fits."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
STEPS = [
    "install",
    "ops_correctness",
    "mixer_checks",
    "engine",
    "ops_speed",
    "train_vs_hf",
    "mixers_throughput",
    "decode",  # bench_decode.py, into mixers_throughput.json
]
STEP_KEYS = {"step", "dry_run", "date_utc", "versions", "device", "results", "failures", "skipped"}


def run_suite(out: Path, budget_s: int | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ, OUT=str(out), PYTHON=sys.executable)
    if budget_s is not None:
        env["SUITE_BUDGET_S"] = str(budget_s)
    cmd = ["bash", str(REPO / "benchmarks/gpu/suite.sh"), "--cpu-dry-run"]
    # Longer than the dry run's own budget (540 s x 6), so that its time caps, not this, end a slow run.
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=540 * 6 + 120)


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[subprocess.CompletedProcess, Path]:
    out = tmp_path_factory.mktemp("gpu-suite")
    return run_suite(out), out


def test_dry_run_passes_and_reports_every_step(dry_run) -> None:
    proc, out = dry_run
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    suite = json.loads((out / "suite.json").read_text())
    assert suite["dry_run"] is True and suite["versions"]["torch"]
    steps = {s["name"]: s for s in suite["steps"]}
    assert list(steps) == STEPS
    for step in steps.values():
        assert step["status"] in ("ok", "skipped"), step
        if step["status"] == "skipped":
            assert step["reason"], step
    assert steps["install"]["status"] == "skipped"  # nothing is installed here


def test_dry_run_files_fit_what_the_device_returns(dry_run) -> None:
    _, out = dry_run
    files = sorted(p.name for p in out.iterdir())
    assert len(files) <= 8 and all(p.is_file() for p in out.iterdir()), files
    assert all(re.fullmatch(r"[A-Za-z0-9._-]+", f) for f in files), files
    assert "suite.log" in files and "=== ops_correctness" in (out / "suite.log").read_text()


@pytest.mark.parametrize("step", [s for s in STEPS if s not in ("install", "train_vs_hf", "decode")])
def test_step_json_has_results_or_skips_and_no_failures(dry_run, step: str) -> None:
    _, out = dry_run
    data = json.loads((out / f"{step}.json").read_text())
    assert set(data) >= STEP_KEYS, sorted(STEP_KEYS - set(data))
    assert data["step"] == step and data["dry_run"] is True
    assert data["failures"] == []
    assert data["results"], f"{step}: no results"


def test_step_contents(dry_run) -> None:
    _, out = dry_run
    load = lambda name: json.loads((out / f"{name}.json").read_text())
    ops = load("ops_correctness")["results"]
    assert {r["reference"] for r in ops} == {"naive fp64", "chunked PyTorch fp32"}
    assert {r["dtype"] for r in ops} == {"fp32", "bf16"} and all(r["passed"] for r in ops)
    assert all({"o", "final_state", "dq", "dk", "dv", "d_initial_state"} <= set(r["rel_rmse"]) for r in ops)
    mixers = load("mixer_checks")
    assert {r["mixer"] for r in mixers["results"]} == set(mixers["mixers"])
    assert all(f"{m} sync check" in mixers["skipped"] for m in mixers["mixers"])  # CUDA only
    speed = load("ops_speed")
    assert {"sdpa", "lightning_triton"} <= {r["method"] for r in speed["results"]} and "fla" in speed[
        "skipped"
    ]
    engine = {r["what"]: r for r in load("engine")["results"]}
    assert engine["train"]["steps"] == 2 and engine["generate"]["cached_equals_uncached"] is True
    train = load("train_vs_hf")
    assert {r["variant"] for r in train["results"]} == {"hf_llama", "lmstack"} and "vs_hf_llama" in train
    assert load("mixers_throughput")["results"][0]["tokens_per_s"] > 0
    decode = load("mixers_throughput")["decode"]
    assert decode["failures"] == [] and decode["quick"] is True
    assert (
        {r["mixer"] for r in decode["results"]}
        == set(decode["mixers"])
        == set(mixers["mixers"]) - {"shortconv"}
    )
    assert all(r["cache_equals_full"] for r in decode["results"])


def test_budget_skips_what_does_not_fit(tmp_path: Path) -> None:
    proc = run_suite(tmp_path, budget_s=30)
    assert proc.returncode == 0, proc.stdout[-3000:]
    steps = json.loads((tmp_path / "suite.json").read_text())["steps"]
    assert [s["name"] for s in steps] == STEPS
    assert all(s["status"] == "skipped" and s["reason"] for s in steps)
