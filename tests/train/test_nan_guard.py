"""Non-finite gradient guard: a step whose global gradient norm is inf/NaN changes nothing in the
optimizer's own state (fp32 master weights, Adam moments and step counts), nor the step count or the
LR schedule; K+1 skips in a row (train.max_nan_skips=K) stop the run with a clear error and its last
checkpoint intact."""

from __future__ import annotations

import json
import math
import subprocess
import sys

from conftest import HERE, REPO, base_overrides, cli_train, env, losses

from lmstack.config import load_config
from lmstack.train.metrics import read_metrics
from lmstack.train.optim import lr_at

LAYOUTS = [(0, "fp32"), (2, "fp32"), (3, "fp32"), (1, "bf16")]


def test_non_finite_gradients_leave_the_optimizer_state_untouched(tiny_data, tmp_path):
    """Without ZeRO (torch AdamW stepped by DeepSpeed), ZeRO 2 and 3, and bf16 (fp32 master weights
    in DeepSpeed's optimizer): the state is snapshot before and after the skipped step."""
    runs = [
        base_overrides(
            tiny_data,
            tmp_path / f"zero{z}-{p}",
            **{"train.zero_stage": z, "train.precision": p, "train.warmup_steps": 10},
        )
        for z, p in LAYOUTS
    ]
    cmd = [sys.executable, str(HERE / "step_probe.py"), json.dumps(runs)]
    res = subprocess.run(cmd, env=env(), capture_output=True, text=True, timeout=300, cwd=REPO)
    assert res.returncode == 0, res.stderr[-3000:]
    probes = [json.loads(ln.split(" ", 1)[1]) for ln in res.stdout.splitlines() if ln.startswith("PROBE ")]
    assert len(probes) == len(LAYOUTS)
    cfg = load_config(None, runs[0]).train
    for (zero, precision), probe in zip(LAYOUTS, probes, strict=True):
        where = f"ZeRO {zero} {precision}"
        assert probe["skipped"] and not probe["grad_norm_finite"], where
        assert probe["master_keys"] > 0, where
        assert probe["changed_by_skip"] == [], f"{where}: the skipped step changed {probe['changed_by_skip']}"
        assert probe["step_after_skip"] == 2, where  # the step count did not move
        # the LR schedule did not move: the step after the skip uses the skipped step's LR (warm-up)
        assert probe["lr_after_skip"] == probe["lr_before_skip"] == lr_at(2, cfg, cfg.max_steps), where
        assert not probe["next_skipped"] and probe["changed_by_next"] > 0, (
            f"{where}: no update after the skip"
        )
        assert probe["final_finite"], where


def test_skipped_steps_are_logged_and_training_goes_on(tiny_data, tmp_path):
    run_dir = tmp_path / "run"
    extra = {"train.max_steps": 4, "train.max_nan_skips": 1}
    res = cli_train(base_overrides(tiny_data, run_dir, **extra), fault="nan_at:3")
    assert res.returncode == 0, res.stderr[-3000:]
    got = losses(run_dir)
    assert sorted(got) == [1, 2, 3, 4] and all(math.isfinite(v) for v in got.values())
    skips = read_metrics(run_dir)["skip"]
    assert [(r["step"], r["last_step"]) for r in skips] == [(3, 2)]  # iteration 3, after 2 steps
    assert "gradient norm nan, step skipped (1 in a row" in res.stderr + res.stdout


def test_too_many_skips_in_a_row_stop_with_a_clear_error(tiny_data, tmp_path):
    run_dir = tmp_path / "run"
    extra = {"train.max_steps": 6, "train.save_every": 2, "train.max_nan_skips": 1}
    # iterations 2 and 5 are isolated skips (tolerated); 6 and 7 are two in a row
    res = cli_train(base_overrides(tiny_data, run_dir, **extra), fault="nan_at:2+5+6+7")
    assert res.returncode == 2, res.stderr[-3000:]
    assert "2 steps in a row" in res.stderr and "max_nan_skips=1" in res.stderr
    assert "stopping at step 3" in res.stderr and "step_00000002" in res.stderr
    assert "Traceback" not in res.stderr
    assert (run_dir / "checkpoints" / "latest").read_text() == "step_00000002"
    # the last checkpoint is intact: the run resumes from it
    res = cli_train(base_overrides(tiny_data, run_dir, **extra), "--resume", "auto")
    assert res.returncode == 0, res.stderr[-3000:]
    assert sorted(losses(run_dir)) == list(range(1, 7))
