"""train.fused_loss=true trains the same model as the plain LM head + cross-entropy."""

from __future__ import annotations

from conftest import base_overrides, losses, run_trainings


def test_fused_loss_gives_the_plain_losses(tiny_data, tmp_path):
    """Four optimizer steps of 2 micro-batches each (a tied-embedding model, the default): the losses
    (hence every update before them) agree to fp32 rounding."""
    runs = [
        {"overrides": base_overrides(tiny_data, tmp_path / name, **{"train.max_steps": 4, **extra})}
        for name, extra in (("plain", {"train.fused_loss": False}), ("fused", {"train.fused_loss": True}))
    ]
    res = run_trainings(runs)
    assert res.returncode == 0, res.stderr[-3000:]
    plain, fused = losses(tmp_path / "plain"), losses(tmp_path / "fused")
    assert sorted(plain) == sorted(fused) == [1, 2, 3, 4]
    for step, loss in plain.items():
        assert abs(fused[step] - loss) <= 1e-5 * abs(loss), f"step {step}: {fused[step]} vs {loss}"
