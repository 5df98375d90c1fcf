"""`lmstack compare`: two mixers end to end on a tiny run, killed during training and resumed."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lmstack.errors import LMStackError
from lmstack.eval.compare import loss_curves, plan_runs
from lmstack.train.metrics import read_metrics

CONFIG = """\
model: {vocab_size: 512, d_model: 32, n_layers: 2, n_heads: 2, max_seq_len: 64}
data: {path: DATA, source: default, max_documents: 12, vocab_size: 512, val_fraction: 0.25, num_workers: 1,
       seq_len: 32}
train: {max_steps: 6, global_batch_size: 8, micro_batch_size: 8, lr: 3.0e-3, warmup_steps: 2, log_every: 1,
        eval_every: 3, eval_batches: 2, save_every: 2, progress_bar: false, tensorboard: false}
"""
TINY_MQAR = {
    "train_size": 64,
    "val_size": 16,
    "test_size": 16,
    "epochs": 1,
    "batch_size": 32,
    "d_models": [16],
}


@pytest.fixture
def config(tmp_path: Path) -> Path:
    path = tmp_path / "tiny.yaml"
    path.write_text(CONFIG.replace("DATA", str(tmp_path / "data")))
    return path


def compare(config: Path, out: Path) -> None:
    from lmstack.cli import main

    main(["compare", str(config), "--mixers", "attention,shortconv", "--out", str(out), "--limit", "4",
          "--mqar-settings", json.dumps(TINY_MQAR)])  # fmt: skip


@pytest.mark.slow  # three compare invocations with training processes: ~1 min on a quiet 2-core CPU
def test_compare_killed_during_training_resumes(config, tmp_path, monkeypatch, capsys):
    out = tmp_path / "out"
    monkeypatch.setenv("LMSTACK_FAULT", "kill_at_step:4")  # the first training dies after step 4
    with pytest.raises(SystemExit) as exit_:
        compare(config, out)
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert (
        "attention: training stopped (exit code -9); see " in err[-1]
        and "run the same command again" in err[-1]
    )
    assert not (out / "runs" / "attention" / "compare" / "train.json").exists()

    monkeypatch.delenv("LMSTACK_FAULT")
    compare(config, out)
    captured = capsys.readouterr()
    assert "attention: train: resuming from checkpoint" in captured.err
    report = json.loads((out / "compare.json").read_text())
    assert [r["name"] for r in report["runs"]] == ["attention", "shortconv"]
    for run in report["runs"]:
        assert run["train"]["steps"] == 6 and run["train"]["tokens"] == 6 * 8 * 32
        assert 1 < run["ppl"]["perplexity"] < 512 * 2 and run["ppl"]["complete"]
        assert {(h["task"], h["metric"]) for h in run["harness"]["summary"]} >= {("lmstack_mc", "acc")}
        assert 0 <= run["mqar"]["accuracy"] <= 1 and run["mqar"]["d_model"] == 16
    attention, shortconv = report["runs"]
    assert attention["state"]["elements"] == 2 * 2 * 32 * 32  # 2 layers of keys and values, 32 tokens
    assert shortconv["state"]["elements"] == 2 * 3 * 32  # 2 layers of the last k-1 = 3 inputs
    # the resumed run logged each step once: steps 1-4 before the kill, 5-6 after
    assert [r["step"] for r in read_metrics(out / "runs" / "attention")["train"]] == [1, 2, 3, 4, 5, 6]
    md = (out / "compare.md").read_text()
    assert "| attention | 49,312 |" in md and "| shortconv |" in md and "lmstack_mc acc_norm" in md
    assert (out / "loss.png").read_bytes()[:4] == b"\x89PNG"
    curves = loss_curves(out / "runs" / "shortconv")
    assert curves["train"][0] == [s * 256 for s in range(1, 7)] and curves["val"][0] == [3 * 256, 6 * 256]

    compare(config, out)  # everything finished: every stage is skipped, the report is the same
    err = capsys.readouterr().err
    assert err.count("done before, skipped") == 12
    assert json.loads((out / "compare.json").read_text())["runs"] == report["runs"]


def test_runs_must_share_data_tokens_and_schedule(config, tmp_path):
    other = tmp_path / "other.yaml"
    other.write_text(config.read_text().replace("max_steps: 6", "max_steps: 7"))
    with pytest.raises(LMStackError, match=r"train.max_steps differs between the runs \(tiny, other\)"):
        plan_runs([str(config), str(other)], None, [], tmp_path / "out")
    runs = plan_runs([str(config)], ["attention", "lightning"], ["model.d_model=64"], tmp_path / "out")
    assert [(r.name, r.mixers, r.config.model.d_model) for r in runs] == [
        ("attention", ["attention"], 64),
        ("lightning", ["lightning"], 64),
    ]
    assert runs[1].run_dir == tmp_path / "out" / "runs" / "lightning"
    with pytest.raises(LMStackError, match="--mixers: give two or more"):
        plan_runs([str(config)], None, [], tmp_path / "out")
    with pytest.raises(LMStackError, match="model.layer_mixers names every layer's mixer"):
        plan_runs(
            [str(config)], ["attention", "lightning"], ["model.layer_mixers=[shortconv,attention]"], tmp_path
        )


def test_long_context_columns_appear_only_when_measured(tmp_path):
    from types import SimpleNamespace

    from lmstack.eval.compare import decode_ms_per_token, long_context_columns

    run = SimpleNamespace(run_dir=tmp_path)
    assert decode_ms_per_token(run) is None
    (tmp_path / "decode.json").write_text(json.dumps({"decode_ms_per_token": {"8192": 1.25, "512": 0.5}}))
    assert decode_ms_per_token(run) == 1.25
    measured = {
        "length": {"seq_len": 1024, "times_train_length": 4, "perplexity": 31.5},
        "niah": {"length": 1024, "accuracy": 0.5},
        "decode_ms_per_token_8k": 1.25,
    }
    skipped = {"length": {"skipped": "too short"}, "niah": {"skipped": "x"}, "decode_ms_per_token_8k": None}
    cols = long_context_columns([measured, skipped])
    assert [title for title, _ in cols] == ["val ppl @4x (1024)", "NIAH acc @1024", "decode ms/token @8K"]
    assert [cell(measured) for _, cell in cols] == ["31.50", "0.500", "1.25"]
    assert [cell(skipped) for _, cell in cols] == ["—", "—", "—"]
    assert long_context_columns([skipped]) == []
