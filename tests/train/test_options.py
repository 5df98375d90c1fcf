"""Training options: activation checkpointing recomputes the same numbers (also under ZeRO 3)."""

from __future__ import annotations

from conftest import base_overrides, losses, run_trainings


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
