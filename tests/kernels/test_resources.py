"""The kernel resource check (`lmstack_kernels.common.compile_check`) in CI: the variants nearest the
shared-memory limits and those ptxas -O3 spilled most compile for sm_90 and sm_80 within them (the
full matrix, ~7 min on 2 cores, is opt-in with --runslow and its table is committed in
benchmarks/results/kernel_resources.md)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
pytest.importorskip("triton")


def run_check(tmp_path: Path, *args: str) -> tuple[subprocess.CompletedProcess, list[dict]]:
    # A subprocess: the session runs Triton's interpreter, which @triton.jit reads at import.
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    cmd = [sys.executable, "-m", "lmstack_kernels.common.compile_check", *args, "--out", str(tmp_path)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    path = tmp_path / "kernel_resources.json"
    return proc, (json.loads(path.read_text())["results"] if path.exists() else [])


def check_rows(proc, rows: list[dict], expected: int) -> None:
    from lmstack_kernels.common.compile_check import SMEM_LIMIT, SPILL_BUDGET

    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert len(rows) == expected
    for r in rows:
        assert "error" not in r and r["problems"] == [], r
        assert 0 < r["shared_B"] <= SMEM_LIMIT[r["arch"]], r
        assert 0 < r["registers"] <= 255 and 0 <= r["spill_stores_B"] <= SPILL_BUDGET, r


def test_lightning_fp32_d256_and_d128_fit_hopper_and_ampere(tmp_path: Path) -> None:
    # Triton's default 3 stages at BT 64 needed 380 KB (fp32 D=256) and 176 KB (sm_80 fp32 D=128).
    proc, rows = run_check(tmp_path, "--ops", "lightning", "--dims", "128", "256", "--dtypes", "fp32")
    check_rows(proc, rows, 4 * 2 * 2)
    d256 = {(r["kernel"], r["arch"]): r for r in rows if r["K"] == 256}
    assert d256["fwd", 90]["BT"] == 32 and d256["fwd", 90]["num_stages"] == 2
    assert d256["fwd", 80]["BT"] == 16


def test_delta_rule_fp32_k256_backward_fits_ampere_without_the_ptxas_collapse(tmp_path: Path) -> None:
    # At ptxas -O3 these compiled to 32 registers and 38-40 KB of spills per thread, and the gated
    # backward needed 172,032 B of shared memory at BT 32 (`launch_configs`, `PTXAS_O1`).
    proc, rows = run_check(
        tmp_path, "--ops", "deltanet", "gated_deltanet", "--dims", "256", "--dtypes", "fp32", "--archs", "80"
    )
    check_rows(proc, rows, 2 * 3)
    got = {(r["op"], r["kernel"]): r for r in rows}
    assert got["gated_deltanet", "bwd"]["BT"] == got["gated_deltanet", "states"]["BT"] == 16
    assert all(got[op, "bwd"]["registers"] == 255 for op in ("deltanet", "gated_deltanet"))


def test_problems_name_shared_memory_and_spills_over_their_limits() -> None:
    # lightning fwd fp32 D=256 at Triton's defaults (BT 64, 3 stages), as measured: over sm_90's limit.
    from lmstack_kernels.common.compile_check import SMEM_LIMIT, problems

    row = {"arch": 90, "shared_B": 389120, "registers": 255, "spill_stores_B": 1212}
    assert problems(row) == [f"shared memory 389120 B > sm_90's {SMEM_LIMIT[90]} B"]
    assert problems(row | {"shared_B": 1024, "spill_stores_B": 10**6})[0].startswith("spill stores")


@pytest.mark.slow
def test_full_matrix_within_limits(tmp_path: Path) -> None:
    from lmstack_kernels.common.compile_check import jobs

    proc, rows = run_check(tmp_path)
    ops = ("lightning", "gla", "deltanet", "gated_deltanet")
    check_rows(proc, rows, len(jobs(ops, (32, 64, 128, 256), ("fp32", "bf16"), (90, 80))))


def test_update_replaces_the_rows_checked_again_in_place() -> None:
    from lmstack_kernels.common.compile_check import _updated

    row = lambda op, K, smem: {
        "op": op,
        "kernel": "bwd",
        "K": K,
        "V": K,
        "dtype": "fp32",
        "arch": 80,
        "shared_B": smem,
    }  # noqa: E731
    old = [row("lightning", 64, 1), row("deltanet", 256, 2), row("gla", 64, 3)]
    got = _updated(old, [row("deltanet", 256, 20), row("deltanet", 128, 30)])
    assert got == [
        row("lightning", 64, 1),
        row("deltanet", 256, 20),
        row("gla", 64, 3),
        row("deltanet", 128, 30),
    ]
