"""Clear, one-line errors for what a user can get wrong: missing data, an unwritable run directory,
inconsistent batch settings (the CLI prints them without a traceback and exits with 2)."""

from __future__ import annotations

import pytest
from conftest import base_overrides, cli_train

from lmstack.errors import LMStackError
from lmstack.train import batch_layout


def _fails(res, *needles):
    assert res.returncode == 2, res.stderr[-2000:]
    assert "Traceback" not in res.stderr
    for needle in needles:
        assert needle in res.stderr, res.stderr


def test_missing_data(tmp_path):
    res = cli_train(base_overrides(tmp_path / "nothing-here", tmp_path / "run"))
    _fails(res, "data.path", "prepare-data")


def test_unwritable_run_dir(tiny_data, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    res = cli_train(base_overrides(tiny_data, blocker / "run"))
    _fails(res, "train.run_dir", "cannot write")


def test_inconsistent_batch_in_config(tiny_data, tmp_path):
    res = cli_train(base_overrides(tiny_data, tmp_path / "run", **{"train.grad_accum": 3}))
    _fails(res, "train.grad_accum", "global_batch_size=8")


def test_batch_layout():
    assert batch_layout(64, 4, None, 2) == 8
    assert batch_layout(64, 4, 8, 2) == 8
    with pytest.raises(
        LMStackError, match="micro_batch_size=4 x train.grad_accum=4 x 2 data-parallel ranks = 32"
    ):
        batch_layout(64, 4, 4, 2)
    with pytest.raises(
        LMStackError, match="not divisible by train.micro_batch_size=4 x 3 data-parallel ranks"
    ):
        batch_layout(64, 4, None, 3)


def test_overrides_may_follow_options():
    """`lmstack train cfg --resume auto train.x=1`: positionals after an option still parse."""
    from lmstack.cli import build_parser

    parser = build_parser()
    args = parser.parse_args(["train", "cfg.yaml", "train.a=1", "--resume", "auto", "train.b=2"])
    assert (args.config, args.overrides, args.resume) == ("cfg.yaml", ["train.a=1", "train.b=2"], "auto")
    args = parser.parse_args(["eval", "harness", "M", "--tasks", "a", "b"])
    assert (args.eval_command, args.model, args.tasks) == ("harness", "M", ["a", "b"])
