"""The MQAR sweep's report: the Markdown table, the plot of accuracy against d_model and state size,
and the files a sweep writes (PREFIX.json, .md, .png)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from lmstack.eval.mqar.sweep import sweep_files


def markdown_table(result: dict[str, Any], command: str | None = None) -> str:
    cfg = result["config"]
    d, t = cfg["data"], cfg["train"]
    d_models = cfg["d_models"]
    by = {(b["mixer"], b["d_model"]): b for b in result["best"]}
    stop = f"val accuracy {t['solved_at']}" + (
        f" or {t['patience']} evaluations without gain" if t["patience"] else ""
    )
    lines = [
        "# MQAR (multi-query associative recall)",
        "",
        f"vocab {d['vocab_size']}, seq_len {d['seq_len']}, {d['num_kv_pairs']} key-value pairs, "
        f"power_a {d['power_a']}; {d['train_size']} train / {d['val_size']} validation / {d['test_size']} "
        f"test sequences; up to {t['epochs']} epochs, batch {t['batch_size']}, early stopping on the "
        f"validation split ({stop}); learning rates {cfg['lrs']}, chosen on validation accuracy; "
        f"{cfg['seeds']} seed(s) at the chosen rate. Model: {cfg['model']}, {cfg['n_heads']} head(s)"
        + "".join(f"; {m}: {h} heads" for m, h in cfg.get("mixer_heads", {}).items())
        + ".",
        "",
        "Test accuracy on the queried values (mean over seeds, min–max when more than one; test split "
        "read once per run, with the weights of the best validation accuracy); state = elements of one "
        f"sequence's decoding state in the mixer layer after {d['seq_len']} tokens.",
        "",
        "| mixer | " + " | ".join(f"d_model={dm}" for dm in d_models) + " |",
        "|---|" + "---|" * len(d_models),
    ]
    for mixer in cfg["mixers"]:
        cells = []
        for dm in d_models:
            b = by.get((mixer, dm))
            if b is None:
                cells.append("—")
                continue
            spread = f" ({b['accuracy_min']:.2f}–{b['accuracy_max']:.2f})" if b["seeds"] > 1 else ""
            cells.append(f"{b['accuracy']:.3f}{spread}, state {b['state_size']}, lr {b['lr']:g}")
        lines.append(f"| {mixer} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "All runs (the remaining learning rates are skipped once one solves the validation split):",
        "",
        "| mixer | d_model | lr | seed | val acc | test acc | steps | seconds | params |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in result["runs"]:
        lines.append(
            f"| {r['mixer']} | {r['d_model']} | {r['lr']:g} | {r['seed']} | {r['val_accuracy']:.3f} | "
            f"{r['accuracy']:.3f} | {r['steps']} | {r['seconds']:.0f} | {r['params']} |"
        )
    lines += [
        "",
        f"Wall time {result['seconds']:.0f} s (of the last session when a sweep was continued); training CPU "
        f"time {result['cpu_seconds']:.0f} s over all runs; {result['jobs']} process(es) with "
        f"{result['threads']} torch thread(s) each, torch {result['torch']}.",
    ]
    if command:
        lines += ["", "Made with:", "", "```", command, "```"]
    return "\n".join(lines) + "\n"


def plot(result: dict[str, Any], path: str | Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    for mixer in result["config"]["mixers"]:
        rows = sorted((b for b in result["best"] if b["mixer"] == mixer), key=lambda b: b["d_model"])
        if not rows:
            continue
        acc = [b["accuracy"] for b in rows]
        axes[0].plot([b["d_model"] for b in rows], acc, marker="o", label=mixer)
        axes[1].plot([b["state_size"] for b in rows], acc, marker="o", label=mixer)
    for ax, xlabel in zip(axes, ["d_model", "recurrent state size (elements, mixer layer)"]):
        ax.set_xscale("log", base=2)
        ax.set_xlabel(xlabel)
        ax.set_ylim(-0.02, 1.02)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("MQAR accuracy")
    axes[0].legend()
    d = result["config"]["data"]
    fig.suptitle(f"MQAR: seq_len {d['seq_len']}, {d['num_kv_pairs']} kv pairs, vocab {d['vocab_size']}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_outputs(result: dict[str, Any], out_prefix: str | Path, command: str | None = None) -> list[Path]:
    """Write `<prefix>.json`, `<prefix>.md` and `<prefix>.png`; returns the paths."""
    prefix = Path(out_prefix)
    prefix.parent.mkdir(parents=True, exist_ok=True)
    result_path, progress_path = sweep_files(prefix)
    paths = [result_path, prefix.with_suffix(".md"), prefix.with_suffix(".png")]
    paths[0].write_text(json.dumps({**result, "command": command}, indent=2) + "\n")
    paths[1].write_text(markdown_table(result, command))
    plot(result, paths[2])
    progress_path.unlink(missing_ok=True)  # every group is in the JSON now
    return paths
