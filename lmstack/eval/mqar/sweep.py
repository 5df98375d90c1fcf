"""The MQAR sweep: one probe per mixer x d_model x learning rate, as Zoology does.

Per (mixer, d_model) group the learning rates run with the first seed (stopping once one solves the
validation split), then further seeds rerun the rate chosen on validation accuracy. Groups run in
this process or in a pool of spawned worker processes (`jobs`); a sweep writing to an existing
prefix reuses the groups finished with the same settings (`sweep_key`), also those of an interrupted
sweep, recorded one group a line in PREFIX.progress.jsonl (`load_finished`).
"""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from lmstack.errors import LMStackError
from lmstack.eval import sigterm_exits
from lmstack.eval.mqar.probe import INITS, RECIPES, TrainSettings, train_one
from lmstack.eval.mqar.task import MQARConfig, make_splits


@dataclass
class SweepConfig:
    data: MQARConfig = field(default_factory=MQARConfig)
    train: TrainSettings = field(default_factory=TrainSettings)
    mixers: list[str] | None = None  # None: every registered mixer except shortconv
    d_models: list[int] = field(default_factory=lambda: [64, 128, 256])
    lrs: list[float] = field(default_factory=lambda: [1e-4, 4.6e-4, 2.2e-3, 1e-2])
    n_heads: int = 1
    # Heads of the mixers that need more than n_heads: MoH routes among heads (4: 2 shared, 2 routed,
    # the top 1 of them per token); its state size is attention's whatever the heads.
    mixer_heads: dict[str, int] = field(default_factory=lambda: {"moh": 4})
    seeds: int = 1  # seeds of the chosen learning rate (the sweep itself runs the first seed)
    mixer_options: dict[str, dict[str, Any]] = field(default_factory=dict)
    # Named variants of a mixer, swept as mixers of their own: label -> {"mixer": name, "options": {...}}
    # (the options over `mixer_options[name]`), e.g. GLA at full key width beside its default.
    variants: dict[str, dict[str, Any]] = field(default_factory=dict)
    threads: int | None = None  # torch CPU threads (None: torch's default; 1 in worker processes)
    jobs: int = 1  # worker processes, each training one (mixer, d_model) group at a time


# CPU preset (2 cores, <= 15 min for every mixer): 8 pairs in 32 tokens (vocab 64), d_model 16 / 32
# (16 is the smallest head the lightning and deltanet ops take). At d_model 16 the pairs fill a
# recurrent state of d_model-sized keys while attention's KV cache holds them all. Zoology's recipe,
# its learning-rate grid and 3 seeds, but for the init: with N(0, 0.02) attention stays on its
# initial plateau for the whole CPU budget (measured, d_model 64, lr 2.2e-3, batch 32: validation
# accuracy 0.03 -> 0.07 over 1125 steps, loss 3.50 -> 3.40 against ln 32 = 3.47 for a guess among the
# values; with N(0, 1/d_model) and the rest of the recipe unchanged, 0.998 after 500 steps at d_model
# 32). The budget (2 epochs of 375 steps per run, early stopping after 4 evaluations of 125 steps
# without gain) is what fitted 15 minutes of 2 shared cores; the table reports what it measured, not
# each mixer's capacity limit.
PRESETS: dict[str, dict[str, Any]] = {
    "cpu": {
        "recipe": "zoology",
        "init": "scaled",
        "data": {
            "vocab_size": 64,
            "seq_len": 32,
            "num_kv_pairs": 8,
            "train_size": 12_000,
            "val_size": 500,
            "test_size": 1000,
        },
        "train": {"epochs": 2, "batch_size": 32, "eval_every": 125, "patience": 4},
        "d_models": [16, 32],
        # Zoology's grid, np.logspace(-4, -2, 4), run from the rate nearest the best of the earlier
        # sweeps (3e-3) outwards: the rates left once one solves the validation split are skipped.
        "lrs": [2.2e-3, 1e-2, 4.6e-4, 1e-4],
        "seeds": 3,
        "variants": {"gla_k1": {"mixer": "gla", "options": {"expand_k": 1.0}}},
        # A window of half the sequence (the default, 512, would make swa attention here): its state,
        # 2 x 15 x d_model, about half of attention's, and a pair may lie up to 30 tokens before its query.
        "mixer_options": {"swa": {"window": 16}},
        # One thread per model, one model per core: these models are too small to gain from more
        # threads, and on a busy machine extra threads spin-wait (measured: 13 ms of CPU per step on
        # 1 thread vs ~100 ms on 2 under load).
        "threads": 1,
        "jobs": 2,
    },
    # `lmstack compare`'s probe: the cpu preset's task at d_model 32, lmstack's recipe, one rate, shorter.
    "quick": {
        "data": {
            "vocab_size": 64,
            "seq_len": 32,
            "num_kv_pairs": 8,
            "train_size": 16_000,
            "val_size": 300,
            "test_size": 500,
        },
        "train": {"epochs": 3, "batch_size": 32, "eval_every": 250, "patience": 3},
        "d_models": [32],
        "lrs": [3e-3],
        "threads": 1,
    },
    # Zoology's hardest setting (GPU): T = 512 with 64 key-value pairs, lr 1e-4 ... 1e-2 log-spaced,
    # Zoology's recipe (init, decay, schedule), up to 64 epochs as in its figure-2 configs.
    "zoology": {
        "recipe": "zoology",
        "data": {
            "vocab_size": 8192,
            "seq_len": 512,
            "num_kv_pairs": 64,
            "train_size": 100_000,
            "val_size": 1000,
            "test_size": 3000,
        },
        "train": {"epochs": 64, "batch_size": 64, "patience": 4},
        "d_models": [64, 128, 256],  # one head: 256 is the ops' largest head dimension
        "lrs": [1e-4, 4.6e-4, 2.2e-3, 1e-2],
        "seeds": 3,
        "variants": {"gla_k1": {"mixer": "gla", "options": {"expand_k": 1.0}}},
        # Values as wide as the keys, as DeltaNet's: at one head of 256 the layer's default expand_v 2
        # would ask for value heads of 512, past the op's largest head (256).
        "mixer_options": {"gated_deltanet": {"expand_v": 1.0}},
    },
}


def sweep_config(preset: str | None = None, **overrides: Any) -> SweepConfig:
    cfg = SweepConfig()
    if preset is not None:
        if preset not in PRESETS:
            raise LMStackError(f"mqar: unknown preset '{preset}'; known: {', '.join(PRESETS)}")
        p = PRESETS[preset]
        cfg = SweepConfig(
            data=MQARConfig(**p["data"]),
            train=TrainSettings(
                **p["train"], recipe=p.get("recipe", "lmstack"), init=p.get("init", "recipe")
            ),
            d_models=list(p["d_models"]),
            lrs=list(p["lrs"]),
            seeds=p.get("seeds", 1),
            mixer_options=dict(p.get("mixer_options", {})),
            variants=dict(p.get("variants", {})),
            threads=p.get("threads"),
            jobs=p.get("jobs", 1),
        )
    for key, value in overrides.items():
        if value is None:
            continue
        if key == "mixer_options":  # per mixer: options given for one mixer keep the preset's for others
            value = {**cfg.mixer_options, **value}
        if hasattr(cfg.data, key):
            setattr(cfg.data, key, value)
        elif hasattr(cfg.train, key):
            setattr(cfg.train, key, value)
        elif hasattr(cfg, key):
            setattr(cfg, key, value)
        else:
            raise LMStackError(f"mqar: unknown setting '{key}'")
    cfg.data.validate()
    if cfg.data.train_size < cfg.train.batch_size:
        raise LMStackError(
            f"mqar: train_size {cfg.data.train_size} is smaller than batch_size {cfg.train.batch_size}: "
            "no training step would run"
        )
    for name in ("val_size", "test_size"):
        if getattr(cfg.data, name) < 1:
            raise LMStackError(f"mqar: {name} must be at least 1, got {getattr(cfg.data, name)}")
    if cfg.train.recipe not in RECIPES:
        raise LMStackError(f"mqar: recipe must be one of {', '.join(RECIPES)}, got '{cfg.train.recipe}'")
    if cfg.train.init not in INITS:
        raise LMStackError(f"mqar: init must be one of {', '.join(INITS)}, got '{cfg.train.init}'")
    if cfg.seeds < 1:
        raise LMStackError(f"mqar: seeds must be at least 1, got {cfg.seeds}")
    for name, options in (cfg.mixer_options or {}).items():
        from lmstack.model import get_mixer
        from lmstack.model.schema import from_dict

        from_dict(get_mixer(name).Options, options, f"--mixer-options {name}.")
    for label in cfg.variants:
        mixer_and_options(cfg, label)
    return cfg


def mixer_and_options(cfg: SweepConfig, label: str) -> tuple[str, dict[str, dict[str, Any]] | None]:
    """(registered mixer, its `mixer_options` entry or None) of a swept mixer or variant label."""
    from lmstack.model import MIXERS

    variant = cfg.variants.get(label)
    mixer = variant["mixer"] if variant else label
    if mixer not in MIXERS:
        raise LMStackError(f"mqar: unknown mixer '{mixer}'; registered: {', '.join(sorted(MIXERS))}")
    options = {**cfg.mixer_options.get(mixer, {}), **(variant or {}).get("options", {})}
    return mixer, ({mixer: options} if options else None)


def default_mixers() -> list[str]:
    from lmstack.model import MIXERS

    return [name for name in MIXERS if name != "shortconv"]


def _run_group(cfg: SweepConfig, mixer: str, d: int, data=None, log=print) -> list[dict[str, Any]]:
    """One (mixer, d_model): the learning rates with the first seed (stopping once one solves the
    validation split), then the other seeds at the learning rate with the best validation accuracy."""
    if data is None:
        data = make_splits(cfg.data)
    label, (mixer, options) = mixer, mixer_and_options(cfg, mixer)

    def run(lr: float, seed: int) -> dict[str, Any]:
        settings = dataclasses.replace(cfg.train, seed=seed)
        heads = cfg.mixer_heads.get(mixer, cfg.n_heads)
        return {**train_one(mixer, d, lr, cfg.data, data, settings, heads, options, log), "mixer": label}

    runs = []
    for lr in cfg.lrs:
        runs.append(run(lr, cfg.train.seed))
        if runs[-1]["val_accuracy"] >= cfg.train.solved_at:
            break  # solved: the remaining learning rates cannot do better
    chosen = max(runs, key=lambda r: r["val_accuracy"])["lr"]
    runs += [run(chosen, cfg.train.seed + i) for i in range(1, cfg.seeds)]
    return runs


def best_per_group(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per (mixer, d_model): the learning rate chosen on validation accuracy (first seed) and its
    test accuracy over the seeds (mean, min, max)."""
    groups: dict[tuple[str, int], list[dict[str, Any]]] = {}
    for r in runs:
        groups.setdefault((r["mixer"], r["d_model"]), []).append(r)
    best = []
    for (mixer, d), rs in groups.items():
        first_seed = min(r["seed"] for r in rs)
        chosen = max((r for r in rs if r["seed"] == first_seed), key=lambda r: r["val_accuracy"])
        at_lr = [r for r in rs if r["lr"] == chosen["lr"]]
        accs = [r["accuracy"] for r in at_lr]
        best.append(
            {
                "mixer": mixer,
                "d_model": d,
                "lr": chosen["lr"],
                "accuracy": round(sum(accs) / len(accs), 4),
                "accuracy_min": min(accs),
                "accuracy_max": max(accs),
                "seeds": len(accs),
                "val_accuracy": chosen["val_accuracy"],
                "state_size": chosen["state_size"],
                "params": chosen["params"],
                "steps": chosen["steps"],
            }
        )
    return best


def _worker(job: tuple) -> list[dict[str, Any]]:
    """A worker process: one (mixer, d_model) group. Spawned, so it imports the mixers' modules
    (a mixer registered outside lmstack.model.mixers, e.g. by a plugin, is imported by name)."""
    import importlib
    import sys

    cfg, mixer, d, modules = job
    for module in modules:
        importlib.import_module(module)
    torch.set_num_threads(cfg.threads or 1)
    return _run_group(cfg, mixer, d, log=lambda m: print(m, file=sys.stderr, flush=True))


def sweep_key(cfg: SweepConfig) -> str:
    """What makes two sweeps' runs comparable: every setting but the groups (mixers, d_models) and
    the parallelism."""
    fields = {
        k: getattr(cfg, k) for k in ("lrs", "n_heads", "mixer_heads", "seeds", "mixer_options", "variants")
    }
    return json.dumps(
        {"data": dataclasses.asdict(cfg.data), "train": dataclasses.asdict(cfg.train), **fields}
    )


def run_sweep(
    cfg: SweepConfig, log=print, done: list[dict[str, Any]] | None = None, on_group=None
) -> dict[str, Any]:
    """Train every (mixer, d_model) group of `cfg` but those with runs in `done` (from an earlier,
    interrupted or narrower sweep with the same `sweep_key`); `on_group(runs)` sees each group as
    it finishes. Returns the result of all groups (`write_outputs` writes it)."""
    from lmstack.model import MIXERS

    mixers = cfg.mixers or default_mixers() + list(cfg.variants)
    for m in mixers:
        mixer_and_options(cfg, m)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    done = [r for r in done or [] if r["mixer"] in mixers and r["d_model"] in cfg.d_models]
    finished = {(r["mixer"], r["d_model"]) for r in done}
    groups = [(m, d) for m in mixers for d in cfg.d_models if (m, d) not in finished]
    log(
        f"MQAR: vocab={cfg.data.vocab_size} seq_len={cfg.data.seq_len} kv_pairs={cfg.data.num_kv_pairs} "
        f"train={cfg.data.train_size} val={cfg.data.val_size} test={cfg.data.test_size}; mixers={mixers} "
        f"d_models={cfg.d_models} lrs={cfg.lrs}; {len(groups)} group(s) to train ({len(finished)} done "
        f"before), {cfg.jobs} worker process(es)"
    )
    on_group = on_group or (lambda runs: None)
    start = time.perf_counter()
    new: list[dict[str, Any]] = []
    if cfg.jobs > 1 and groups:
        import multiprocessing

        # Largest first, so that the long groups do not end up last on one worker.
        groups.sort(key=lambda g: -g[1])
        modules = sorted(
            {MIXERS[mixer_and_options(cfg, m)[0]].__module__ for m in mixers}
            | {MIXERS["shortconv"].__module__}
        )
        jobs = [(cfg, m, d, modules) for m, d in groups]
        # A terminated sweep terminates its workers (the pool's exit) instead of orphaning them.
        with sigterm_exits(), multiprocessing.get_context("spawn").Pool(min(cfg.jobs, len(jobs))) as pool:
            for runs in pool.imap_unordered(_worker, jobs, chunksize=1):
                on_group(runs)
                new += runs
    elif groups:
        data = make_splits(cfg.data)
        for m, d in groups:
            runs = _run_group(cfg, m, d, data, log)
            on_group(runs)
            new += runs
    # The same order whatever ran where: mixers as given, then d_model, then as trained.
    order = {(m, d): i for i, (m, d) in enumerate((m, d) for m in mixers for d in cfg.d_models)}
    runs = sorted(done + new, key=lambda r: order[(r["mixer"], r["d_model"])])
    return {
        "config": {
            "data": dataclasses.asdict(cfg.data),
            "train": dataclasses.asdict(cfg.train),
            "mixers": mixers,
            "d_models": cfg.d_models,
            "lrs": cfg.lrs,
            "n_heads": cfg.n_heads,
            "mixer_heads": {m: h for m, h in cfg.mixer_heads.items() if m in mixers},
            "seeds": cfg.seeds,
            "mixer_options": cfg.mixer_options,
            "variants": cfg.variants,
            "model": "2 layers: shortconv (kernel 4) then the mixer, each with a SwiGLU MLP (hidden 2*d_model)",
        },
        "sweep_key": sweep_key(cfg),
        "best": sorted(best_per_group(runs), key=lambda b: (mixers.index(b["mixer"]), b["d_model"])),
        "runs": runs,
        "seconds": round(time.perf_counter() - start, 1),  # this session's wall time
        "cpu_seconds": round(sum(r["cpu_seconds"] for r in runs), 1),  # training CPU time, all runs
        "jobs": cfg.jobs,
        "torch": torch.__version__,
        "threads": cfg.threads or torch.get_num_threads(),
    }


def sweep_files(out_prefix: str | Path) -> tuple[Path, Path]:
    """(PREFIX.json, PREFIX.progress.jsonl): the result of the sweep writing `out_prefix`, and the
    record of its groups while it runs (removed once PREFIX.json is written)."""
    prefix = Path(out_prefix)
    return prefix.with_suffix(".json"), prefix.with_suffix(".progress.jsonl")


def load_finished(cfg: SweepConfig, out_prefix: str | Path):
    """(runs of the groups finished before with the same settings, a callback that records each new
    group) for the sweep writing `out_prefix`: read from PREFIX.json and from PREFIX.progress.jsonl,
    the record of a sweep that was interrupted (removed once PREFIX.json is written)."""
    key = sweep_key(cfg)
    result_path, progress_path = sweep_files(out_prefix)
    sources: list[list[dict[str, Any]]] = []
    if result_path.is_file():
        old = json.loads(result_path.read_text())
        if old.get("sweep_key") == key:
            sources.append(old["runs"])
    if progress_path.is_file():
        for line in progress_path.read_text().splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:  # a line cut by a crash: that group runs again
                continue
            if record.get("sweep_key") == key:
                sources.append(record["runs"])
    by_group: dict[tuple[str, int], list[dict[str, Any]]] = {}
    for runs in sources:  # each group once, from the first source that has it
        for group in dict.fromkeys((r["mixer"], r["d_model"]) for r in runs):
            if group not in by_group:
                by_group[group] = [r for r in runs if (r["mixer"], r["d_model"]) == group]

    def record(runs: list[dict[str, Any]]) -> None:
        progress_path.parent.mkdir(parents=True, exist_ok=True)
        with open(progress_path, "a") as f:
            f.write(json.dumps({"sweep_key": key, "runs": runs}) + "\n")

    return [r for runs in by_group.values() for r in runs], record
