"""The MQAR sweep's report: the Markdown table, the plot of accuracy against d_model and state size,
and the files a sweep writes (PREFIX.json, .md, .png)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from lmstack.eval.mqar.sweep import sweep_files

RECIPE_TEXT = {
    "lmstack": "lmstack's (weights N(0, 1/d_model), AdamW betas (0.9, 0.98) with weight decay on every "
    "parameter, warm-up then cosine per step, gradients clipped at 1).",
    "zoology": "Zoology's (weights N(0, 0.02) with the residual-out projections scaled by 1/sqrt(2 n_layers); "
    "AdamW betas (0.9, 0.999), weight decay on the weight matrices and the embedding, none on norm gains, "
    "biases and gate parameters; cosine annealing per epoch without warm-up; no clipping).",
}
INIT_TEXT = {
    "scaled": "N(0, 1/d_model) instead of the recipe's",
    "zoology": "N(0, 0.02) instead of the recipe's",
}


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
        + "".join(
            f"; {label}: {v['mixer']} with {v.get('options', {})}"
            for label, v in cfg.get("variants", {}).items()
        )
        + ".",
        "",
        f"Recipe: {RECIPE_TEXT[t.get('recipe', 'lmstack')]}"
        + (f" Init: {INIT_TEXT[t['init']]}." if t.get("init", "recipe") != "recipe" else ""),
        "",
        "Test accuracy on the queried values (mean over seeds, min–max when more than one; test split "
        "read once per run, with the weights of the best validation accuracy); state = elements of one "
        f"sequence's decoding state in the mixer layer after {d['seq_len']} tokens (the same definition for "
        "every mixer: everything its cache holds, i.e. attention's keys and values of every token, a window's "
        "for swa, the recurrent matrix H x K x V plus the short convolution's last inputs for the linear mixers).",
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
    lines += [
        "",
        f"Learning curves (validation accuracy at the evaluated steps; d_model {min(d_models)}, chosen rate):",
        "",
    ]
    for b in (b for b in result["best"] if b["d_model"] == min(d_models)):
        for r in result["runs"]:
            if (r["mixer"], r["d_model"], r["lr"]) == (b["mixer"], b["d_model"], b["lr"]) and r.get(
                "history"
            ):
                curve = ", ".join(f"{h[0]}: {h[1]:.2f}" for h in r["history"])
                lines.append(f"- {r['mixer']} seed {r['seed']}: {curve}")
    if command:
        lines += ["", "Made with:", "", "```", command, "```"]
    return "\n".join(lines) + "\n"


def plot(result: dict[str, Any], path: str | Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4), sharey=True)
    narrowest = min(result["config"]["d_models"])
    for mixer in result["config"]["mixers"]:
        rows = sorted((b for b in result["best"] if b["mixer"] == mixer), key=lambda b: b["d_model"])
        if not rows:
            continue
        acc = [b["accuracy"] for b in rows]
        (line,) = axes[0].plot([b["d_model"] for b in rows], acc, marker="o", label=mixer)
        axes[1].plot([b["state_size"] for b in rows], acc, marker="o", label=mixer)
        # Learning curves at the narrowest width, the chosen rate: one line per seed.
        chosen = next((b["lr"] for b in rows if b["d_model"] == narrowest), None)
        for r in result["runs"]:
            if (r["mixer"], r["d_model"], r["lr"]) == (mixer, narrowest, chosen) and r.get("history"):
                steps, val = zip(*((h[0], h[1]) for h in r["history"]))
                axes[2].plot(steps, val, color=line.get_color(), alpha=0.7)
    for ax, xlabel in zip(axes[:2], ["d_model", "decoding state of the mixer layer (elements)"]):
        ax.set_xscale("log", base=2)
        ax.set_xlabel(xlabel)
    axes[2].set_xlabel(f"training step (d_model {narrowest}, chosen lr, every seed)")
    axes[2].set_ylabel("validation accuracy")
    for ax in axes:
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
