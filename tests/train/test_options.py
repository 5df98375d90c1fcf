"""Training options: activation checkpointing recomputes the same numbers (also under ZeRO 3)."""

from __future__ import annotations

import torch
from conftest import base_overrides, losses, run_trainings

from lmstack.model import LM, ModelConfig
from lmstack.train.build import apply_activation_checkpointing


def _mixer_calls_in_step(checkpointing: bool) -> tuple[int, int]:
    """(mixer forward calls during forward, during backward) of one training step of a tiny LM."""
    torch.manual_seed(0)
    cfg = dict(vocab_size=64, d_model=32, n_layers=2, n_heads=2, max_seq_len=16)
    model = LM(ModelConfig.from_dict(cfg))
    if checkpointing:
        apply_activation_checkpointing(model)
    calls = [0]
    for block in model.blocks:
        block.mixer.register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    out = model(torch.randint(0, 64, (2, 16)))
    logits = out[0] if isinstance(out, tuple) else getattr(out, "logits", out)
    in_forward = calls[0]
    logits.float().square().mean().backward()
    return in_forward, calls[0] - in_forward


def test_activation_checkpointing_recomputes_in_backward():
    """The option really checkpoints: each block's forward runs again during backward (and not without it)."""
    assert _mixer_calls_in_step(False) == (2, 0)
    assert _mixer_calls_in_step(True) == (2, 2)


def test_activation_checkpointing_gives_the_same_losses(tiny_data, tmp_path):
    runs = [
        {"overrides": base_overrides(tiny_data, tmp_path / name, **extra)}
        for name, extra in (
            ("plain", {"train.max_steps": 3}),
            ("ckpt", {"train.max_steps": 3, "train.activation_checkpointing": True}),
            (
                "ckpt-zero3",
                {"train.max_steps": 3, "train.activation_checkpointing": True, "train.zero_stage": 3},
            ),
        )
    ]
    res = run_trainings(runs)
    assert res.returncode == 0, res.stderr[-3000:]
    plain = losses(tmp_path / "plain")
    for name in ("ckpt", "ckpt-zero3"):
        got = losses(tmp_path / name)
        assert sorted(got) == [1, 2, 3]
        for step, loss in plain.items():
            assert abs(got[step] - loss) <= 1e-5 * abs(loss), f"{name} step {step}: {got[step]} vs {loss}"
