"""The model as training runs it: initialised from the seed (the same weights on every rank), with
activation checkpointing and torch.compile applied on request, and the auxiliary-loss coefficients
of its mixers. Both options leave parameter names (and so checkpoints) unchanged."""

from __future__ import annotations

import torch

from lmstack.config.schema import RunConfig, TrainConfig
from lmstack.errors import LMStackError
from lmstack.model import LM
from lmstack.train.state import seed_all


def apply_activation_checkpointing(model: LM) -> None:
    """Every block recomputes its forward during backward (torch's non-reentrant checkpointing)
    instead of keeping its activations; decoding and no-grad forwards are unchanged."""
    for block in model.blocks:
        block.recompute = True


def apply_compile(model: LM) -> None:
    """torch.compile each block, in place (`nn.Module.compile`), so parameter names stay as they are."""
    for block in model.blocks:
        block.compile()


def build_model(config: RunConfig, device: torch.device) -> LM:
    """The run's LM on `device`: weights from `train.seed`, `train.activation_checkpointing` and
    `train.compile` (null: on with CUDA) applied."""
    t = config.train
    seed_all(t.seed)  # same initial weights on every rank
    model = LM(config.model)
    if t.activation_checkpointing:
        apply_activation_checkpointing(model)
    if t.compile if t.compile is not None else device.type == "cuda":
        apply_compile(model)
    return model.to(device)


def aux_loss_weights(model: LM, train: TrainConfig) -> dict[str, float]:
    """Coefficient of each auxiliary loss the model's mixers declare: their defaults, overridden by
    `train.aux_loss_weights` (a name no mixer of this model declares is an error)."""
    weights: dict[str, float] = {}
    for block in model.blocks:
        weights.update(type(block.mixer).aux_losses)
    for name, value in train.aux_loss_weights.items():
        if name not in weights:
            known = ", ".join(sorted(weights)) or "none"
            raise LMStackError(
                f"train.aux_loss_weights.{name}: no mixer of this model emits that loss; emitted: {known}"
            )
        weights[name] = value
    return weights
