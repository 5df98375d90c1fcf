"""NaN guard: a non-finite loss skips its step on every rank (weights and optimizer untouched); past
train.max_nan_skips the run stops with a clear error and its last checkpoint intact."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import base_overrides, cli_train, losses, run_trainings


def _weights(ckpt):
    files = sorted(ckpt.glob("*model_states.pt"))
    state = torch.load(files[0], map_location="cpu", weights_only=False)["module"]
    return {k: v.float() for k, v in state.items()}


@pytest.mark.parametrize("zero,precision", [(0, "fp32"), (2, "fp32"), (1, "bf16")])
def test_nan_loss_skips_the_step(tiny_data, tmp_path, zero, precision):
    """Without ZeRO (torch AdamW stepped by DeepSpeed), with ZeRO 2, and bf16 (DeepSpeed's BF16 optimizer)."""
    run_dir = tmp_path / "run"
    extra = {
        "train.max_steps": 4,
        "train.save_every": 1,
        "train.keep_last": 10,
        "train.zero_stage": zero,
        "train.precision": precision,
    }
    res = run_trainings([{"overrides": base_overrides(tiny_data, run_dir, **extra)}], fault="nan_at:3")
    assert res.returncode == 0, res.stderr[-3000:]
    got = losses(run_dir)
    assert math.isnan(got[3]) and all(math.isfinite(got[s]) for s in (1, 2, 4))
    ckpts = run_dir / "checkpoints"
    w = {s: _weights(ckpts / f"step_{s:08d}") for s in (2, 3, 4)}
    for name in w[2]:
        assert torch.equal(w[2][name], w[3][name]), f"{name} changed in the skipped step"
    assert any(not torch.equal(w[3][n], w[4][n]) for n in w[3]), "the step after the skip did not update"
    assert all(torch.isfinite(t).all() for t in w[4].values())


def test_too_many_nans_stop_with_a_clear_error(tiny_data, tmp_path):
    run_dir = tmp_path / "run"
    extra = {"train.max_steps": 6, "train.save_every": 2, "train.max_nan_skips": 1}
    res = cli_train(base_overrides(tiny_data, run_dir, **extra), fault="nan_at:3+5")
    assert res.returncode == 2, res.stderr[-3000:]
    assert "max_nan_skips=1" in res.stderr and "step_00000004" in res.stderr
    assert "Traceback" not in res.stderr
    assert (run_dir / "checkpoints" / "latest").read_text() == "step_00000004"
    # the last checkpoint is intact: the run resumes from it
    res = cli_train(base_overrides(tiny_data, run_dir, **extra), "--resume", "auto")
    assert res.returncode == 0, res.stderr[-3000:]
    assert sorted(losses(run_dir)) == list(range(1, 7))
