"""`lmstack plot RUN_DIR`: PNG curves from metrics.jsonl, and a clear error without one."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from lmstack.errors import LMStackError
from lmstack.train.metrics import read_metrics
from lmstack.train.plot import plot_run, run_figures


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


def plotted(ax) -> dict[str, tuple[list[float], list[float]]]:
    """The data of every line of a matplotlib axis, keyed by its label (or the axis title)."""
    return {
        (line.get_label() if not line.get_label().startswith("_") else ax.get_title()): (
            [float(v) for v in line.get_xdata()],
            [float(v) for v in line.get_ydata()],
        )
        for line in ax.get_lines()
    }


@pytest.mark.parametrize("with_mfu", [False, True])
def test_plotted_series_are_the_metrics(tmp_path: Path, with_mfu: bool) -> None:
    import matplotlib.pyplot as plt

    write_metrics(tmp_path, with_mfu)
    figures = run_figures(read_metrics(tmp_path))
    steps = [float(s) for s in range(5, 55, 5)]  # the cut line at step 55 is not plotted
    loss, lr, grad = figures["loss.png"].axes
    assert plotted(loss) == {
        "train loss": (steps, [8.0 - s / 10 for s in steps]),
        "val loss": ([50.0], [3.5]),
    }
    assert plotted(lr) == {"learning rate": (steps, [1e-3] * 10)}
    assert plotted(grad)["gradient norm (before clipping)"] == (steps, [1.0] * 10)
    speed = figures["throughput.png"].axes
    assert plotted(speed[0])["throughput (tokens/s, all ranks)"] == (steps, [1000.0 + s for s in steps])
    assert plotted(speed[1])["peak memory, GiB (rss, rank 0)"] == (steps, [1.0] * 10)
    if with_mfu:  # MFU in percent; without MFU records there is no third panel
        assert plotted(speed[2]) == {"MFU (%)": (steps, [30.0] * 10)}
    assert len(speed) == (3 if with_mfu else 2)
    for fig in figures.values():
        plt.close(fig)


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
