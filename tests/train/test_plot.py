"""`lmstack plot RUN_DIR`: PNG curves from metrics.jsonl, and a clear error without one."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from lmstack.errors import LMStackError
from lmstack.train.plot import plot_run


def write_metrics(run_dir: Path, with_mfu: bool) -> None:
    records = [{"kind": "run", "step": 0, "params": 10}]
    for step in range(5, 55, 5):
        records.append(
            {"kind": "train", "step": step, "loss": 8.0 - step / 10, "lr": 1e-3, "grad_norm": 1.0,
             "tokens_per_s": 1000.0 + step, "mfu": 0.3 if with_mfu else None, "mem_peak_rss_gib": 1.0}
        )  # fmt: skip
    records.append({"kind": "val", "step": 50, "val_loss": 3.5})
    lines = [json.dumps(r) for r in records] + ['{"kind": "train", "step": 55, "lo']  # a line cut by a crash
    (run_dir / "metrics.jsonl").write_text("\n".join(lines))


@pytest.mark.parametrize("with_mfu", [False, True])
def test_plot_writes_pngs(tmp_path: Path, with_mfu: bool) -> None:
    write_metrics(tmp_path, with_mfu)
    paths = plot_run(tmp_path)
    assert [p.name for p in paths] == ["loss.png", "throughput.png"]
    for path in paths:
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 5000


def test_plot_without_metrics_is_one_line_error(tmp_path: Path) -> None:
    with pytest.raises(LMStackError, match="no metrics.jsonl"):
        plot_run(tmp_path)
    proc = subprocess.run(
        [sys.executable, "-m", "lmstack.cli", "plot", str(tmp_path)], capture_output=True, text=True
    )
    assert proc.returncode == 2
    assert (
        proc.stderr.strip() == f"lmstack plot: error: {tmp_path}: no metrics.jsonl (is it a train.run_dir?)"
    )
