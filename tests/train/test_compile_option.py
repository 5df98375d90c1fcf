"""train.compile=true (every block torch.compiled, inductor on the CPU) trains as train.compile=false:
`lmstack train` on a tiny lightning model, packed documents, AdamW, two micro-batches a step."""

from __future__ import annotations

from conftest import base_overrides, losses, records, run_trainings


def test_compiled_run_gives_the_eager_losses(tiny_data, tmp_path):
    """Three optimizer steps and the final validation: the losses agree to 1e-5 relative (seen:
    4e-8 for the validation loss; both runs do the same fp32 arithmetic, fused differently). Adam's normalised first
    steps let rounding grow in near-zero gradient entries, which the loss barely sees; the
    gradients themselves are compared under SGD in tests/model/test_compile_training.py."""
    runs = [
        {"overrides": base_overrides(tiny_data, tmp_path / name, **extra)}
        for name, extra in (
            ("eager", {"train.compile": False, "model.mixer": "lightning", "train.max_steps": 3}),
            ("compiled", {"train.compile": True, "model.mixer": "lightning", "train.max_steps": 3}),
        )
    ]
    res = run_trainings(runs, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    eager, compiled = losses(tmp_path / "eager"), losses(tmp_path / "compiled")
    assert sorted(eager) == sorted(compiled) == [1, 2, 3]
    for step, loss in eager.items():
        assert abs(compiled[step] - loss) <= 1e-5 * abs(loss), f"step {step}: {compiled[step]} vs {loss}"
    (val_e,), (val_c,) = records(tmp_path / "eager", "val"), records(tmp_path / "compiled", "val")
    names = [k for k in val_e if k.endswith("loss")]
    assert names and all(abs(val_c[k] - val_e[k]) <= 1e-5 * abs(val_e[k]) for k in names), (val_c, val_e)
