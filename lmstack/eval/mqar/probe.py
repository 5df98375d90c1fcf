"""The MQAR probe: Zoology's 2-layer model (a short causal convolution, `shortconv`, then the mixer
under test, each followed by the MLP of `lmstack.model.LM`), trained and scored on one setting.

`train_one` trains one probe with AdamW and a warm-up + cosine schedule, evaluates it on the
validation split for early stopping, and reads the test split once, with the best-validation
weights; `state_size` counts the mixer layer's decoding state (the x axis of the sweep's plot).
"""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from lmstack.errors import LMStackError
from lmstack.eval.mqar.task import MQARConfig
from lmstack.model.loss import IGNORE_INDEX

RECIPES = ("lmstack", "zoology")
INITS = ("recipe", "zoology", "scaled")  # "recipe": the recipe's own (lmstack: scaled, zoology: zoology)
ZOOLOGY_INIT_STD = 0.02  # zoology/model.py `_init_weights(initializer_range=0.02)`
ZOOLOGY_WEIGHT_DECAY = 0.1  # zoology/config.py TrainConfig.weight_decay


def gate_parameter_names(model) -> set[str]:
    """Full names of the mixers' gate parameters (each mixer's `gate_parameters`: the projections that
    set how the state forgets or is written, e.g. GLA's forget gate, DeltaNet's beta, MoH's router)."""
    names = set()
    for module_name, module in model.named_modules():
        for prefix in getattr(module, "gate_parameters", ()):
            for name, _ in module.named_parameters():
                if name == prefix or name.startswith(prefix + "."):
                    names.add(f"{module_name}.{name}" if module_name else name)
    return names


def param_groups(model, weight_decay: float, recipe: str) -> list[dict[str, Any]]:
    """AdamW groups. "lmstack": `weight_decay` on every parameter. "zoology": `weight_decay` on the
    weight matrices (the embedding included, as Zoology's trainer does), none on norm gains, biases
    (every parameter of fewer than 2 dimensions) and the mixers' gate parameters, as fla's layers
    intend (a decayed forget gate drifts towards forgetting, not towards a smaller model)."""
    params = dict(model.named_parameters())  # tied weights once
    if recipe == "lmstack":
        return [{"params": list(params.values()), "weight_decay": weight_decay, "name": "decay"}]
    gates = gate_parameter_names(model)
    no_decay = {n for n, p in params.items() if p.dim() < 2 or n in gates}
    return [
        {
            "params": [p for n, p in params.items() if n not in no_decay],
            "weight_decay": weight_decay,
            "name": "decay",
        },
        {"params": [p for n, p in params.items() if n in no_decay], "weight_decay": 0.0, "name": "no_decay"},
    ]


def probe_model_config(
    mixer: str, d_model: int, cfg: MQARConfig, n_heads: int = 1, mixer_options=None, init: str = "scaled"
):
    """The probe's ModelConfig; `init` (INITS) "zoology" initialises as Zoology does (N(0, 0.02), the
    residual-out projections scaled by 1/sqrt(2 n_layers): the LM's GPT-2 default), "scaled" with
    N(0, 1/d_model)."""
    if init not in INITS:
        raise LMStackError(f"mqar: init must be one of {', '.join(INITS)}, got '{init}'")
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
        init_std=ZOOLOGY_INIT_STD if init == "zoology" else d_model**-0.5,
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
    # "lmstack": N(0, 1/d_model) init, decay on every parameter, betas (0.9, 0.98), warm-up + cosine
    # per step, gradients clipped at 1. "zoology": Zoology's probe (zoology/train.py, model.py): init
    # N(0, 0.02), AdamW with torch's betas (0.9, 0.999) and no decay on norms, biases and gate
    # parameters (`param_groups`), cosine annealing per epoch without warm-up (CosineAnnealingLR with
    # T_max = epochs, stepped after each epoch), no clipping.
    recipe: str = "lmstack"
    # The weights' init, when not the recipe's: "scaled", N(0, 1/d_model), or "zoology", N(0, 0.02).
    # At d_model 16-64 and a CPU budget of ~1000 steps, 0.02 leaves attention on its initial plateau
    # (uniform attention, loss at chance), see benchmarks/results/mqar_cpu.md.
    init: str = "recipe"
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
    zoology = settings.recipe == "zoology"
    init = settings.init if settings.init != "recipe" else ("zoology" if zoology else "scaled")
    mc = probe_model_config(mixer, d_model, cfg, n_heads, mixer_options, init)
    model = LM(mc)
    betas = (0.9, 0.999) if zoology else (0.9, 0.98)
    opt = torch.optim.AdamW(param_groups(model, settings.weight_decay, settings.recipe), lr=lr, betas=betas)
    steps_per_epoch = len(xtr) // settings.batch_size
    total = steps_per_epoch * settings.epochs
    warmup = max(1, int(settings.warmup_frac * total))

    def lr_at(step: int) -> float:
        if zoology:
            return lr * 0.5 * (1 + math.cos(math.pi * (step // steps_per_epoch) / settings.epochs))
        if step < warmup:
            return lr * (step + 1) / warmup
        return lr * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))

    eval_every = settings.eval_every or steps_per_epoch
    gen = torch.Generator().manual_seed(settings.seed)
    start, cpu_start = time.perf_counter(), time.process_time()
    best_val, best_state, stale, step, loss_val, history, window_loss = -1.0, None, 0, 0, float("nan"), [], []
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
            if not zoology:
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            step += 1
            loss_val = loss.item()
            window_loss.append(loss_val)
            if step % eval_every == 0 or step == total:
                val = accuracy(model, xva, yva)
                # The learning curve: (step, validation accuracy, mean training loss since the last point).
                history.append((step, round(val, 4), round(sum(window_loss) / len(window_loss), 4)))
                window_loss = []
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
