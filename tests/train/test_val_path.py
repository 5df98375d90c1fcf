"""data.val_path: named prepared folders evaluated besides data.path's own val split, each logged as
val/<name>/loss and val/<name>/ppl."""

from __future__ import annotations

import math

from conftest import base_overrides, cli_train, prepare_with_tokenizer, records


def test_a_run_with_val_path_logs_both_validation_sets(tiny_data, tmp_path):
    docs = [f"held out document {i}: the king and the queen walk into the night." * 3 for i in range(8)]
    heldout = prepare_with_tokenizer(tmp_path / "heldout", docs, tiny_data / "tokenizer.json", 0.0)
    run = tmp_path / "run"
    overrides = base_overrides(
        tiny_data, run, **{"train.max_steps": 2, "train.eval_every": 2, "train.eval_batches": None}
    ) + [f"data.val_path={{heldout: {heldout}, own: {tiny_data}}}"]
    proc = cli_train(overrides)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (val,) = records(run, "val")
    for name in ("heldout", "own"):
        assert math.isfinite(val[f"val/{name}/loss"])
        assert val[f"val/{name}/ppl"] == math.exp(val[f"val/{name}/loss"])
    assert "val_loss" in val and val["val/heldout/loss"] != val["val/own/loss"]
    # `lmstack eval ppl` on the final checkpoint reads the same folders (from the run's data.val_path)
    # and, scoring every token once like the run's eval_batches=null, gets the same losses
    from lmstack.eval.ppl import run_ppl

    result = run_ppl(str(run), batch_size=4, device="cpu", log=lambda m: None)
    for name in ("heldout", "own"):
        assert abs(result["val_path"][name]["loss"] - val[f"val/{name}/loss"]) < 1e-5
