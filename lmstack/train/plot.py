"""`lmstack plot RUN_DIR`: PNG curves from the run's metrics.jsonl (loss, LR, grad norm, throughput)."""

from __future__ import annotations

import math
from pathlib import Path

from lmstack.errors import LMStackError
from lmstack.train.metrics import read_metrics


def _series(records: list[dict], key: str) -> tuple[list[int], list[float]]:
    xs, ys = [], []
    for r in records:
        v = r.get(key)
        if isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v):
            xs.append(r["step"])
            ys.append(v)
    return xs, ys


def plot_run(run_dir: str | Path) -> list[Path]:
    """Write RUN_DIR/plots/{loss,throughput}.png; returns their paths."""
    run_dir = Path(run_dir)
    if not (run_dir / "metrics.jsonl").is_file():
        raise LMStackError(f"{run_dir}: no metrics.jsonl (is it a train.run_dir?)")
    metrics = read_metrics(run_dir)
    train, val = metrics.get("train", []), metrics.get("val", [])
    if not train:
        raise LMStackError(f"{run_dir / 'metrics.jsonl'}: no training records yet")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir = run_dir / "plots"
    out_dir.mkdir(exist_ok=True)
    written = []

    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    ax = axes[0]
    ax.plot(*_series(train, "loss"), label="train loss", lw=1)
    if val:
        ax.plot(*_series(val, "val_loss"), "o-", label="val loss", ms=3)
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.set_title("loss")
    ax.legend()
    ax.grid(alpha=0.3)
    axes[1].plot(*_series(train, "lr"))
    axes[1].set_title("learning rate")
    axes[1].set_xlabel("step")
    axes[1].grid(alpha=0.3)
    axes[2].plot(*_series(train, "grad_norm"))
    axes[2].set_title("gradient norm (before clipping)")
    axes[2].set_xlabel("step")
    axes[2].grid(alpha=0.3)
    fig.tight_layout()
    path = out_dir / "loss.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    written.append(path)

    mfu = _series(train, "mfu")
    fig, axes = plt.subplots(1, 3 if mfu[0] else 2, figsize=(15 if mfu[0] else 10, 4))
    axes[0].plot(*_series(train, "tokens_per_s"))
    axes[0].set_title("throughput (tokens/s, all ranks)")
    axes[0].set_xlabel("step")
    axes[0].grid(alpha=0.3)
    mem_key = "mem_peak_alloc_gib" if _series(train, "mem_peak_alloc_gib")[0] else "mem_peak_rss_gib"
    axes[1].plot(*_series(train, mem_key))
    axes[1].set_title(f"peak memory, GiB ({mem_key.removeprefix('mem_peak_').removesuffix('_gib')}, rank 0)")
    axes[1].set_xlabel("step")
    axes[1].grid(alpha=0.3)
    if mfu[0]:
        axes[2].plot(mfu[0], [100 * v for v in mfu[1]])
        axes[2].set_title("MFU (%)")
        axes[2].set_xlabel("step")
        axes[2].grid(alpha=0.3)
    fig.tight_layout()
    path = out_dir / "throughput.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    written.append(path)
    return written
