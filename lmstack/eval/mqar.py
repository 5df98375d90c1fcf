"""MQAR: Zoology's multi-query associative recall (Arora et al., 2023), a synthetic probe of how
much a token mixer can recall from its context.

A sequence is `num_kv_pairs` key-value pairs `k1 v1 k2 v2 ...` (keys from the lower half of the
vocabulary, values from the upper half, all distinct within a sequence), then a region where every
key is asked once: the query's position is drawn by a power law (`power_a`; small gaps likelier)
and the model must predict the key's value as the next token. Loss and accuracy count only those
positions (labels are -100 elsewhere); the unused positions hold random tokens.

The model is Zoology's 2-layer probe: a short causal convolution (`shortconv`), then the mixer
under test, each followed by the MLP of `lmstack.model.LM`. The sweep trains one model per mixer x
d_model x learning rate and keeps the best learning rate, as Zoology does.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from lmstack.errors import LMStackError

IGNORE = -100


@dataclass
class MQARConfig:
    vocab_size: int = 8192
    seq_len: int = 64
    num_kv_pairs: int = 4
    power_a: float = 0.01
    train_size: int = 100_000
    test_size: int = 3_000
    random_non_queries: bool = True

    def validate(self) -> None:
        if self.seq_len % 2:
            raise LMStackError(f"mqar: seq_len must be even, got {self.seq_len}")
        if self.num_kv_pairs < 1 or 4 * self.num_kv_pairs > self.seq_len:
            raise LMStackError(
                f"mqar: need 1 <= num_kv_pairs <= seq_len / 4, got num_kv_pairs={self.num_kv_pairs} "
                f"with seq_len={self.seq_len}"
            )
        if self.vocab_size // 2 - 1 < self.num_kv_pairs:
            raise LMStackError(
                f"mqar: vocab_size={self.vocab_size} leaves fewer than num_kv_pairs={self.num_kv_pairs} "
                "distinct keys in its lower half"
            )
        if not 0 < self.power_a <= 1:
            raise LMStackError(f"mqar: power_a must be in (0, 1], got {self.power_a}")


def _distinct(n: int, k: int, low: int, high: int, gen: torch.Generator) -> torch.Tensor:
    """[n, k] tokens drawn without replacement from [low, high) in each row."""
    return torch.rand(n, high - low, generator=gen).argsort(dim=1)[:, :k] + low


def multiquery_ar(
    vocab_size: int,
    num_examples: int,
    seq_len: int,
    num_kv_pairs: int,
    power_a: float = 0.01,
    seed: int = 0,
    random_non_queries: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(inputs, labels): both [num_examples, seq_len] int64, as Zoology's `multiquery_ar`.

    Keys come from [1, V/2), values from [V/2, V). `labels[i, t]` is the value of the key at
    `inputs[i, t]` where that position is a query, else -100 (-100 everywhere in the kv region).
    """
    MQARConfig(vocab_size, seq_len, num_kv_pairs, power_a).validate()
    gen = torch.Generator().manual_seed(seed)
    n, K = num_examples, num_kv_pairs
    context = 2 * K
    half = vocab_size // 2
    keys = _distinct(n, K, 1, half, gen)
    values = _distinct(n, K, half, vocab_size, gen)
    kvs = torch.stack([keys, values], dim=2).reshape(n, context)

    # Query slots: the query region has `space` even offsets; key i goes to offset 2 * gap_i, the
    # gaps drawn without replacement with p(g) ~ g^(power_a - 1) (g = 1..space): short gaps likelier.
    space = (seq_len - context) // 2
    p = power_a * torch.arange(1, space + 1, dtype=torch.float64) ** (power_a - 1)
    gaps = torch.multinomial((p / p.sum()).expand(n, space), K, replacement=False, generator=gen)
    queries = torch.zeros(n, seq_len - context + 1, dtype=torch.long)
    queries.scatter_(1, 2 * gaps, keys)
    examples = torch.cat([kvs, queries], dim=1)  # [n, seq_len + 1]
    labels = torch.full((n, seq_len + 1), IGNORE, dtype=torch.long)
    labels.scatter_(1, 2 * gaps + context + 1, values)
    inputs, labels = examples[:, :-1].clone(), labels[:, 1:].clone()
    if random_non_queries:
        filler = inputs == 0
        inputs[filler] = torch.randint(vocab_size, inputs.shape, generator=gen)[filler]
    return inputs, labels


def make_splits(cfg: MQARConfig, seed: int = 0) -> tuple[tuple[torch.Tensor, ...], tuple[torch.Tensor, ...]]:
    train = multiquery_ar(
        cfg.vocab_size,
        cfg.train_size,
        cfg.seq_len,
        cfg.num_kv_pairs,
        cfg.power_a,
        seed,
        cfg.random_non_queries,
    )
    test = multiquery_ar(
        cfg.vocab_size,
        cfg.test_size,
        cfg.seq_len,
        cfg.num_kv_pairs,
        cfg.power_a,
        seed + 1_000_003,
        cfg.random_non_queries,
    )
    return train, test


# --- the probe model ---------------------------------------------------------------------------


def probe_model_config(mixer: str, d_model: int, cfg: MQARConfig, n_heads: int = 1, mixer_options=None):
    from lmstack.model import ModelConfig

    mc = ModelConfig(
        vocab_size=cfg.vocab_size,
        d_model=d_model,
        n_layers=2,
        n_heads=n_heads,
        layer_mixers=["shortconv", mixer],
        max_seq_len=cfg.seq_len,
        mlp_hidden=2 * d_model,
        mixer_options=dict(mixer_options or {}),
    )
    mc.validate()
    return mc


def _tensor_elements(obj: Any, batch: int) -> int:
    if obj is None:
        return 0
    if isinstance(obj, torch.Tensor):
        return obj.numel() // batch
    if dataclasses.is_dataclass(obj):
        return sum(_tensor_elements(getattr(obj, f.name), batch) for f in dataclasses.fields(obj))
    if isinstance(obj, dict):
        return sum(_tensor_elements(v, batch) for v in obj.values())
    if isinstance(obj, list | tuple):
        return sum(_tensor_elements(v, batch) for v in obj)
    return 0


@torch.no_grad()
def state_size(model, seq_len: int, layer: int = 1) -> int:
    """Elements of one sequence's decoding state in `layer` after `seq_len` tokens: the mixer's
    recurrent state (KV cache for attention: 2 x seq_len x d_model)."""
    was_training = model.training
    model.eval()
    ids = torch.zeros(1, seq_len, dtype=torch.long, device=next(model.parameters()).device)
    cache = model(ids, use_cache=True).cache
    model.train(was_training)
    return _tensor_elements(cache.states[layer], 1)


@torch.no_grad()
def accuracy(model, inputs: torch.Tensor, labels: torch.Tensor, batch_size: int = 256) -> float:
    """Fraction of query positions where the argmax prediction is the key's value."""
    model.eval()
    correct = total = 0
    for i in range(0, len(inputs), batch_size):
        x, y = inputs[i : i + batch_size], labels[i : i + batch_size]
        logits = model(x).logits
        mask = y != IGNORE
        correct += (logits.argmax(-1)[mask] == y[mask]).sum().item()
        total += mask.sum().item()
    model.train()
    return correct / max(total, 1)


@dataclass
class TrainSettings:
    epochs: int = 8
    batch_size: int = 64
    weight_decay: float = 0.1
    warmup_frac: float = 0.1
    solved_at: float = 0.99  # stop early (and skip the remaining learning rates) at this accuracy
    eval_every: int = 0  # steps between test evaluations; 0: once per epoch
    seed: int = 0


def train_one(
    mixer: str,
    d_model: int,
    lr: float,
    cfg: MQARConfig,
    data,
    settings: TrainSettings,
    n_heads: int = 1,
    mixer_options=None,
    log=print,
) -> dict[str, Any]:
    from lmstack.model import LM

    (xtr, ytr), (xte, yte) = data
    torch.manual_seed(settings.seed)
    mc = probe_model_config(mixer, d_model, cfg, n_heads, mixer_options)
    model = LM(mc)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=settings.weight_decay, betas=(0.9, 0.98))
    steps_per_epoch = len(xtr) // settings.batch_size
    total = steps_per_epoch * settings.epochs
    warmup = max(1, int(settings.warmup_frac * total))

    def lr_at(step: int) -> float:
        if step < warmup:
            return lr * (step + 1) / warmup
        return lr * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))

    eval_every = settings.eval_every or steps_per_epoch
    gen = torch.Generator().manual_seed(settings.seed)
    start, cpu_start = time.perf_counter(), time.process_time()
    best, step, loss_val, history = 0.0, 0, float("nan"), []
    model.train()
    done = False
    for _epoch in range(settings.epochs):
        perm = torch.randperm(len(xtr), generator=gen)
        for b in range(steps_per_epoch):
            idx = perm[b * settings.batch_size : (b + 1) * settings.batch_size]
            for group in opt.param_groups:
                group["lr"] = lr_at(step)
            logits = model(xtr[idx]).logits
            loss = F.cross_entropy(logits.flatten(0, 1), ytr[idx].flatten(), ignore_index=IGNORE)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            step += 1
            loss_val = loss.item()
            if step % eval_every == 0 or step == total:
                acc = accuracy(model, xte, yte)
                history.append((step, round(acc, 4)))
                best = max(best, acc)
                if acc >= settings.solved_at:
                    done = True
                    break
        if done:
            break
    seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
    result = {
        "mixer": mixer,
        "d_model": d_model,
        "lr": lr,
        "accuracy": round(best, 4),
        "final_loss": round(loss_val, 4),
        "steps": step,
        "seconds": round(seconds, 1),
        "cpu_seconds": round(cpu_seconds, 1),
        "state_size": state_size(model, cfg.seq_len),
        "params": model.num_params(non_embedding=False),
        "history": history,
    }
    log(
        f"  {mixer:>12} d={d_model:<4} lr={lr:<8g} acc={best:.3f} loss={loss_val:.3f} "
        f"steps={step} state={result['state_size']} ({seconds:.0f}s)"
    )
    return result


# --- the sweep ---------------------------------------------------------------------------------


@dataclass
class SweepConfig:
    data: MQARConfig = field(default_factory=MQARConfig)
    train: TrainSettings = field(default_factory=TrainSettings)
    mixers: list[str] | None = None  # None: every registered mixer except shortconv
    d_models: list[int] = field(default_factory=lambda: [64, 128, 256])
    lrs: list[float] = field(default_factory=lambda: [1e-4, 4.6e-4, 2.2e-3, 1e-2])
    n_heads: int = 1
    mixer_options: dict[str, dict[str, Any]] = field(default_factory=dict)
    threads: int | None = None  # torch CPU threads (None: torch's default; 1 in worker processes)
    jobs: int = 1  # worker processes, each training one (mixer, d_model) group at a time


# CPU preset (2 cores, < 15 min with attention + one linear mixer): 16 pairs in 64 tokens, so that a
# d_model-sized recurrent state runs out of room while attention's KV cache does not; up to 3000 steps
# of batch 32 (each training sequence seen once). Measured while tuning (1 thread): attention at
# d_model 32 learns the lookup around step 1100 with lr 6e-3 (0.99 by step 2500) and around step 1300
# with 3e-3; with 1e-3 it had not started by step 3000, so the sweep is 6e-3 then 3e-3.
PRESETS: dict[str, dict[str, Any]] = {
    "cpu": {
        "data": {
            "vocab_size": 128,
            "seq_len": 64,
            "num_kv_pairs": 16,
            "train_size": 96_000,
            "test_size": 512,
        },
        "train": {"epochs": 1, "batch_size": 32, "eval_every": 250},
        "d_models": [16, 32, 64],
        "lrs": [6e-3, 3e-3],
        # One thread per model, one model per core: these models are too small to gain from more
        # threads, and on a busy machine extra threads spin-wait (measured: 13 ms of CPU per step on
        # 1 thread vs ~100 ms on 2 under load).
        "threads": 1,
        "jobs": 2,
    },
    # Zoology's setting (GPU).
    "zoology": {
        "data": {
            "vocab_size": 8192,
            "seq_len": 256,
            "num_kv_pairs": 16,
            "train_size": 100_000,
            "test_size": 3000,
        },
        "train": {"epochs": 32, "batch_size": 256},
        "d_models": [64, 128, 256, 512],
        "lrs": [1e-4, 4.6e-4, 2.2e-3, 1e-2],
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
            train=TrainSettings(**p["train"]),
            d_models=list(p["d_models"]),
            lrs=list(p["lrs"]),
            threads=p.get("threads"),
            jobs=p.get("jobs", 1),
        )
    for key, value in overrides.items():
        if value is None:
            continue
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
    if cfg.data.test_size < 1:
        raise LMStackError(f"mqar: test_size must be at least 1, got {cfg.data.test_size}")
    for name, options in (cfg.mixer_options or {}).items():
        from lmstack.model import get_mixer
        from lmstack.model.schema import from_dict

        from_dict(get_mixer(name).Options, options, f"--mixer-options {name}.")
    return cfg


def default_mixers() -> list[str]:
    from lmstack.model import MIXERS

    return [name for name in MIXERS if name != "shortconv"]


def _run_group(cfg: SweepConfig, mixer: str, d: int, data=None, log=print) -> list[dict[str, Any]]:
    """The learning rates of one (mixer, d_model), stopping once one solves the task."""
    if data is None:
        data = make_splits(cfg.data, seed=cfg.train.seed)
    runs = []
    for lr in cfg.lrs:
        r = train_one(
            mixer,
            d,
            lr,
            cfg.data,
            data,
            cfg.train,
            cfg.n_heads,
            {mixer: cfg.mixer_options[mixer]} if mixer in cfg.mixer_options else None,
            log,
        )
        runs.append(r)
        if r["accuracy"] >= cfg.train.solved_at:
            break  # solved: the remaining learning rates cannot do better
    return runs


def _worker(job: tuple) -> tuple[list[dict[str, Any]], float]:
    """A worker process: one (mixer, d_model) group. Spawned, so it imports the mixers' modules
    (a mixer registered outside lmstack.model.mixers, e.g. by a plugin, is imported by name)."""
    import importlib
    import sys

    cfg, mixer, d, modules = job
    for module in modules:
        importlib.import_module(module)
    torch.set_num_threads(cfg.threads or 1)
    cpu = time.process_time()
    runs = _run_group(cfg, mixer, d, log=lambda m: print(m, file=sys.stderr, flush=True))
    return runs, time.process_time() - cpu


def run_sweep(cfg: SweepConfig, log=print) -> dict[str, Any]:
    from lmstack.model import MIXERS

    mixers = cfg.mixers or default_mixers()
    for m in mixers:
        if m not in MIXERS:
            raise LMStackError(f"mqar: unknown mixer '{m}'; registered: {', '.join(sorted(MIXERS))}")
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    log(
        f"MQAR: vocab={cfg.data.vocab_size} seq_len={cfg.data.seq_len} kv_pairs={cfg.data.num_kv_pairs} "
        f"train={cfg.data.train_size} test={cfg.data.test_size}; mixers={mixers} d_models={cfg.d_models} "
        f"lrs={cfg.lrs}; {cfg.jobs} worker process(es)"
    )
    start, cpu_start = time.perf_counter(), time.process_time()
    groups = [(m, d) for m in mixers for d in cfg.d_models]
    worker_cpu = 0.0
    if cfg.jobs > 1:
        import multiprocessing

        # Largest first, so that the long groups do not end up last on one worker.
        order = sorted(range(len(groups)), key=lambda i: -groups[i][1])
        modules = sorted({MIXERS[m].__module__ for m in mixers} | {MIXERS["shortconv"].__module__})
        jobs = [(cfg, groups[i][0], groups[i][1], modules) for i in order]
        with multiprocessing.get_context("spawn").Pool(min(cfg.jobs, len(jobs))) as pool:
            done = pool.map(_worker, jobs, chunksize=1)
        by_group = {order[k]: runs for k, (runs, _) in enumerate(done)}
        worker_cpu = sum(c for _, c in done)
        runs = [r for i in range(len(groups)) for r in by_group[i]]
    else:
        data = make_splits(cfg.data, seed=cfg.train.seed)
        runs = [r for m, d in groups for r in _run_group(cfg, m, d, data, log)]
    best: dict[tuple[str, int], dict[str, Any]] = {}
    for r in runs:
        key = (r["mixer"], r["d_model"])
        if key not in best or r["accuracy"] > best[key]["accuracy"]:
            best[key] = r
    return {
        "config": {
            "data": dataclasses.asdict(cfg.data),
            "train": dataclasses.asdict(cfg.train),
            "mixers": mixers,
            "d_models": cfg.d_models,
            "lrs": cfg.lrs,
            "n_heads": cfg.n_heads,
            "mixer_options": cfg.mixer_options,
            "model": "2 layers: shortconv (kernel 4) then the mixer, each with a SwiGLU MLP (hidden 2*d_model)",
        },
        "best": [
            {k: best[key][k] for k in ("mixer", "d_model", "lr", "accuracy", "state_size", "params", "steps")}
            for key in sorted(best, key=lambda kd: (mixers.index(kd[0]), kd[1]))
        ],
        "runs": runs,
        "seconds": round(time.perf_counter() - start, 1),
        "cpu_seconds": round(time.process_time() - cpu_start + worker_cpu, 1),
        "jobs": cfg.jobs,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
    }


def markdown_table(result: dict[str, Any], command: str | None = None) -> str:
    cfg = result["config"]
    d = cfg["data"]
    d_models = cfg["d_models"]
    by = {(b["mixer"], b["d_model"]): b for b in result["best"]}
    lines = [
        "# MQAR (multi-query associative recall)",
        "",
        f"vocab {d['vocab_size']}, seq_len {d['seq_len']}, {d['num_kv_pairs']} key-value pairs, "
        f"power_a {d['power_a']}, {d['train_size']} train / {d['test_size']} test sequences; "
        f"{cfg['train']['epochs']} epochs max, batch {cfg['train']['batch_size']}, "
        f"best of lr {cfg['lrs']}. Model: {cfg['model']}, {cfg['n_heads']} head(s).",
        "",
        "Test accuracy on the queried values (best learning rate); state = elements of one sequence's "
        f"decoding state in the mixer layer after {d['seq_len']} tokens.",
        "",
        "| mixer | " + " | ".join(f"d_model={dm}" for dm in d_models) + " |",
        "|---|" + "---|" * len(d_models),
    ]
    for mixer in cfg["mixers"]:
        cells = []
        for dm in d_models:
            b = by.get((mixer, dm))
            cells.append(
                "—" if b is None else f"{b['accuracy']:.3f} (state {b['state_size']}, lr {b['lr']:g})"
            )
        lines.append(f"| {mixer} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "All runs (a learning rate is skipped once an earlier one solved the setting):",
        "",
        "| mixer | d_model | lr | accuracy | steps | seconds | params |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in result["runs"]:
        lines.append(
            f"| {r['mixer']} | {r['d_model']} | {r['lr']:g} | {r['accuracy']:.3f} | {r['steps']} | "
            f"{r['seconds']:.0f} | {r['params']} |"
        )
    lines += [
        "",
        f"Total wall time {result['seconds']:.0f} s ({result.get('cpu_seconds', float('nan')):.0f} s of CPU time) "
        f"in {result.get('jobs', 1)} process(es) with {result['threads']} torch thread(s) each, "
        f"torch {result['torch']}.",
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
    paths = [prefix.with_suffix(".json"), prefix.with_suffix(".md"), prefix.with_suffix(".png")]
    paths[0].write_text(json.dumps({**result, "command": command}, indent=2) + "\n")
    paths[1].write_text(markdown_table(result, command))
    plot(result, paths[2])
    return paths


def parse_list(text: str | None, cast=float, flag: str = "list") -> list | None:
    """`a,b,c` -> [cast(a), cast(b), cast(c)]; a bad item is a one-line error naming `flag`."""
    if text is None:
        return None
    try:
        return [cast(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise LMStackError(f"{flag}: expected comma-separated {cast.__name__} values, got {text!r}") from None
