"""Sequence-parallel training (2 ranks, one sequence group, torchrun + gloo) against one process on
the same global batches: every step's loss within a relative 1e-5, for attention, sliding-window
attention and MoH (LASP-2H), lightning (LASP-2, under ZeRO-2), GLA with short convolutions (ZeRO-1),
DeltaNet (ZeRO-3) and a hybrid with a short convolution; 2 x 2 ranks under ZeRO-2; a resume. The
per-layer bytes are logged. Plus the one-line config errors."""

from __future__ import annotations

import pytest
from conftest import base_overrides, cli_train, losses, run_trainings

from lmstack.config import load_config
from lmstack.errors import ConfigError
from lmstack.train.metrics import read_metrics

REL_TOL = 1e-5
CASES = {  # one process runs each case at ZeRO 0: the stage does not change the maths
    "attention": {"model.mixer": "attention"},
    "lightning": {"model.mixer": "lightning", "train.zero_stage": 2},
    "hybrid": {"model.layer_mixers": ["shortconv", "lightning"]},
    "swa": {"model.mixer": "swa", "model.mixer_options": {"swa": {"window": 8}}},
    "moh": {"model.mixer": "moh", "model.n_heads": 4},  # its balance loss over the whole rows
    "gla": {
        "model.mixer": "gla",
        "model.mixer_options": {"gla": {"use_short_conv": True}},
        "train.zero_stage": 1,
    },
    "deltanet": {"model.mixer": "deltanet", "train.zero_stage": 3},
}


def test_sequence_parallel_training_matches_one_process(tiny_data, tmp_path):
    extra = {"train.max_steps": 4}
    zero0 = {"train.zero_stage": 0}
    ref_runs = [
        {"overrides": base_overrides(tiny_data, tmp_path / f"one-{name}", **extra, **{**case, **zero0})}
        for name, case in CASES.items()
    ]
    sp = {"parallel.sequence_parallel_size": 2}
    sp_runs = [
        {"overrides": base_overrides(tiny_data, tmp_path / f"sp-{name}", **extra, **case, **sp)}
        for name, case in CASES.items()
    ]
    ref = run_trainings(ref_runs)
    assert ref.returncode == 0, ref.stderr[-3000:]
    res = run_trainings(sp_runs, nproc=2, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    for name in CASES:
        expected = losses(tmp_path / f"one-{name}")
        got = losses(tmp_path / f"sp-{name}")
        assert sorted(got) == sorted(expected) == [1, 2, 3, 4], name
        for step, loss in expected.items():
            rel = abs(got[step] - loss) / abs(loss)
            assert rel < REL_TOL, f"{name} step {step}: loss {got[step]} vs one process {loss} ({rel:.1e})"
    record = read_metrics(tmp_path / "sp-hybrid")["train"][0]
    assert record["comm/sp_bytes/layer0"] > 0 and record["comm/sp_bytes/layer1"] > 0
    for name in ("attention", "lightning"):  # validation sums the slices' losses over the group
        (val_one,), (val_sp,) = (read_metrics(tmp_path / f"{k}-{name}")["val"] for k in ("one", "sp"))
        assert abs(val_sp["val_loss"] - val_one["val_loss"]) / val_one["val_loss"] < REL_TOL, name


def test_two_replicas_of_two_slices_under_zero2_match_one_process(tiny_data, tmp_path):
    """4 ranks as 2 data-parallel replicas x 2 sequence slices, ZeRO-2, activation checkpointing
    (the gathers re-run in the backward): per-step losses equal one process's."""
    case = {"model.layer_mixers": ["lightning", "attention"], "train.max_steps": 3}
    ref = run_trainings([{"overrides": base_overrides(tiny_data, tmp_path / "one", **case)}])
    assert ref.returncode == 0, ref.stderr[-3000:]
    extra = {
        "parallel.sequence_parallel_size": 2,
        "train.zero_stage": 2,
        "train.activation_checkpointing": True,
    }
    res = run_trainings([{"overrides": base_overrides(tiny_data, tmp_path / "sp", **case, **extra)}], nproc=4)
    assert res.returncode == 0, res.stderr[-3000:]
    expected, got = losses(tmp_path / "one"), losses(tmp_path / "sp")
    assert sorted(got) == sorted(expected) == [1, 2, 3]
    for step, loss in expected.items():
        assert abs(got[step] - loss) / loss < REL_TOL, f"step {step}: {got[step]} vs one process {loss}"


def test_resume_under_sequence_parallelism_continues_exactly(tiny_data, tmp_path):
    """2 ranks as one sequence group (DeltaNet + lightning, ZeRO-1): a run resumed from the step-3
    checkpoint of an uninterrupted one gives its losses at steps 4-6 (a resume that lost the Adam
    moments differs by ~3e-4, see test_resume_world_size.py)."""
    case = {
        "model.layer_mixers": ["deltanet", "lightning"],
        "parallel.sequence_parallel_size": 2,
        "train.zero_stage": 1,
        "train.max_steps": 6,
        "train.save_every": 3,
    }
    step3 = str(tmp_path / "ref" / "checkpoints" / "step_00000003")
    runs = [
        {"overrides": base_overrides(tiny_data, tmp_path / "ref", **case)},
        {"overrides": base_overrides(tiny_data, tmp_path / "resumed", **case), "resume": step3},
    ]
    res = run_trainings(runs, nproc=2, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    expected, got = losses(tmp_path / "ref"), losses(tmp_path / "resumed")
    assert sorted(got) == [4, 5, 6], sorted(got)
    for step in got:
        rel = abs(got[step] - expected[step]) / expected[step]
        assert rel < REL_TOL, f"step {step}: {got[step]} vs {expected[step]}"


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (
            ["parallel.sequence_parallel_size=0"],
            "parallel.sequence_parallel_size: expected a positive integer",
        ),
        (
            ["parallel.sequence_parallel_size=3", "data.seq_len=32"],
            "parallel.sequence_parallel_size: 3 does not divide data.seq_len=32",
        ),
        (["parallel.sequence_parallel_size=2", "parallel.ranks=2"], "parallel.ranks: unknown key"),
    ],
)
def test_config_errors_name_the_field(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, overrides)


def test_mixer_without_sequence_parallelism_is_refused(monkeypatch):
    from lmstack.model.mixers.lightning import LightningAttention

    monkeypatch.setattr(LightningAttention, "supports_sequence_parallel", False)
    with pytest.raises(
        ConfigError, match=r"mixer 'lightning' \(layer 0\) does not support sequence parallelism"
    ):
        load_config(None, ["parallel.sequence_parallel_size=2", "model.mixer=lightning"])


def test_world_not_divisible_is_refused(tiny_data, tmp_path):
    res = cli_train(base_overrides(tiny_data, tmp_path / "run", **{"parallel.sequence_parallel_size": 2}))
    assert res.returncode == 2
    assert "parallel.sequence_parallel_size=2 does not divide the 1 ranks (WORLD_SIZE)" in res.stderr
