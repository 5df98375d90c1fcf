"""MQAR: Zoology's multi-query associative recall (Arora et al., 2023), a synthetic probe of how
much a token mixer can recall from its context.

A sequence is `num_kv_pairs` key-value pairs `k1 v1 k2 v2 ...` (keys from the lower half of the
vocabulary, values from the upper half, all distinct within a sequence), then a region where every
key is asked once: the query's position is drawn by a power law (`power_a`; small gaps likelier)
and the model must predict the key's value as the next token. Loss and accuracy count only those
positions (labels are IGNORE_INDEX elsewhere); the unused positions hold random tokens.

The model is Zoology's 2-layer probe: a short causal convolution (`shortconv`), then the mixer
under test, each followed by the MLP of `lmstack.model.LM`. The sweep trains one model per mixer x
d_model x learning rate, as Zoology does, with three splits: training, validation (early stopping,
the choice of learning rate) and test (read once per run, with the best-validation weights, for the
reported accuracy); further seeds rerun the chosen rate.
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
from lmstack.eval import sigterm_exits
from lmstack.model.loss import IGNORE_INDEX


@dataclass
class MQARConfig:
    vocab_size: int = 8192
    seq_len: int = 64
    num_kv_pairs: int = 4
    power_a: float = 0.01
    train_size: int = 100_000
    val_size: int = 1_000  # early stopping and the choice of learning rate; never the test set
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
    `inputs[i, t]` where that position is a query, else IGNORE_INDEX (everywhere in the kv region too).
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
    labels = torch.full((n, seq_len + 1), IGNORE_INDEX, dtype=torch.long)
    labels.scatter_(1, 2 * gaps + context + 1, values)
    inputs, labels = examples[:, :-1].clone(), labels[:, 1:].clone()
    if random_non_queries:
        filler = inputs == 0
        inputs[filler] = torch.randint(vocab_size, inputs.shape, generator=gen)[filler]
    return inputs, labels


def make_splits(cfg: MQARConfig, seed: int = 0) -> tuple[tuple[torch.Tensor, torch.Tensor], ...]:
    """(train, val, test) as (inputs, labels) pairs, each from its own generator seed."""
    return tuple(
        multiquery_ar(
            cfg.vocab_size,
            size,
            cfg.seq_len,
            cfg.num_kv_pairs,
            cfg.power_a,
            seed + offset,
            cfg.random_non_queries,
        )
        for size, offset in ((cfg.train_size, 0), (cfg.val_size, 500_009), (cfg.test_size, 1_000_003))
    )


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
        # Weights ~ N(0, 1/d_model), our choice for these narrow probes: the LM's GPT-2 default (0.02,
        # also Zoology's) is tuned for widths in the hundreds; at d_model 16 it starts attention so
        # flat that it learns slowly: measured (vocab 64, T 32, 8 pairs, lr 3e-3, batch
        # 32) 0.22 test accuracy after 6000 steps with 0.02 against 0.997 after 1000 with 16^-0.5.
        init_std=d_model**-0.5,
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
def state_size(model, seq_len: int, layer: int | None = 1) -> int:
    """Elements of one sequence's decoding state in `layer` (None: all layers) after `seq_len`
    tokens: the mixer's recurrent state (KV cache for attention: 2 x seq_len x d_model)."""
    was_training = model.training
    model.eval()
    ids = torch.zeros(1, seq_len, dtype=torch.long, device=next(model.parameters()).device)
    cache = model(ids, use_cache=True).cache
    model.train(was_training)
    return _tensor_elements(cache.states if layer is None else cache.states[layer], 1)


@torch.no_grad()
def accuracy(model, inputs: torch.Tensor, labels: torch.Tensor, batch_size: int = 256) -> float:
    """Fraction of query positions where the argmax prediction is the key's value."""
    model.eval()
    correct = total = 0
    for i in range(0, len(inputs), batch_size):
        x, y = inputs[i : i + batch_size], labels[i : i + batch_size]
        logits = model(x).logits
        mask = y != IGNORE_INDEX
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
    # Early stopping, on the validation split: stop at this accuracy (and skip the remaining learning
    # rates), or after `patience` evaluations without a better one (0: never).
    solved_at: float = 0.99
    patience: int = 0
    eval_every: int = 0  # steps between validation evaluations; 0: once per epoch
    seed: int = 0  # model initialisation and example order (the data splits use seed 0)


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
    """Train one probe; the reported test accuracy is that of the weights with the best validation
    accuracy (early stopping), the test split is read once, at the end."""
    from lmstack.model import LM

    (xtr, ytr), (xva, yva), (xte, yte) = data
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
    best_val, best_state, stale, step, loss_val, history = -1.0, None, 0, 0, float("nan"), []
    model.train()
    done = False
    for _epoch in range(settings.epochs):
        perm = torch.randperm(len(xtr), generator=gen)
        for b in range(steps_per_epoch):
            idx = perm[b * settings.batch_size : (b + 1) * settings.batch_size]
            for group in opt.param_groups:
                group["lr"] = lr_at(step)
            logits = model(xtr[idx]).logits
            loss = F.cross_entropy(logits.flatten(0, 1), ytr[idx].flatten(), ignore_index=IGNORE_INDEX)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            step += 1
            loss_val = loss.item()
            if step % eval_every == 0 or step == total:
                val = accuracy(model, xva, yva)
                history.append((step, round(val, 4)))
                if val > best_val:
                    best_val, stale = val, 0
                    best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
                else:
                    stale += 1
                done = best_val >= settings.solved_at or (0 < settings.patience <= stale)
                if done:
                    break
        if done:
            break
    if best_state is not None:
        model.load_state_dict(best_state)
    test = accuracy(model, xte, yte)
    seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
    result = {
        "mixer": mixer,
        "d_model": d_model,
        "lr": lr,
        "seed": settings.seed,
        "accuracy": round(test, 4),
        "val_accuracy": round(best_val, 4),
        "final_loss": round(loss_val, 4),
        "steps": step,
        "seconds": round(seconds, 1),
        "cpu_seconds": round(cpu_seconds, 1),
        "state_size": state_size(model, cfg.seq_len),
        "params": model.num_params(non_embedding=False),
        "history": history,
    }
    log(
        f"  {mixer:>12} d={d_model:<4} lr={lr:<8g} seed={settings.seed} val={best_val:.3f} test={test:.3f} "
        f"loss={loss_val:.3f} steps={step} state={result['state_size']} ({seconds:.0f}s)"
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
    # Heads of the mixers that need more than n_heads: MoH routes among heads (4: 2 shared, 2 routed,
    # the top 1 of them per token); its state size is attention's whatever the heads.
    mixer_heads: dict[str, int] = field(default_factory=lambda: {"moh": 4})
    seeds: int = 1  # seeds of the chosen learning rate (the sweep itself runs the first seed)
    mixer_options: dict[str, dict[str, Any]] = field(default_factory=dict)
    threads: int | None = None  # torch CPU threads (None: torch's default; 1 in worker processes)
    jobs: int = 1  # worker processes, each training one (mixer, d_model) group at a time


# CPU preset (2 cores, <= 15 min for every mixer): 8 pairs in 32 tokens (vocab 64), d_model 16 / 32
# / 64 (16 is the smallest head the lightning and deltanet ops take). At d_model 16 the pairs fill a
# recurrent state of d_model-sized keys while attention's KV cache holds them all. Measured while
# choosing it (d_model 16, lr 3e-3, batch 32): attention 0.997 after 1000 steps, lightning 0.93,
# DeltaNet 0.21 and GLA (8-dim keys) 0.14 after 3000; DeltaNet did worse with 1e-2 (0.12). So two
# rates, 3e-3 first and 1e-3 for the groups it does not solve, at most 2500 steps each (5 epochs),
# early stopping after 3 evaluations (750 steps) without gain; one seed (the zoology preset runs
# three). The budget is small: the table reports what it measured, not each mixer's capacity limit.
PRESETS: dict[str, dict[str, Any]] = {
    "cpu": {
        "data": {
            "vocab_size": 64,
            "seq_len": 32,
            "num_kv_pairs": 8,
            "train_size": 16_000,
            "val_size": 500,
            "test_size": 1000,
        },
        "train": {"epochs": 5, "batch_size": 32, "eval_every": 250, "patience": 3},
        "d_models": [16, 32, 64],
        "lrs": [3e-3, 1e-3],
        # A window of half the sequence (the default, 512, would make swa attention here): its state,
        # 2 x 15 x d_model, about half of attention's, and a pair may lie up to 30 tokens before its query.
        "mixer_options": {"swa": {"window": 16}},
        # One thread per model, one model per core: these models are too small to gain from more
        # threads, and on a busy machine extra threads spin-wait (measured: 13 ms of CPU per step on
        # 1 thread vs ~100 ms on 2 under load).
        "threads": 1,
        "jobs": 2,
    },
    # `lmstack compare`'s probe: the cpu preset's task at d_model 32 with its first rate, shorter.
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
    # Zoology's hardest setting (GPU): T = 512 with 64 key-value pairs, lr 1e-4 ... 1e-2 log-spaced.
    "zoology": {
        "data": {
            "vocab_size": 8192,
            "seq_len": 512,
            "num_kv_pairs": 64,
            "train_size": 100_000,
            "val_size": 1000,
            "test_size": 3000,
        },
        "train": {"epochs": 32, "batch_size": 64, "patience": 4},
        "d_models": [64, 128, 256],  # one head: 256 is the ops' largest head dimension
        "lrs": [1e-4, 4.6e-4, 2.2e-3, 1e-2],
        "seeds": 3,
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
            seeds=p.get("seeds", 1),
            mixer_options=dict(p.get("mixer_options", {})),
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
    if cfg.seeds < 1:
        raise LMStackError(f"mqar: seeds must be at least 1, got {cfg.seeds}")
    for name, options in (cfg.mixer_options or {}).items():
        from lmstack.model import get_mixer
        from lmstack.model.schema import from_dict

        from_dict(get_mixer(name).Options, options, f"--mixer-options {name}.")
    return cfg


def default_mixers() -> list[str]:
    from lmstack.model import MIXERS

    return [name for name in MIXERS if name != "shortconv"]


def _run_group(cfg: SweepConfig, mixer: str, d: int, data=None, log=print) -> list[dict[str, Any]]:
    """One (mixer, d_model): the learning rates with the first seed (stopping once one solves the
    validation split), then the other seeds at the learning rate with the best validation accuracy."""
    if data is None:
        data = make_splits(cfg.data)
    options = {mixer: cfg.mixer_options[mixer]} if mixer in cfg.mixer_options else None

    def run(lr: float, seed: int) -> dict[str, Any]:
        settings = dataclasses.replace(cfg.train, seed=seed)
        heads = cfg.mixer_heads.get(mixer, cfg.n_heads)
        return train_one(mixer, d, lr, cfg.data, data, settings, heads, options, log)

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
    fields = {k: getattr(cfg, k) for k in ("lrs", "n_heads", "mixer_heads", "seeds", "mixer_options")}
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

    mixers = cfg.mixers or default_mixers()
    for m in mixers:
        if m not in MIXERS:
            raise LMStackError(f"mqar: unknown mixer '{m}'; registered: {', '.join(sorted(MIXERS))}")
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
        modules = sorted({MIXERS[m].__module__ for m in mixers} | {MIXERS["shortconv"].__module__})
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


def load_finished(cfg: SweepConfig, out_prefix: str | Path):
    """(runs of the groups finished before with the same settings, a callback that records each new
    group) for the sweep writing `out_prefix`: read from PREFIX.json and from PREFIX.progress.jsonl,
    the record of a sweep that was interrupted (removed once PREFIX.json is written)."""
    prefix, key = Path(out_prefix), sweep_key(cfg)
    result_path, progress_path = prefix.with_suffix(".json"), prefix.with_suffix(".progress.jsonl")
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


def write_outputs(result: dict[str, Any], out_prefix: str | Path, command: str | None = None) -> list[Path]:
    """Write `<prefix>.json`, `<prefix>.md` and `<prefix>.png`; returns the paths."""
    prefix = Path(out_prefix)
    prefix.parent.mkdir(parents=True, exist_ok=True)
    paths = [prefix.with_suffix(".json"), prefix.with_suffix(".md"), prefix.with_suffix(".png")]
    paths[0].write_text(json.dumps({**result, "command": command}, indent=2) + "\n")
    paths[1].write_text(markdown_table(result, command))
    plot(result, paths[2])
    prefix.with_suffix(".progress.jsonl").unlink(missing_ok=True)  # every group is in the JSON now
    return paths


def parse_list(text: str | None, cast=float, flag: str = "list") -> list | None:
    """`a,b,c` -> [cast(a), cast(b), cast(c)]; a bad item is a one-line error naming `flag`."""
    if text is None:
        return None
    try:
        return [cast(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise LMStackError(f"{flag}: expected comma-separated {cast.__name__} values, got {text!r}") from None
