"""Zero-shot evaluation through lm-eval's Python API (lm-eval is pinned in pyproject.toml).

`lmstack eval harness MODEL --tasks paper` loads an exported model folder or a trainer checkpoint /
run directory (`lmstack.eval.loading.load_model`), wraps it in lm-eval's `HFLM`, runs the tasks and
reports the conventional metric of each task as JSON and as a Markdown table.

- Presets: `paper` (the zero-shot suite of the linear-attention papers), `extended` (+ boolq, sciq,
  openbookqa, copa), `offline` (the local task pack in evals/tasks, no downloads).
- BOS: lm-eval gets `add_bos_token` from what training did (the data set's `add_bos`, recorded with
  the tokenizer), so that scored text is framed as training text was.
- Standard tasks need their data sets from the Hugging Face hub or its local cache; all tasks are
  loaded before the model, and the missing ones are named together with how to provide them.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import re
from pathlib import Path
from typing import Any

from lmstack.errors import LMStackError
from lmstack.eval.loading import load_model

PRESETS: dict[str, list[str]] = {
    "paper": ["wikitext", "lambada_openai", "piqa", "hellaswag", "winogrande", "arc_easy", "arc_challenge"],
    "offline": ["lmstack_lambada", "lmstack_mc"],
}
PRESETS["extended"] = [*PRESETS["paper"], "boolq", "sciq", "openbookqa", "copa"]

#: The metric each task is conventionally reported with: (lm-eval metric, label). The first is the
#: headline metric; LAMBADA-style tasks also report accuracy, as the papers do.
CONVENTIONAL: dict[str, list[tuple[str, str]]] = {
    "wikitext": [("word_perplexity", "word ppl")],
    "lambada_openai": [("perplexity", "ppl"), ("acc", "acc")],
    "lambada_standard": [("perplexity", "ppl"), ("acc", "acc")],
    "lmstack_lambada": [("perplexity", "ppl"), ("acc", "acc")],
    "hellaswag": [("acc_norm", "acc_norm")],
    "arc_challenge": [("acc_norm", "acc_norm")],
}
#: For tasks not listed above: the first metric present in this order. Every task that has
#: `acc_norm` also reports it (after its headline metric).
FALLBACK_METRICS = ["acc", "word_perplexity", "perplexity", "acc_norm", "exact_match", "f1"]

#: The repository's offline task pack (a checkout's evals/tasks; not part of an installed wheel).
TASK_PACK = Path(__file__).resolve().parents[2] / "evals" / "tasks"

LOWER_IS_BETTER = ("perplexity", "ppl", "bits_per_byte")


def expand_tasks(specs: list[str]) -> list[str]:
    """Task names from `--tasks` values: comma-separated names or preset names, order kept, no repeats."""
    names: list[str] = []
    for spec in specs:
        for item in (s.strip() for s in spec.split(",")):
            if not item:
                continue
            for name in PRESETS.get(item, [item]):
                if name not in names:
                    names.append(name)
    if not names:
        raise LMStackError(f"no tasks given; name tasks or a preset ({', '.join(PRESETS)})")
    return names


def include_paths(extra: list[str] | None = None) -> list[str]:
    paths = [str(TASK_PACK)] if TASK_PACK.is_dir() else []
    for p in extra or []:
        if not Path(p).exists():
            raise LMStackError(f"--include-path {p}: no such file or folder")
        paths.append(str(Path(p).resolve()))
    return paths


def _quiet_lm_eval() -> None:
    for name in ("lm_eval", "lm-eval"):
        logging.getLogger(name).setLevel(logging.ERROR)


def _dataset_of(task_manager, name: str, err: Exception | None = None) -> str:
    """The hub data set a task reads (from its YAML, else from the error), for error messages."""
    entry = getattr(task_manager, "_index", {}).get(name)
    cfg = getattr(entry, "cfg", None) or {}
    path, sub = cfg.get("dataset_path"), cfg.get("dataset_name")
    if path:
        return f"'{path}'" + (f" (config '{sub}')" if sub else "")
    match = re.search(r"reach '([^']+)'", str(err or ""))
    return f"'{match.group(1)}'" if match else "(see the task's YAML)"


@functools.lru_cache(maxsize=4)
def _task_manager(paths: tuple[str, ...], defaults: bool):
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=list(paths) or None, include_defaults=defaults)


def task_manager_for(names: list[str], paths: list[str]):
    """A TaskManager that knows `names`: only the local folders when they suffice (indexing lm-eval's
    own few thousand task YAMLs takes seconds), else those plus lm-eval's tasks. Cached per process."""
    if paths:
        local = _task_manager(tuple(paths), False)
        if all(n in local.all_tasks for n in names):
            return local
    return _task_manager(tuple(paths), True)


MISSING_DATA_HELP = """\
Standard lm-eval tasks read their data sets from the Hugging Face hub; this machine cannot reach it
(offline) and they are not in the local cache. To provide them:
  1. on a machine with network access run the same command once (or
     `python -c "import datasets; datasets.load_dataset('<data set>', '<config>')"`) so that the
     data sets land in the Hugging Face cache ($HF_HOME, default ~/.cache/huggingface);
  2. copy that cache folder here and point HF_HOME (or HF_DATASETS_CACHE) at it, keeping
     HF_DATASETS_OFFLINE=1;
  or write a local task YAML (`dataset_path: json` with absolute `data_files`, or
  `custom_dataset: !function module.loader`) and pass its folder with --include-path.
The offline task pack needs none of this: --tasks offline."""


def load_task_dict(names: list[str], extra_include: list[str] | None = None) -> dict[str, Any]:
    """lm-eval task objects by name, data sets loaded; every failing task is named in one error."""
    _quiet_lm_eval()
    from lm_eval.tasks import get_task_dict

    paths = include_paths(extra_include)
    tm = task_manager_for(names, paths)
    tasks: dict[str, Any] = {}
    unknown, missing, broken = [], [], []
    for name in names:
        try:
            tasks.update(get_task_dict([name], tm))
        except KeyError:
            unknown.append(name)
        except (ConnectionError, FileNotFoundError, OSError) as err:
            missing.append(
                f"  {name}: data set {_dataset_of(tm, name, err)} not available ({type(err).__name__}: {err})"
            )
        except Exception as err:  # a task YAML or data error: name the task, keep the cause
            if "DatasetNotFound" in type(err).__name__ or "Offline" in type(err).__name__:
                missing.append(f"  {name}: data set {_dataset_of(tm, name, err)} not available ({err})")
            else:
                broken.append(f"  {name}: {type(err).__name__}: {err}")
    msgs = []
    if unknown:
        msgs.append(
            f"unknown task(s): {', '.join(unknown)}; presets: {', '.join(PRESETS)}; "
            f"local tasks are searched in: {', '.join(paths) or '(none)'} (add folders with --include-path)"
        )
    if missing:
        msgs.append("missing data sets:\n" + "\n".join(missing) + "\n" + MISSING_DATA_HELP)
    if broken:
        msgs.append("tasks that failed to load:\n" + "\n".join(broken))
    if msgs:
        raise LMStackError("\n".join(msgs))
    return tasks


# --- the model in lm-eval (loaded by lmstack.eval.loading) -----------------------------------------


def make_lm(
    model: Any,
    tokenizer: Any,
    add_bos: bool | None = None,
    batch_size: int | str = 8,
    max_length: int | None = None,
):
    """lm-eval's HFLM around a model already in memory."""
    _quiet_lm_eval()
    from lm_eval.models.huggingface import HFLM

    bos, eos = getattr(tokenizer, "bos_token_id", None), getattr(tokenizer, "eos_token_id", None)
    if add_bos and bos is None:
        raise LMStackError("training added BOS but the tokenizer has no bos_token")
    if add_bos:
        probe = tokenizer("x", add_special_tokens=True)["input_ids"]
        if not probe or probe[0] != bos:
            raise LMStackError(
                "add_bos: this tokenizer does not prepend BOS when encoding; cannot match training"
            )
    if tokenizer.pad_token_id is None and eos is not None:
        tokenizer.pad_token = tokenizer.eos_token
    # Text with no context (wikitext's rolling windows) is conditioned on what preceded documents in
    # training: BOS when documents started with it, else the previous document's EOS.
    prefix = bos if add_bos else (eos if eos is not None else bos)
    return HFLM(
        pretrained=model,
        tokenizer=tokenizer,
        backend="causal",
        batch_size=batch_size,
        max_length=max_length,
        add_bos_token=add_bos,
        prefix_token_id=prefix,
    )


# --- running and reporting -------------------------------------------------------------------------


def evaluate(
    lm: Any,
    tasks: dict[str, Any],
    limit: int | float | None = None,
    bootstrap_iters: int = 1000,
    seed: int = 1234,
) -> dict[str, Any]:
    """Raw lm-eval results (`results`, `n-samples`, `configs`, ...) for tasks from `load_task_dict`."""
    import lm_eval

    _quiet_lm_eval()
    out = lm_eval.simple_evaluate(
        model=lm,
        tasks=list(_flatten(tasks)),
        # The tasks are built already; without a manager lm-eval would index its whole task tree again.
        task_manager=_task_manager(tuple(include_paths()), False),
        limit=limit,
        bootstrap_iters=bootstrap_iters,
        log_samples=False,
        random_seed=seed,
        numpy_random_seed=seed,
        torch_random_seed=seed,
        fewshot_random_seed=seed,
    )
    if out is None:
        raise LMStackError("lm-eval returned no results")
    return out


def _flatten(tasks: dict[str, Any]):
    """Task objects of a `get_task_dict` result (groups flattened into their tasks)."""
    for value in tasks.values():
        if isinstance(value, dict):
            yield from _flatten(value)
        else:
            yield value


def headline(task: str, metrics: dict[str, Any]) -> list[dict[str, Any]]:
    """The conventional metric row(s) of one task from lm-eval's `results[task]`."""

    def value(metric: str) -> tuple[float | None, float | None]:
        for key, v in metrics.items():
            name, _, _filter = key.partition(",")
            if name == metric and isinstance(v, int | float):
                se = metrics.get(f"{metric}_stderr,{_filter}") if _filter else metrics.get(f"{metric}_stderr")
                return float(v), float(se) if isinstance(se, int | float) else None
        return None, None

    present = {k.partition(",")[0] for k in metrics}
    wanted = CONVENTIONAL.get(task)
    if wanted is None:
        wanted = [(m, m) for m in FALLBACK_METRICS if m in present][:1]
    if "acc_norm" in present and all(metric != "acc_norm" for metric, _ in wanted):
        wanted = [*wanted, ("acc_norm", "acc_norm")]  # length-normalised accuracy, where a task has it
    rows = []
    for metric, label in wanted:
        v, se = value(metric)
        if v is not None:
            lower = any(s in metric for s in LOWER_IS_BETTER)
            rows.append(
                {
                    "task": task,
                    "metric": label,
                    "lm_eval_metric": metric,
                    "value": v,
                    "stderr": se,
                    "higher_is_better": not lower,
                }
            )
    return rows


def summarize(raw: dict[str, Any]) -> list[dict[str, Any]]:
    rows = []
    for task, metrics in raw["results"].items():
        rows.extend(headline(task, metrics))
    return rows


def markdown(rows: list[dict[str, Any]], title: str | None = None) -> str:
    lines = [f"## {title}", ""] if title else []
    lines += ["| task | metric | value | ± stderr |", "|---|---|---:|---:|"]
    for r in rows:
        acc_like = not any(s in r["lm_eval_metric"] for s in LOWER_IS_BETTER)
        fmt = (lambda x: f"{100 * x:.2f}") if acc_like else (lambda x: f"{x:.2f}")
        se = "" if r["stderr"] is None else fmt(r["stderr"])
        label = r["metric"] + (" (%)" if acc_like else "")
        lines.append(f"| {r['task']} | {label} | {fmt(r['value'])} | {se} |")
    return "\n".join(lines) + "\n"


def report(raw: dict[str, Any], model: str, settings: dict[str, Any]) -> dict[str, Any]:
    import lm_eval

    return {
        "model": model,
        "settings": settings,
        "lm_eval_version": getattr(lm_eval, "__version__", "?"),
        "summary": summarize(raw),
        "results": raw.get("results", {}),
        "n_samples": raw.get("n-samples", {}),
    }


def run_harness(
    model_path: str,
    tasks: list[str],
    batch_size: int | str = 8,
    dtype: str = "float32",
    device: str | None = None,
    add_bos: bool | None = None,
    limit: float | None = None,
    include: list[str] | None = None,
    max_length: int | None = None,
    output: str | None = None,
    log=print,
) -> dict[str, Any]:
    """The work behind `lmstack eval harness`: returns the report (also written under `output`)."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    names = expand_tasks(tasks)
    task_dict = load_task_dict(names, include)  # fail on missing data before loading the model
    loaded = load_model(model_path, dtype, hf=True, device=device)
    for note in loaded.notes:
        log(note)
    bos = loaded.add_bos if add_bos is None else add_bos
    log(
        f"evaluating {model_path} on {', '.join(names)} (add_bos_token={bos}, dtype={dtype}, batch={batch_size})"
    )
    lm = make_lm(loaded.model, loaded.tokenizer, bos, batch_size, max_length)
    raw = evaluate(lm, task_dict, limit=limit)
    settings = {
        "tasks": names,
        "batch_size": batch_size,
        "dtype": dtype,
        "add_bos_token": bos,
        "limit": limit,
    }
    rep = report(raw, str(model_path), settings)
    if output:
        out = Path(output)
        out.mkdir(parents=True, exist_ok=True)
        (out / "harness.json").write_text(json.dumps(rep, indent=2, default=str) + "\n")
        (out / "harness.md").write_text(markdown(rep["summary"], f"lm-eval zero-shot: {model_path}"))
        log(f"wrote {out / 'harness.json'} and {out / 'harness.md'}")
    return rep
