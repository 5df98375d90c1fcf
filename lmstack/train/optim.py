"""AdamW parameter groups and the learning-rate schedule.

Weight decay (decoupled, AdamW) is applied only to the weight matrices of linear layers. It is not
applied to:
- norm gains (RMSNorm weights): decaying them pulls every feature's scale towards zero, which the
  next layer then has to undo; they are scale parameters, not capacity;
- biases: they shift activations and carry no overfitting capacity worth regularising;
- embeddings (and, through tying, the LM head): rows of rare tokens get few gradient updates, so
  decay would shrink them towards zero between updates (the choice of GPT-NeoX/Pythia, OLMo and the
  GLA/DeltaNet training code).
In practice: every parameter with fewer than 2 dimensions, and every `nn.Embedding` weight.

Schedule: linear warm-up from 0 to `lr` over `warmup_steps`, then cosine decay to `min_lr` over
`decay_steps` (default: the rest of the run), then constant `min_lr`.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from lmstack.config.schema import TrainConfig


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two AdamW groups: decayed weight matrices, and everything else (norms, biases, embeddings)."""
    embedding_params = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    decay, no_decay, seen = [], [], set()
    for _, p in model.named_parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        (no_decay if p.dim() < 2 or id(p) in embedding_params else decay).append(p)
    return [
        {"params": decay, "weight_decay": weight_decay, "name": "decay"},
        {"params": no_decay, "weight_decay": 0.0, "name": "no_decay"},
    ]


class GuardedAdamW(torch.optim.AdamW):
    """AdamW that leaves everything as it is (weights, moments, step counts) in a step where
    `overflow` is set, which DeepSpeed then reports as not applied (`engine.was_step_applied()`).

    Without ZeRO, DeepSpeed steps the torch optimizer without looking at the gradients; its ZeRO
    optimizers check them themselves (and are handed the plain AdamW, the type DeepSpeed lists as
    tested with ZeRO)."""

    overflow = False  # set before each step by the trainer (lmstack.train.engine)

    def step(self, closure=None):
        if self.overflow:
            return None
        return super().step(closure)


def build_optimizer(model: nn.Module, cfg: TrainConfig, guarded: bool = False) -> torch.optim.Optimizer:
    """AdamW over `param_groups`; `guarded`: a `GuardedAdamW` (for ZeRO stage 0)."""
    # A plain torch AdamW: DeepSpeed's fused CPU Adam would JIT-compile a C++ extension (minutes).
    fused = torch.cuda.is_available()
    adamw = GuardedAdamW if guarded else torch.optim.AdamW
    return adamw(
        param_groups(model, cfg.weight_decay),
        lr=cfg.lr,
        betas=(cfg.beta1, cfg.beta2),
        eps=cfg.eps,
        fused=fused or None,
    )


def lr_at(step: int, cfg: TrainConfig, total_steps: int) -> float:
    """Learning rate for optimizer step `step` (0-based)."""
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    decay_steps = cfg.decay_steps if cfg.decay_steps is not None else max(total_steps - cfg.warmup_steps, 1)
    progress = min((step - cfg.warmup_steps) / decay_steps, 1.0)
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1.0 + math.cos(math.pi * progress))
