"""Bad `lmstack eval` arguments end in one line naming the flag or setting, exit code 2."""

import subprocess
import sys

import pytest


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["mqar", "--mixer-options", "notjson"], "--mixer-options: not valid JSON"),
        (["mqar", "--mixer-options", "[1]"], "--mixer-options: expected a JSON object"),
        (
            ["mqar", "--mixer-options", '{"lightning": {"gat": "silu"}}'],
            "--mixer-options lightning.gat: unknown key",
        ),
        (["mqar", "--d-models", "abc"], "--d-models: expected comma-separated int values, got 'abc'"),
        (["mqar", "--lrs", "1e-3,x"], "--lrs: expected comma-separated float values"),
        (["mqar", "--train-size", "8", "--batch-size", "32"], "train_size 8 is smaller than batch_size 32"),
        (["mqar", "--test-size", "0"], "test_size must be at least 1"),
        (["mqar", "--val-size", "0"], "val_size must be at least 1"),
        (["mqar", "--seeds", "0"], "seeds must be at least 1"),
        (["harness", "/nonexistent", "--batch-size", "abc"], "--batch-size: expected an integer or 'auto'"),
    ],
)
def test_bad_eval_arguments(args: list[str], expected: str) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "lmstack.cli", "eval", *args], capture_output=True, text=True
    )
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2, proc.stderr
    assert len(lines) == 1 and expected in lines[0], proc.stderr
