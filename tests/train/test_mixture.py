"""Training on data.mixture: SIGKILL + `--resume auto` gives the losses and per-source token counts
(`data/tokens/<name>`) of the uninterrupted run, step for step; each source's val split is logged as
val/<name>. The noise hook draws random numbers every step, as in test_resume.py."""

from __future__ import annotations

import signal

import pytest
from conftest import base_overrides, cli_train, losses, prepare_with_tokenizer, records, run_trainings

STEPS = 8
NOISE = "loss_noise:0.1"


@pytest.fixture(scope="module")
def second_source(tiny_data, tmp_path_factory):
    """A second prepared folder with tiny_data's tokenizer (other text)."""
    docs = [f"other document {i}: the sword and the crown in the night. " * (4 + i % 5) for i in range(24)]
    root = tmp_path_factory.mktemp("mixture")
    return prepare_with_tokenizer(root / "other", docs, tiny_data / "tokenizer.json", 0.25)


def overrides(tiny_data, second_source, run_dir):
    values = {"train.max_steps": STEPS, "train.save_every": 3, "train.zero_stage": 1}
    mixture = f"[{{path: {tiny_data}, weight: 0.7, name: tiny}}, {{path: {second_source}, weight: 0.3}}]"
    plain = [o for o in base_overrides(tiny_data, run_dir, **values) if not o.startswith("data.path=")]
    return [*plain, f"data.mixture={mixture}"]


def token_counts(record):
    return {k: v for k, v in record.items() if k.startswith("data/tokens/")}


def test_mixture_sigkill_and_resume_gives_the_same_steps(tiny_data, second_source, tmp_path):
    reference = tmp_path / "reference"
    res = cli_train(overrides(tiny_data, second_source, reference), fault=NOISE)
    assert res.returncode == 0, res.stderr[-3000:]
    expected = {r["step"]: token_counts(r) for r in records(reference, "train")}
    for step, counts in expected.items():  # 8 sequences of 32 tokens a step, split between the sources
        assert set(counts) == {"data/tokens/tiny", "data/tokens/other"}
        assert sum(counts.values()) == step * 8 * 32
    assert 0 < expected[STEPS]["data/tokens/other"] < expected[STEPS]["data/tokens/tiny"]
    (val,) = records(reference, "val")
    assert {"val/tiny/loss", "val/other/loss"} <= set(val) and "val_loss" not in val

    run_dir = tmp_path / "run"
    killed = cli_train(overrides(tiny_data, second_source, run_dir), fault=f"kill_at_step:5,{NOISE}")
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert (run_dir / "checkpoints" / "latest").read_text() == "step_00000003"
    resumed = cli_train(overrides(tiny_data, second_source, run_dir), "--resume", "auto", fault=NOISE)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    got = losses(run_dir)
    assert sorted(got) == list(range(1, STEPS + 1))
    assert got == losses(reference)  # exactly, step for step (fp32 on CPU)
    # every record, steps 4 and 5 logged before the kill and again after the resume included
    train = records(run_dir, "train")
    assert len(train) == STEPS + 2
    assert all(token_counts(r) == expected[r["step"]] for r in train)


@pytest.mark.slow
def test_mixture_resumes_on_another_number_of_ranks(tiny_data, second_source, tmp_path):
    """Saved by 2 data-parallel ranks at step 3, resumed on 1: the losses of the 2-rank run (rel 1e-5:
    1 and 2 ranks sum in another order, as in test_resume_world_size.py) and the same token counts."""

    def spec(name, resume=None):
        extra = ["train.max_steps=6", "train.decay_steps=4"]
        return {
            "overrides": [*overrides(tiny_data, second_source, tmp_path / name), *extra],
            "resume": resume,
        }

    res = run_trainings([spec("ref2")], nproc=2)
    assert res.returncode == 0, res.stderr[-3000:]
    res = run_trainings([spec("2to1", str(tmp_path / "ref2" / "checkpoints" / "step_00000003"))])
    assert res.returncode == 0, res.stderr[-3000:]
    expected, got = losses(tmp_path / "ref2"), losses(tmp_path / "2to1")
    assert sorted(got) == [4, 5, 6]
    assert all(abs(got[s] - expected[s]) <= 1e-5 * abs(expected[s]) for s in got), (got, expected)
    counts = {r["step"]: token_counts(r) for r in records(tmp_path / "ref2", "train")}
    assert all(token_counts(r) == counts[r["step"]] for r in records(tmp_path / "2to1", "train"))
