"""`lmstack compare`: one model shape trained with several token mixers (or several configs) on the
same data, tokens and schedule, then one report.

    CONFIG(s) x --mixers -> OUT/runs/<name>/        one `lmstack train` process each (--resume auto)
                         -> hf/                     the Hugging Face export
                         -> held-out perplexity, decoding state per sequence, MQAR probe, lm-eval,
                            perplexity at 4x data.seq_len (`eval length`), NIAH accuracy (`eval niah`)
                         -> OUT/compare.{md,json}, OUT/loss.png (overlaid curves)

Every finished stage of a run leaves `OUT/runs/<name>/compare/<stage>.json`; running the same command
again skips those stages, and an interrupted training continues from its last checkpoint, so a
killed compare is resumed by running it again.

Decoding cost comes from `benchmarks/bench_decode.py`, not from a stage here: when a run directory
holds `decode.json` with `decode_ms_per_token` (an object from context length, as a string, to
milliseconds per decoded token; `python benchmarks/bench_decode.py --run-dir OUT/runs/<name>` writes
it from the run's export), the report shows its value at 8192 tokens.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lmstack.errors import LMStackError
from lmstack.eval import sigterm_exits

#: Settings that must agree between the runs of one comparison (the mixer and the run dir may differ).
SAME_BUDGET = [
    "data",
    "train.max_steps",
    "train.max_tokens",
    "train.global_batch_size",
    "train.lr",
    "train.min_lr",
    "train.warmup_steps",
    "train.decay_steps",
    "train.seed",
]


@dataclass
class Run:
    name: str
    config_path: str
    overrides: list[str]  # the user's, then this run's mixer and run dir
    config: Any  # the validated RunConfig

    @property
    def run_dir(self) -> Path:
        return Path(self.config.train.run_dir)

    @property
    def stage_dir(self) -> Path:
        return self.run_dir / "compare"

    @property
    def mixers(self) -> list[str]:
        model = self.config.model
        return sorted({model.mixer_for_layer(i) for i in range(model.n_layers)})


def plan_runs(configs: list[str], mixers: list[str] | None, overrides: list[str], out: Path) -> list[Run]:
    """One run per config x mixer (names: the mixer, or `<config stem>-<mixer>` with several configs),
    validated up front, and refused when the runs would not share data, tokens and schedule."""
    from lmstack.config import load_config

    if not configs:
        raise LMStackError("compare: give at least one CONFIG")
    if not mixers and len(configs) < 2:
        raise LMStackError("--mixers: give two or more mixers (or two or more configs) to compare")
    stems = [Path(c).stem for c in configs]
    if len(set(stems)) < len(stems):
        stems = [f"{i}-{s}" for i, s in enumerate(stems)]
    runs = []
    for config, stem in zip(configs, stems):
        for mixer in mixers or [None]:
            name = stem if mixer is None else mixer if len(configs) == 1 else f"{stem}-{mixer}"
            extra = [] if mixer is None else [f"model.mixer={mixer}"]
            run_overrides = [*overrides, *extra, f"train.run_dir={out / 'runs' / name}"]
            run = Run(name, config, run_overrides, load_config(config, run_overrides))
            if mixer is not None and run.config.model.layer_mixers:
                raise LMStackError(
                    f"{config}: model.layer_mixers names every layer's mixer, so --mixers would not change "
                    "the model; compare configs instead (lmstack compare a.yaml b.yaml)"
                )
            runs.append(run)
    for field_name in SAME_BUDGET:
        values = {run.name: _field(run.config, field_name) for run in runs}
        if len({json.dumps(v, sort_keys=True, default=str) for v in values.values()}) > 1:
            raise LMStackError(
                f"compare: {field_name} differs between the runs ({', '.join(values)}); a comparison "
                "needs the same data, tokens and schedule (override it for all runs)"
            )
    return runs


def _field(config: Any, dotted: str) -> Any:
    import dataclasses

    value = config
    for part in dotted.split("."):
        value = getattr(value, part)
    return dataclasses.asdict(value) if dataclasses.is_dataclass(value) else value


# --- the stages of one run -------------------------------------------------------------------------


def train_run(run: Run, log: Callable[[str], None]) -> dict[str, Any]:
    """`lmstack train CONFIG overrides --resume auto` in a child process (its output in train.log),
    then the run's figures from metrics.jsonl."""
    from lmstack.checkpoint import complete_tags

    tags = complete_tags(run.run_dir / "checkpoints")
    if tags:
        log(f"{run.name}: train: resuming from checkpoint {tags[-1]}")
    run.stage_dir.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "lmstack.cli", "train", run.config_path, *run.overrides]
    cmd += ["train.progress_bar=false", "--resume", "auto"]
    start = time.perf_counter()
    log_path = run.stage_dir / "train.log"
    with open(log_path, "a") as out:
        code = subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT, env=dict(os.environ)).returncode
    if code != 0:
        errors = [
            line for line in log_path.read_text().splitlines() if line.startswith("lmstack train: error:")
        ]
        reason = f": {errors[-1].removeprefix('lmstack train: error: ')}" if errors else ""
        raise LMStackError(
            f"{run.name}: training stopped (exit code {code}){reason}; see {log_path}; run the same "
            "command again to resume"
        )
    return {**training_figures(run.run_dir), "wall_s_last_session": round(time.perf_counter() - start, 1)}


def training_figures(run_dir: Path) -> dict[str, Any]:
    """Parameters, FLOPs per token, the final validation loss and the median throughput/MFU of the
    logged windows (the first window, which holds start-up costs, left out when there are more)."""
    from lmstack.train.metrics import read_metrics

    metrics = read_metrics(run_dir)
    train, val = metrics.get("train", []), metrics.get("val", [])
    first = (metrics.get("run") or [{}])[0]
    windows = train[1:] if len(train) > 1 else train
    median = lambda key: (
        statistics.median(vs) if (vs := [r[key] for r in windows if r.get(key) is not None]) else None
    )
    return {
        "params": first.get("params"),
        "flops_per_token": first.get("flops_per_token"),
        "device": first.get("device"),
        "precision": first.get("precision"),
        "steps": train[-1]["step"] if train else 0,
        "tokens": train[-1].get("tokens") if train else 0,
        "final_train_loss": train[-1].get("loss") if train else None,
        "val_loss": val[-1]["val_loss"] if val else None,
        "val_ppl": val[-1]["val_ppl"] if val else None,
        "tokens_per_s": median("tokens_per_s"),
        "mfu": median("mfu"),
        "step_cpu_s": median("step_cpu_s"),  # CPU time of a step, all threads: robust to a busy machine
    }


def export_run(run: Run, log: Callable[[str], None]) -> dict[str, Any]:
    from lmstack.export.exporter import export_checkpoint

    result = export_checkpoint(run.run_dir, run.run_dir / "hf", overwrite=True)
    return {"dir": str(result.out_dir), "max_abs_diff": result.max_abs_diff}


def ppl_run(run: Run, log: Callable[[str], None]) -> dict[str, Any]:
    from lmstack.eval.ppl import run_ppl

    data = run.config.data
    return run_ppl(str(run.run_dir / "hf"), data.path, data.seq_len, log=log)


def state_run(run: Run, log: Callable[[str], None]) -> dict[str, Any]:
    """Elements of one sequence's decoding state (all layers) after data.seq_len tokens."""
    from lmstack.eval.loading import load_model
    from lmstack.eval.mqar import state_size

    model = load_model(run.run_dir / "hf", hf=False, device="cpu").model
    T = run.config.data.seq_len
    return {"seq_len": T, "elements": state_size(model, T, layer=None), "params": model.num_params(False)}


def mqar_run(run: Run, preset: str, settings: dict[str, Any], log: Callable[[str], None]) -> dict[str, Any]:
    """The MQAR probe (shortconv + the mixer) of a run whose layers use one mixer besides shortconv."""
    from lmstack.eval import mqar

    mixers = [m for m in run.mixers if m != "shortconv"] or run.mixers
    if len(mixers) != 1:
        return {"skipped": f"layers use several mixers ({', '.join(mixers)}): no single-mixer probe"}
    cfg = mqar.sweep_config(preset, **{**settings, "mixers": mixers, "jobs": 1})
    result = mqar.run_sweep(cfg, log=log)
    best = max(result["best"], key=lambda b: b["d_model"])  # the widest probe, if a preset has several
    return {"preset": preset, "settings": settings, **best, "data": result["config"]["data"]}


def length_run(run: Run, factor: int, log: Callable[[str], None]) -> dict[str, Any]:
    """Held-out loss and perplexity at `factor` x data.seq_len (`lmstack eval length`)."""
    from lmstack.eval.length import run_length

    L = factor * run.config.data.seq_len
    try:
        report = run_length([str(run.run_dir / "hf")], run.config.data.path, [L], log=log)
    except LMStackError as err:
        return {"skipped": str(err)}
    r = report["models"][0]["lengths"][0]
    return {"seq_len": L, "times_train_length": factor, "loss": r["loss"], "perplexity": r["perplexity"]}


def niah_run(run: Run, lengths: list[int], samples: int, log: Callable[[str], None]) -> dict[str, Any]:
    """Single-needle retrieval (`lmstack eval niah`, every form, depths 0.1/0.5/0.9); the accuracy
    at the longest length."""
    from lmstack.eval.niah import FORMS, run_niah

    try:
        report = run_niah(
            [str(run.run_dir / "hf")],
            run.config.data.path,
            lengths,
            [0.1, 0.5, 0.9],
            list(FORMS),
            samples,
            log=log,
        )
    except LMStackError as err:
        return {"skipped": str(err)}
    longest = [c["accuracy"] for c in report["models"][0]["cells"] if c["length"] == max(lengths)]
    return {
        "length": max(lengths),
        "accuracy": sum(longest) / len(longest),
        "cells": report["models"][0]["cells"],
    }


def decode_ms_per_token(run: Run, length: int = 8192) -> float | None:
    """ms per decoded token after `length` tokens from the run's `decode.json`, if one was written."""
    path = run.run_dir / "decode.json"
    if not path.is_file():
        return None
    return json.loads(path.read_text()).get("decode_ms_per_token", {}).get(str(length))


def harness_run(run: Run, tasks: list[str], batch_size: int, limit: float | None, log) -> dict[str, Any]:
    from lmstack.eval.harness import run_harness

    rep = run_harness(
        str(run.run_dir / "hf"),
        tasks,
        batch_size=batch_size,
        limit=limit,
        output=str(run.stage_dir / "harness"),
        log=log,
    )
    return {"summary": rep["summary"], "n_samples": rep["n_samples"], "settings": rep["settings"]}


# --- the comparison --------------------------------------------------------------------------------


@dataclass
class CompareSettings:
    tasks: list[str] | None  # lm-eval tasks/presets; None: no lm-eval
    harness_batch_size: int = 16
    harness_limit: float | None = None
    mqar_preset: str | None = "quick"  # None: no MQAR probe
    mqar_settings: dict[str, Any] | None = None
    length_factor: int | None = 4  # perplexity at this multiple of data.seq_len; None: skipped
    niah_lengths: list[int] | None = None  # NIAH context lengths; None: skipped
    niah_samples: int = 2  # prompts per (form, length, depth)


def _run_stages(
    run: Run, label: str, stages: dict[str, Callable], log: Callable[[str], None]
) -> dict[str, Any]:
    """The stages of one run, each skipped when its JSON file exists (written atomically when done)."""
    result: dict[str, Any] = {"name": run.name, "config": run.config_path, "overrides": run.overrides}
    for stage, fn in stages.items():
        path = run.stage_dir / f"{stage}.json"
        if path.is_file():
            log(f"{label}: {stage}: done before, skipped")
        else:
            log(f"{label}: {stage}")
            start = time.perf_counter()
            value = fn(run, lambda m: log(f"    {m}"))
            value["stage_seconds"] = round(time.perf_counter() - start, 1)
            run.stage_dir.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(".tmp")
            tmp.write_text(json.dumps(value, indent=2, default=str) + "\n")
            tmp.replace(path)
        result[stage] = json.loads(path.read_text())
    return result


def run_compare(
    configs: list[str],
    mixers: list[str] | None,
    overrides: list[str],
    out: str | Path,
    settings: CompareSettings,
    command: str | None = None,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Train, evaluate and report every run, skipping finished stages; returns the report."""
    import torch

    out = Path(out).absolute()
    runs = plan_runs(configs, mixers, overrides, out)
    if settings.mqar_preset is not None:  # bad MQAR settings fail before any training
        from lmstack.eval import mqar

        mqar.sweep_config(settings.mqar_preset, **(settings.mqar_settings or {}))
    prepared: set[str] = set()
    for run in runs:
        if run.config.data.path not in prepared:  # a no-op when the shards are there
            from lmstack.data import prepare_data

            prepare_data(run.config.data, progress=False)
            prepared.add(run.config.data.path)
    stages: dict[str, Callable[[Run, Callable], dict[str, Any]]] = {
        "train": train_run,
        "export": export_run,
        "ppl": ppl_run,
        "state": state_run,
    }
    if settings.mqar_preset is not None:
        stages["mqar"] = lambda r, lg: mqar_run(r, settings.mqar_preset, settings.mqar_settings or {}, lg)
    if settings.length_factor is not None:
        stages["length"] = lambda r, lg: length_run(r, settings.length_factor, lg)
    if settings.niah_lengths:
        stages["niah"] = lambda r, lg: niah_run(r, settings.niah_lengths, settings.niah_samples, lg)
    if settings.tasks:
        stages["harness"] = lambda r, lg: harness_run(
            r, settings.tasks, settings.harness_batch_size, settings.harness_limit, lg
        )
    # A terminated compare stops its training child too (subprocess.run kills it on the way out),
    # so that a rerun never trains the same run directory twice at once.
    with sigterm_exits():
        results = [
            _run_stages(run, f"[{i}/{len(runs)}] {run.name}", stages, log) for i, run in enumerate(runs, 1)
        ]
    for run, result in zip(runs, results):
        result["decode_ms_per_token_8k"] = decode_ms_per_token(run)
    report = {
        "command": command,
        "runs": results,
        "settings": {
            "tasks": settings.tasks,
            "harness_limit": settings.harness_limit,
            "mqar_preset": settings.mqar_preset,
            "mqar_settings": settings.mqar_settings,
            "length_factor": settings.length_factor,
            "niah_lengths": settings.niah_lengths,
            "niah_samples": settings.niah_samples,
        },
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / "compare.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
    plot_losses(runs, out / "loss.png")
    (out / "compare.md").write_text(markdown(report))
    log(f"wrote {out / 'compare.md'}, {out / 'compare.json'} and {out / 'loss.png'}")
    return report


def loss_curves(run_dir: Path) -> dict[str, tuple[list[float], list[float]]]:
    """{"train": (tokens, loss), "val": (tokens, val_loss)} of a run (tokens = step x tokens/step)."""
    from lmstack.train.metrics import read_metrics
    from lmstack.train.plot import series

    metrics = read_metrics(run_dir)
    per_step = (metrics.get("run") or [{}])[0].get("tokens_per_step", 1)
    curves = {}
    for kind, key in (("train", "loss"), ("val", "val_loss")):
        steps, values = series(metrics.get(kind, []), key)
        curves[kind] = ([s * per_step for s in steps], values)
    return curves


def plot_losses(runs: list[Run], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from lmstack.train.plot import save_figure

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5), sharey=True)
    for run in runs:
        curves = loss_curves(run.run_dir)
        axes[0].plot(*curves["train"], lw=1, label=run.name)
        axes[1].plot(*curves["val"], "o-", ms=3, label=run.name)
    for ax, title in zip(axes, ["training loss", "validation loss"]):
        ax.set_title(title)
        ax.set_xlabel("tokens")
        ax.grid(alpha=0.3)
        ax.legend()
    axes[0].set_ylabel("cross-entropy (nats/token)")
    save_figure(fig, path, dpi=110)


def _fmt(value: Any, spec: str, scale: float = 1.0) -> str:
    return "—" if value is None else format(value * scale, spec)


def long_context_columns(runs: list[dict[str, Any]]) -> list[tuple[str, Callable[[dict], str]]]:
    """(title, cell) of each long-context measure that some run has: perplexity at k x data.seq_len,
    NIAH accuracy at the longest length, decode ms/token at 8K (from decode.json)."""
    cols = []
    length = next((r["length"] for r in runs if "perplexity" in r.get("length", {})), None)
    if length is not None:
        title = f"val ppl @{length['times_train_length']}x ({length['seq_len']})"
        cols.append((title, lambda r: _fmt(r.get("length", {}).get("perplexity"), ".2f")))
    niah = next((r["niah"] for r in runs if "accuracy" in r.get("niah", {})), None)
    if niah is not None:
        cols.append((f"NIAH acc @{niah['length']}", lambda r: _fmt(r.get("niah", {}).get("accuracy"), ".3f")))
    if any(r.get("decode_ms_per_token_8k") is not None for r in runs):
        cols.append(("decode ms/token @8K", lambda r: _fmt(r.get("decode_ms_per_token_8k"), ".2f")))
    return cols


def markdown(report: dict[str, Any]) -> str:
    runs = report["runs"]
    first = runs[0]["train"]

    task_cols: list[tuple[str, str]] = []
    for r in runs:
        for row in r.get("harness", {}).get("summary", []):
            if (row["task"], row["metric"]) not in task_cols:
                task_cols.append((row["task"], row["metric"]))
    long_cols = long_context_columns(runs)
    lines = [
        "# Mixer comparison",
        "",
        f"Same data, tokens and schedule for every run: {first['steps']} steps, {first['tokens']:,} tokens, "
        f"{first['device']}, {first['precision']}. Validation perplexity from `lmstack eval ppl` on the "
        "export (every held-out token once); throughput and MFU are medians over the logged windows "
        "(MFU needs a known peak: none on CPU); state = elements of one sequence's decoding state, all "
        "layers, after data.seq_len tokens.",
        "",
        "| run | params | val ppl | tokens/s | MFU | state / sequence | MQAR acc | "
        + "".join(f"{title} | " for title, _ in long_cols)
        + " | ".join(f"{t} {m}" for t, m in task_cols)
        + " |",
        "|---|---:|---:|---:|---:|---:|---:|" + "---:|" * (len(long_cols) + len(task_cols)),
    ]
    for r in runs:
        t, mq = r["train"], r.get("mqar", {})
        rows = {(h["task"], h["metric"]): h for h in r.get("harness", {}).get("summary", [])}
        cells = [
            r["name"],
            f"{t['params']:,}",
            _fmt(r["ppl"]["perplexity"], ".2f"),
            _fmt(t["tokens_per_s"], ",.0f"),
            _fmt(t["mfu"], ".1f", 100) + ("%" if t["mfu"] is not None else ""),
            f"{r['state']['elements']:,} (T={r['state']['seq_len']})",
            "—" if "accuracy" not in mq else f"{mq['accuracy']:.3f}",
            *(cell(r) for _, cell in long_cols),
        ]
        for key in task_cols:
            h = rows.get(key)
            pct = h is not None and h["higher_is_better"]
            cells.append("—" if h is None else _fmt(h["value"], ".2f", 100 if pct else 1))
        lines.append("| " + " | ".join(cells) + " |")
    mq = next((r["mqar"] for r in runs if "accuracy" in r.get("mqar", {})), None)
    if mq is not None:
        d = mq["data"]
        lines += [
            "",
            f"MQAR: the `{mq['preset']}` probe (2 layers: shortconv, then the run's mixer; d_model "
            f"{mq['d_model']}, vocab {d['vocab_size']}, seq_len {d['seq_len']}, {d['num_kv_pairs']} pairs), "
            "test accuracy at the learning rate chosen on validation. lm-eval columns: accuracies in %, "
            "perplexities as is.",
        ]
    skipped = [f"{r['name']} ({r['mqar']['skipped']})" for r in runs if "skipped" in r.get("mqar", {})]
    if skipped:
        lines += ["", "MQAR not run for: " + "; ".join(skipped)]
    lines += ["", "![loss curves](loss.png)"]
    if report.get("command"):
        lines += ["", "Made with:", "", "```", report["command"], "```"]
    return "\n".join(lines) + "\n"
