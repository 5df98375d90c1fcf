"""Sequence parallelism against one pass (4 ranks, torchrun + gloo, fp32): for every supported mixer
and a hybrid, the gathered logits and every parameter gradient of the sliced forward/backward equal
the single-process run on the whole rows, with documents crossing every slice boundary, one starting
exactly on each and one spanning all slices (its state folds through the transitions of the middle
ranks). Bytes: a linear mixer's per-layer communication does not change when T doubles (LASP-2:
states, not tokens); sliding-window attention sends at most the window's tail; full attention's
doubles (LASP-2H: keys and values).
One torchrun launch runs all cases (tests/parallel/lasp_worker.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from lmstack.model import MIXERS

HERE = Path(__file__).parent
REPO = HERE.parent.parent
# Every mixer that declares sequence-parallel support (a new one is tested as soon as it does), and a hybrid.
SUPPORTED = [name for name in sorted(MIXERS) if MIXERS[name].supports_sequence_parallel]
SPECS = [
    *SUPPORTED,
    "shortconv+lightning+attention",
    "swa@5+lightning",
    "deltanet+swa@5+gla+moh",
    # The GPU path's block masks with a key offset, forward only (eager FlexAttention has no CPU backward).
    "attention:flex+swa:flex",
]
B, H, DH, W = 3, 4, 16, 4
# A linear mixer sends (W-1) x (transition + state [B, H, K, V]) fp32, forward and backward. Per head:
# lightning λ^T (1) and 16 x 16; GLA exp Σg over its K = 8 keys (expand_k 0.5) and 8 x 16; DeltaNet
# P (16 x 16) and 16 x 16, plus its short convolution's last 3 inputs of q, k, v (3 x 3·H·DH, any T).
PER_HEAD = {"lightning": 1 + DH * DH, "gla": DH // 2 + DH // 2 * DH, "deltanet": 2 * DH * DH}
LINEAR_BYTES = {name: 2 * (W - 1) * B * H * n * 4 for name, n in PER_HEAD.items()}
LINEAR_BYTES["deltanet"] += 2 * (W - 1) * B * 3 * (3 * H * DH) * 4


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("lasp") / "report.json"
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(W), "--standalone",
        "--monitor-interval", "0.2", str(HERE / "lasp_worker.py"), str(out), *SPECS,
    ]  # fmt: skip
    env = dict(os.environ, OMP_NUM_THREADS="1")
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=REPO)
    assert res.returncode == 0, res.stderr[-3000:]
    return json.loads(out.read_text())


@pytest.mark.parametrize("spec", SPECS)
def test_sequence_parallel_equals_one_pass(report, spec):
    for length, result in report[spec].items():
        assert result["logits"] < 1e-5, f"{spec} {length}: logits rel. RMSE {result['logits']:.2e}"
        for name, err in result["grads"].items():
            assert err < 1e-5, f"{spec} {length}: d{name} rel. RMSE {err:.2e}"
        for name, err in result["aux"].items():  # MoH's balance loss over the whole rows
            assert err < 1e-5, f"{spec} {length}: {name} rel. error {err:.2e}"
    assert bool(report[spec][length]["aux"]) == ("moh" in spec.split("+"))


def test_linear_state_bytes_do_not_grow_with_T(report):
    for name, expected in LINEAR_BYTES.items():
        short, long = (report[name][f"T={W * n}"]["bytes_sent"] for n in (17, 34))
        assert short == long == {"0": expected}, name
    attn_short, attn_long = (report["attention"][f"T={W * n}"]["bytes_sent"]["0"] for n in (17, 34))
    assert attn_long == 2 * attn_short
    swa_short, swa_long = (report["swa"][f"T={W * n}"]["bytes_sent"]["0"] for n in (17, 34))
    # Each rank sends its last min(window - 1, T/W) keys/values: 17 of a 17-token slice, 23 of 34.
    assert swa_short / 17 == swa_long / 23
    hybrid = report["shortconv+lightning+attention"][f"T={W * 17}"]["bytes_sent"]
    assert hybrid["1"] == LINEAR_BYTES["lightning"] and hybrid["2"] == attn_short
