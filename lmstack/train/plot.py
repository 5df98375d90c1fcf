"""`lmstack plot RUN_DIR`: PNG curves from the run's metrics.jsonl (loss, LR, grad norm, throughput)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from lmstack.errors import LMStackError
from lmstack.train.metrics import read_metrics


def series(records: list[dict], key: str) -> tuple[list[int], list[float]]:
    """(steps, values) of `key` over `records`, skipping records where it is missing or not finite."""
    xs, ys = [], []
    for r in records:
        v = r.get(key)
        if isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v):
            xs.append(r["step"])
            ys.append(v)
    return xs, ys


def run_figures(metrics: dict[str, list[dict]]) -> dict[str, Any]:
    """{"loss.png": figure, "throughput.png": figure} drawn from `read_metrics` records (needs
    training records); the caller saves and closes them."""
    train, val = metrics.get("train", []), metrics.get("val", [])
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def panel(ax, series: tuple[list[int], list[float]], title: str, **kw) -> None:
        ax.plot(*series, **kw)
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)

    loss_fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    panel(axes[0], series(train, "loss"), "loss", label="train loss", lw=1)
    if val:
        axes[0].plot(*series(val, "val_loss"), "o-", label="val loss", ms=3)
    axes[0].set_ylabel("cross-entropy (nats/token)")
    axes[0].legend()
    panel(axes[1], series(train, "lr"), "learning rate")
    panel(axes[2], series(train, "grad_norm"), "gradient norm (before clipping)")

    steps, mfu = series(train, "mfu")
    speed_fig, axes = plt.subplots(1, 3 if steps else 2, figsize=(15 if steps else 10, 4))
    panel(axes[0], series(train, "tokens_per_s"), "throughput (tokens/s, all ranks)")
    mem_key = "mem_peak_alloc_gib" if series(train, "mem_peak_alloc_gib")[0] else "mem_peak_rss_gib"
    mem_kind = mem_key.removeprefix("mem_peak_").removesuffix("_gib")
    panel(axes[1], series(train, mem_key), f"peak memory, GiB ({mem_kind}, rank 0)")
    if steps:
        panel(axes[2], (steps, [100 * v for v in mfu]), "MFU (%)")
    return {"loss.png": loss_fig, "throughput.png": speed_fig}


def save_figure(fig: Any, path: Path, dpi: int = 100) -> Path:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return path


def plot_run(run_dir: str | Path) -> list[Path]:
    """Write RUN_DIR/plots/{loss,throughput}.png; returns their paths."""
    run_dir = Path(run_dir)
    if not (run_dir / "metrics.jsonl").is_file():
        raise LMStackError(f"{run_dir}: no metrics.jsonl (is it a train.run_dir?)")
    metrics = read_metrics(run_dir)
    if not metrics.get("train"):
        raise LMStackError(f"{run_dir / 'metrics.jsonl'}: no training records yet")
    out_dir = run_dir / "plots"
    out_dir.mkdir(exist_ok=True)
    return [save_figure(fig, out_dir / name) for name, fig in run_figures(metrics).items()]
