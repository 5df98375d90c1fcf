"""Auxiliary losses end to end, with the test-only `probe` mixer (tests/train/aux_probe.py): the LM
collects them, the trainer adds coefficient × aux to the loss (checked through the step's gradient
norm against an independent computation), the value is the same with activation checkpointing on and
off and with 1 and 4 micro-batches, and the metrics log it."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from aux_probe import register_probe, unregister_probe
from conftest import base_overrides, run_trainings

from lmstack.config import load_config
from lmstack.data import TrainReader
from lmstack.model import LM
from lmstack.train.build import apply_activation_checkpointing
from lmstack.train.metrics import read_metrics

COEF = 0.5
LAYERS = "[probe, attention]"


@pytest.fixture
def probe():
    register_probe()
    yield
    unregister_probe()


def _overrides(data, run_dir, **extra):
    values = {"model.layer_mixers": LAYERS, "train.max_steps": 1, "train.aux_loss_weights.probe_loss": COEF}
    return base_overrides(data, run_dir, **(values | extra))


def _expected(cfg, data, coef: float) -> tuple[float, float]:
    """(gradient norm, summed probe loss) of the first step, computed without the trainer: the same
    initial weights, the first global batch, mean cross-entropy + coef × Σ_layers probe_loss."""
    torch.manual_seed(cfg.train.seed)
    model = LM(cfg.model)
    reader = TrainReader(data, cfg.data.seq_len, cfg.train.global_batch_size, seed=cfg.data.seed)
    batch = next(reader)
    out = model(batch.input_ids)
    ce = F.cross_entropy(out.logits.flatten(0, 1), batch.labels.flatten())
    aux = sum(v for k, v in out.aux.items() if k.startswith("probe_loss/"))
    (ce + coef * aux).backward()
    norm = torch.stack([p.grad.norm() for p in model.parameters() if p.grad is not None]).norm()
    return norm.item(), aux.item()


def test_lm_collects_aux_per_layer_and_checkpointing_counts_once(probe):
    cfg = load_config(None, ["model.vocab_size=64", "model.d_model=32", "model.n_layers=3", "model.n_heads=2",
                             "model.layer_mixers=[probe, attention, probe]"]).model  # fmt: skip
    ids = torch.randint(0, 64, (2, 16))
    results = []
    for checkpointing in (False, True):
        torch.manual_seed(0)
        model = LM(cfg)
        if checkpointing:
            apply_activation_checkpointing(model)
        out = model(ids)
        assert sorted(out.aux) == [
            "probe_loss/layer0",
            "probe_loss/layer2",
            "probe_stat/layer0",
            "probe_stat/layer2",
        ]
        loss = out.logits.float().pow(2).mean() + out.aux["probe_loss/layer0"] + out.aux["probe_loss/layer2"]
        loss.backward()
        grad = model.blocks[0].mixer.proj.weight.grad
        assert grad is not None and grad.abs().sum() > 0  # the aux loss reaches the probe's weights
        results.append((loss.detach(), grad.clone()))
    torch.testing.assert_close(results[0][0], results[1][0], rtol=0, atol=0)
    torch.testing.assert_close(results[0][1], results[1][1], rtol=1e-6, atol=0)


def test_trainer_adds_weighted_aux_loss(probe, tiny_data, tmp_path):
    variants = {
        "plain": {},
        "micro4": {"train.micro_batch_size": 2},
        "ckpt": {"train.activation_checkpointing": True},
        "ckpt-micro4": {"train.activation_checkpointing": True, "train.micro_batch_size": 2},
    }
    runs = [{"overrides": _overrides(tiny_data, tmp_path / n, **extra)} for n, extra in variants.items()]
    res = run_trainings(runs)
    assert res.returncode == 0, res.stderr[-3000:]
    cfg = load_config(None, runs[0]["overrides"])
    norm, aux = _expected(cfg, tiny_data, COEF)
    # The check can fail: leaving the aux term out changes the gradient norm by far more than 1e-5.
    assert abs(_expected(cfg, tiny_data, 0.0)[0] - norm) > 1e-3 * norm
    for name in variants:
        record = read_metrics(tmp_path / name)["train"][0]
        assert abs(record["grad_norm"] - norm) <= 1e-5 * norm, (
            f"{name}: grad norm {record['grad_norm']} vs {norm}"
        )
        assert abs(record["aux/probe_loss"] - aux) <= 1e-5 * aux, (
            f"{name}: probe_loss {record['aux/probe_loss']}"
        )
        assert "aux/probe_stat/layer0" in record and "aux/probe_loss/layer0" in record


def test_unknown_aux_loss_weight_is_refused(probe, tiny_data, tmp_path):
    from conftest import cli_train

    res = cli_train(base_overrides(tiny_data, tmp_path / "r", **{"train.aux_loss_weights.balance": 0.1}))
    assert res.returncode == 2
    assert (
        "train.aux_loss_weights.balance: no mixer of this model emits that loss; emitted: none" in res.stderr
    )


def test_moh_hybrid_trains_and_logs_its_balance_loss(tiny_data, tmp_path):
    """A three-mixer hybrid (swa with a window shorter than the sequence, moh, lightning) trains; MoH's
    balance loss and statistics reach metrics.jsonl for its layer."""
    layers = [{"mixer": "swa", "window": 8}, "moh", "lightning"]
    overrides = base_overrides(
        tiny_data,
        tmp_path / "run",
        **{"model.layer_mixers": layers, "model.n_layers": 3, "model.d_model": 64, "model.n_heads": 4},
        **{"train.max_steps": 4},
    )
    res = run_trainings([{"overrides": overrides}])
    assert res.returncode == 0, res.stderr[-3000:]
    records = read_metrics(tmp_path / "run")["train"]
    assert len(records) == 4 and all(r["loss"] == r["loss"] for r in records)  # finite, not NaN
    for record in records:
        assert record["aux/moh_balance"] == record["aux/moh_balance/layer1"] > 0
        # 2 shared + top-1 of 2 routed heads of 4; the busiest routed head's load is 1 .. 2 even shares.
        assert record["aux/moh_active_heads/layer1"] == pytest.approx(0.75)
        assert 1.0 <= record["aux/moh_max_load/layer1"] <= 2.0
        assert not any(k.endswith(("layer0", "layer2")) for k in record if k.startswith("aux/"))
