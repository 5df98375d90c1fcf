"""AdamW parameter groups (no decay on norms, biases, embeddings) and the warm-up + cosine schedule."""

from __future__ import annotations

import math

import pytest
from torch import nn

from lmstack.config.schema import TrainConfig
from lmstack.model import LM, ModelConfig
from lmstack.train.optim import lr_at, param_groups


def test_weight_decay_only_on_matrices():
    model = LM(ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=2, tie_embeddings=False))
    model.blocks[0].extra = nn.Linear(32, 32, bias=True)  # a bias, to see it land in no_decay
    decay, no_decay = param_groups(model, 0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for p in decay["params"]}
    skipped = {names[id(p)] for p in no_decay["params"]}
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert "embed.weight" in skipped and "lm_head.weight" in decayed
    assert "blocks.0.extra.bias" in skipped and "blocks.0.extra.weight" in decayed
    assert all("norm" not in n for n in decayed)
    assert {n for n in names.values() if "norm" in n} <= skipped
    assert len(decayed) + len(skipped) == len(list(model.parameters()))


def test_tied_embedding_is_not_decayed_and_counted_once():
    model = LM(ModelConfig(vocab_size=64, d_model=32, n_layers=1, n_heads=2, tie_embeddings=True))
    decay, no_decay = param_groups(model, 0.1)
    assert all(p is not model.embed.weight for p in decay["params"])
    assert sum(p is model.embed.weight for p in no_decay["params"]) == 1


def test_warmup_then_cosine_to_min_lr():
    cfg = TrainConfig(lr=1e-3, min_lr=1e-4, warmup_steps=10, max_steps=110)
    assert lr_at(0, cfg, 110) == pytest.approx(1e-4)
    assert lr_at(9, cfg, 110) == pytest.approx(1e-3)
    assert lr_at(10, cfg, 110) == pytest.approx(1e-3)
    assert lr_at(60, cfg, 110) == pytest.approx(1e-4 + 0.5 * 9e-4 * (1 + math.cos(math.pi * 0.5)))
    assert lr_at(110, cfg, 110) == pytest.approx(1e-4)
    assert lr_at(500, cfg, 110) == pytest.approx(1e-4)
    lrs = [lr_at(s, cfg, 110) for s in range(10, 111)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))
