"""MQAR: the generator's invariants, the short-convolution mixer, and a tiny sweep end to end."""

from __future__ import annotations

import json

import pytest
import torch

from lmstack.errors import LMStackError
from lmstack.eval import mqar
from lmstack.model import LM, MIXERS, BatchContext, ModelConfig
from lmstack.model.loss import IGNORE_INDEX


@pytest.mark.parametrize("V,T,K,power_a", [(64, 32, 4, 0.01), (256, 128, 16, 0.01), (100, 64, 16, 0.5)])
def test_generator_invariants(V, T, K, power_a):
    x, y = mqar.multiquery_ar(V, 200, T, K, power_a=power_a, seed=3)
    assert x.shape == y.shape == (200, T) and x.dtype == y.dtype == torch.long
    assert x.min() >= 0 and x.max() < V
    half = V // 2
    for i in range(len(x)):
        keys, values = x[i, 0 : 2 * K : 2], x[i, 1 : 2 * K : 2]
        # keys and values come from disjoint halves of the vocabulary, distinct within a sequence
        assert (keys >= 1).all() and (keys < half).all() and (values >= half).all() and (values < V).all()
        assert len(set(keys.tolist())) == K and len(set(values.tolist())) == K
        kv = dict(zip(keys.tolist(), values.tolist()))
        # labels only at query positions: one per key, all after the key-value region
        q = (y[i] != IGNORE_INDEX).nonzero().flatten()
        assert len(q) == K and (q >= 2 * K).all()
        assert (y[i, : 2 * K] == IGNORE_INDEX).all()
        # every query is a key, each key is asked once, and its answer is that key's value
        assert sorted(x[i, q].tolist()) == sorted(kv)
        for pos in q.tolist():
            assert y[i, pos].item() == kv[x[i, pos].item()]


def test_generator_is_deterministic_and_power_law_prefers_short_gaps():
    a = mqar.multiquery_ar(256, 64, 128, 8, seed=1)
    b = mqar.multiquery_ar(256, 64, 128, 8, seed=1)
    c = mqar.multiquery_ar(256, 64, 128, 8, seed=2)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) and not torch.equal(a[0], c[0])
    _, y = mqar.multiquery_ar(256, 2000, 128, 8, power_a=0.01, seed=0)
    q = (y != IGNORE_INDEX).nonzero()[:, 1] - 16  # offsets in the query region
    early, late = (q < 56).sum().item(), (q >= 56).sum().item()
    assert early > 1.3 * late


def test_generator_rejects_bad_settings():
    with pytest.raises(LMStackError, match="num_kv_pairs"):
        mqar.multiquery_ar(256, 4, 64, 17)
    with pytest.raises(LMStackError, match="even"):
        mqar.multiquery_ar(256, 4, 63, 4)
    with pytest.raises(LMStackError, match="vocab_size"):
        mqar.multiquery_ar(8, 4, 64, 8)


def test_shortconv_registered_and_causal():
    assert "shortconv" in MIXERS
    cfg = ModelConfig(vocab_size=50, d_model=16, n_layers=1, n_heads=2, layer_mixers=["shortconv"])
    conv = LM(cfg).blocks[0].mixer
    x = torch.randn(2, 10, 16, requires_grad=True)
    y = conv(x, BatchContext.for_rows(2, 10)).y
    y[:, 5].sum().backward()
    touched = x.grad.abs().sum(dim=(0, 2)) > 0
    assert touched.tolist() == [False, False, True, True, True, True, False, False, False, False]


def test_shortconv_state_and_documents():
    cfg = ModelConfig(vocab_size=50, d_model=16, n_layers=1, n_heads=2, layer_mixers=["shortconv"])
    conv = LM(cfg).blocks[0].mixer
    x = torch.randn(2, 12, 16)
    full = conv(x, BatchContext.for_rows(2, 12)).y
    # chunked with the state (the last k-1 inputs) == one pass, also token by token
    a, st, _ = conv(x[:, :5], BatchContext.for_rows(2, 5), use_cache=True)
    b, st, _ = conv(x[:, 5:], BatchContext.for_rows(2, 7, offset=5), state=st, use_cache=True)
    torch.testing.assert_close(torch.cat([a, b], 1), full)
    st, outs = None, []
    for t in range(12):
        o, st, _ = conv(x[:, t : t + 1], BatchContext.for_rows(2, 1, offset=t), state=st, use_cache=True)
        outs.append(o)
    torch.testing.assert_close(torch.cat(outs, 1), full)
    assert st.window.shape == (2, 3, 16)
    # packed documents: the second document is computed as if alone, and so is its state
    docs = torch.tensor([[0] * 7 + [1] * 5] * 2)
    packed, st_p, _ = conv(x, BatchContext.from_doc_ids(docs), use_cache=True)
    alone, st_a, _ = conv(x[:, 7:], BatchContext.for_rows(2, 5), use_cache=True)
    torch.testing.assert_close(packed[:, 7:], alone)
    torch.testing.assert_close(packed[:, :7], full[:, :7])
    torch.testing.assert_close(st_p.window, st_a.window)
    short = torch.tensor([[0] * 11 + [1]] * 2)  # a 1-token document: the state holds only it
    _, st_s, _ = conv(x, BatchContext.from_doc_ids(short), use_cache=True)
    assert (st_s.window[:, :2] == 0).all() and torch.equal(st_s.window[:, 2], x[:, 11])


def test_state_size_counts_the_mixer_layer():
    cfg = mqar.MQARConfig(vocab_size=64, seq_len=32, num_kv_pairs=4)
    model = LM(mqar.probe_model_config("attention", 32, cfg))
    assert mqar.state_size(model, 32) == 2 * 32 * 32  # keys and values of 32 tokens
    assert mqar.state_size(model, 32, layer=0) == 3 * 32  # shortconv: last k-1 inputs


# An easy setting (4 pairs in 32 tokens, 16 keys): attention learns the lookup in ~400 steps of batch
# 32; a stack of short convolutions sees only the last 4 tokens, so it can answer only the queries
# that follow their key-value pair closely (chance alone: 1/16).
EASY = mqar.MQARConfig(
    vocab_size=32, seq_len=32, num_kv_pairs=4, train_size=32 * 1000, val_size=256, test_size=512
)


@pytest.fixture(scope="module")
def easy_data():
    return mqar.make_splits(EASY)


def test_attention_solves_easy_mqar(easy_data):
    settings = mqar.TrainSettings(epochs=1, batch_size=32, eval_every=50, solved_at=0.95)
    r = mqar.train_one("attention", 64, 3e-3, EASY, easy_data, settings, log=lambda m: None)
    assert r["accuracy"] >= 0.9, r["history"]


def test_shortconv_only_stays_near_chance(easy_data):
    settings = mqar.TrainSettings(epochs=1, batch_size=32, eval_every=100)
    small = (easy_data[0][0][: 32 * 400], easy_data[0][1][: 32 * 400]), *easy_data[1:]
    r = mqar.train_one("shortconv", 64, 3e-3, EASY, small, settings, log=lambda m: None)
    assert r["steps"] == 400 and r["accuracy"] < 0.3, r["history"]


def test_splits_are_disjoint_draws():
    train, val, test = mqar.make_splits(
        mqar.MQARConfig(vocab_size=64, seq_len=32, num_kv_pairs=4, train_size=64, val_size=32, test_size=32)
    )
    assert len(train[0]) == 64 and len(val[0]) == len(test[0]) == 32
    assert not torch.equal(val[0], test[0][: len(val[0])]) and not torch.equal(train[0][:32], val[0])


def test_lr_is_chosen_on_validation_and_seeds_are_averaged():
    run = lambda lr, seed, val, test: {"mixer": "m", "d_model": 8, "lr": lr, "seed": seed, "val_accuracy": val,
                                       "accuracy": test, "state_size": 1, "params": 1, "steps": 1}  # fmt: skip
    runs = [run(1e-3, 0, 0.5, 0.9), run(3e-3, 0, 0.7, 0.6), run(3e-3, 1, 0.8, 0.8), run(1e-3, 1, 0.9, 0.1)]
    (best,) = mqar.best_per_group(runs)
    assert best["lr"] == 3e-3 and best["val_accuracy"] == 0.7  # not the higher test accuracy of 1e-3
    assert best["accuracy"] == 0.7 and (best["accuracy_min"], best["accuracy_max"], best["seeds"]) == (
        0.6,
        0.8,
        2,
    )


def test_tiny_sweep_writes_table_json_and_plot(tmp_path):
    cfg = mqar.sweep_config(
        None,
        vocab_size=64,
        seq_len=32,
        num_kv_pairs=4,
        train_size=128,
        val_size=16,
        test_size=32,
        epochs=1,
        batch_size=32,
        d_models=[16, 32],
        lrs=[3e-3, 1e-2],
        seeds=2,
        mixers=["attention"],
    )
    result = mqar.run_sweep(cfg, log=lambda m: None)
    assert [(b["mixer"], b["d_model"]) for b in result["best"]] == [("attention", 16), ("attention", 32)]
    # per group: both learning rates with seed 0, then seed 1 at the chosen one
    assert [(r["d_model"], r["lr"], r["seed"]) for r in result["runs"]] == [
        (16, 3e-3, 0), (16, 1e-2, 0), (16, result["best"][0]["lr"], 1),
        (32, 3e-3, 0), (32, 1e-2, 0), (32, result["best"][1]["lr"], 1),
    ]  # fmt: skip
    for b in result["best"]:
        assert b["seeds"] == 2 and b["state_size"] == 2 * 32 * b["d_model"]
    paths = mqar.write_outputs(result, tmp_path / "mqar", "lmstack eval mqar --test")
    assert [p.name for p in paths] == ["mqar.json", "mqar.md", "mqar.png"]
    assert json.loads(paths[0].read_text())["command"] == "lmstack eval mqar --test"
    md = paths[1].read_text()
    assert "| attention |" in md and "d_model=16" in md and "lmstack eval mqar --test" in md
    assert paths[2].stat().st_size > 1000


def test_parallel_sweep_matches_sequential():
    kw = dict(vocab_size=64, seq_len=32, num_kv_pairs=4, train_size=64, val_size=16, test_size=16)
    kw |= dict(epochs=1, batch_size=32)
    kw |= dict(d_models=[16, 32], lrs=[1e-3], mixers=["attention"], threads=1)
    seq = mqar.run_sweep(mqar.sweep_config(None, **kw), log=lambda m: None)
    par = mqar.run_sweep(mqar.sweep_config(None, jobs=2, **kw), log=lambda m: None)
    assert [(r["d_model"], r["accuracy"], r["final_loss"]) for r in par["runs"]] == [
        (r["d_model"], r["accuracy"], r["final_loss"]) for r in seq["runs"]
    ]


def test_default_sweep_covers_registry_but_shortconv():
    assert set(mqar.default_mixers()) == {
        "attention",
        "deltanet",
        "gated_deltanet",
        "gla",
        "lightning",
        "moh",
        "swa",
    }
    with pytest.raises(LMStackError, match="unknown mixer"):
        mqar.run_sweep(mqar.sweep_config(None, mixers=["nope"]), log=lambda m: None)


def test_presets_build_a_probe_for_every_default_mixer():
    """Every mixer of the default sweep at every d_model of every preset makes a valid probe, with
    the preset's options and the heads it needs (MoH refuses a single head)."""
    for name in mqar.PRESETS:
        cfg = mqar.sweep_config(name)
        for mixer in mqar.default_mixers():
            heads = cfg.mixer_heads.get(mixer, cfg.n_heads)
            options = {mixer: cfg.mixer_options[mixer]} if mixer in cfg.mixer_options else None
            for d in cfg.d_models:
                mqar.probe_model_config(mixer, d, cfg.data, heads, options)
    assert mqar.sweep_config("cpu").mixer_options == {"swa": {"window": 16}}
    # --mixer-options for one mixer keeps the preset's options of the others.
    merged = mqar.sweep_config("cpu", mixer_options={"lightning": {"gate": "silu"}}).mixer_options
    assert merged == {"swa": {"window": 16}, "lightning": {"gate": "silu"}}
    # The probe's init scale (see probe_model_config): N(0, 1/d_model), not the LM's 0.02.
    assert mqar.probe_model_config("attention", 16, mqar.sweep_config("cpu").data).init_std == 0.25


def test_terminated_sweep_leaves_no_workers(tmp_path):
    """SIGTERM to a sweep with worker processes stops the workers too (none keeps training)."""
    import contextlib
    import os
    import signal
    import subprocess
    import sys
    import time

    cmd = [sys.executable, "-m", "lmstack.cli", "eval", "mqar", "--preset", "cpu", "--mixers", "attention"]
    cmd += ["--jobs", "2", "--out", str(tmp_path / "mqar")]
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        assert "group(s) to train" in proc.stderr.readline()
        time.sleep(3)  # the workers have started training
        os.kill(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                os.killpg(proc.pid, 0)  # anything left in the sweep's process group?
            except ProcessLookupError:
                return
            time.sleep(0.2)
        raise AssertionError("worker processes outlived the terminated sweep")
    finally:
        with contextlib.suppress(ProcessLookupError):  # the group is normally gone by now
            os.killpg(proc.pid, signal.SIGKILL)


def test_cli_mqar(tmp_path, capsys):
    from lmstack.cli import main

    out = tmp_path / "res"
    main(
        [
            "eval",
            "mqar",
            "--mixers",
            "attention",
            "--d-models",
            "16",
            "--lrs",
            "1e-3",
            "--vocab-size",
            "64",
            "--seq-len",
            "32",
            "--num-kv-pairs",
            "4",
            "--train-size",
            "64",
            "--val-size",
            "16",
            "--test-size",
            "16",
            "--epochs",
            "1",
            "--out",
            str(out),
        ]
    )
    assert "| attention |" in capsys.readouterr().out
    saved = json.loads(out.with_suffix(".json").read_text())
    assert saved["command"].startswith("lmstack eval mqar --mixers attention --d-models 16")


def test_sweep_continues_from_finished_groups(tmp_path, capsys):
    """A sweep skips the groups that an earlier sweep with the same settings finished (in PREFIX.json
    or, when it was interrupted, in PREFIX.progress.jsonl), and reports them with the new ones."""
    from lmstack.cli import main

    out = tmp_path / "res"
    args = ["eval", "mqar", "--mixers", "attention", "--lrs", "1e-3", "--vocab-size", "64", "--seq-len", "32",
            "--num-kv-pairs", "4", "--train-size", "64", "--val-size", "16", "--test-size", "16", "--epochs", "1",
            "--out", str(out)]  # fmt: skip
    main([*args, "--d-models", "16"])
    first = json.loads(out.with_suffix(".json").read_text())["runs"]
    capsys.readouterr()
    cfg = mqar.sweep_config(None, **{**_settings(args), "d_models": [16, 32, 8]})
    _, record = mqar.load_finished(cfg, out)
    record([{**first[0], "d_model": 8, "accuracy": 0.5}])  # as if an interrupted sweep had finished d=8
    main([*args, "--d-models", "16,32,8"])
    assert "1 group(s) to train (2 done before)" in capsys.readouterr().err
    saved = json.loads(out.with_suffix(".json").read_text())
    assert [r["d_model"] for r in saved["runs"]] == [16, 32, 8]
    assert saved["runs"][0] == first[0] and saved["runs"][2]["accuracy"] == 0.5
    assert not out.with_suffix(".progress.jsonl").exists()
    main([*args, "--d-models", "16", "--epochs", "2"])  # other settings: nothing is reused
    assert "1 group(s) to train (0 done before)" in capsys.readouterr().err


def _settings(args: list[str]) -> dict:
    """The sweep settings of `lmstack eval mqar` arguments (flag -> value, numbers parsed)."""
    pairs = dict(zip(args[2::2], args[3::2]))
    cast = {"--lrs": lambda v: [float(v)], "--mixers": lambda v: [v]}
    return {k[2:].replace("-", "_"): cast.get(k, int)(v) for k, v in pairs.items() if k not in ("--out",)}


# Zoology's recipe (zoology/train.py, zoology/model.py, its figure-2 configs): the preset, the weight
# decay groups, the init, the learning-rate grid, the GLA variant at full key width.
ZOOLOGY_NO_DECAY = {
    # every probe: the RMSNorm gains and the first layer's convolution bias
    "common": {
        "blocks.0.mixer_norm.weight",
        "blocks.0.mixer.conv.bias",
        "blocks.0.mlp_norm.weight",
        "blocks.1.mixer_norm.weight",
        "blocks.1.mlp_norm.weight",
        "norm.weight",
    },
    "gla": {
        "blocks.1.mixer.norm_weight",
        "blocks.1.mixer.gate_down.weight",
        "blocks.1.mixer.gate_up.weight",
        "blocks.1.mixer.gate_up.bias",
    },
    "deltanet": {"blocks.1.mixer.norm_weight", "blocks.1.mixer.beta_proj.weight"},
    "moh": {"blocks.1.mixer.router.weight"},
    "lightning": {"blocks.1.mixer.norm_weight"},
    "attention": set(),
}


@pytest.mark.parametrize("mixer", ["gla", "deltanet", "moh", "lightning", "attention"])
def test_zoology_param_groups_exempt_norms_biases_and_gates(mixer):
    from lmstack.eval.mqar.probe import param_groups

    data = mqar.sweep_config("cpu").data
    model = LM(mqar.probe_model_config(mixer, 16, data, 4 if mixer == "moh" else 1))
    names = {id(p): n for n, p in model.named_parameters()}
    decay, no_decay = param_groups(model, 0.1, "zoology")
    assert (decay["weight_decay"], no_decay["weight_decay"]) == (0.1, 0.0)
    assert {names[id(p)] for p in no_decay["params"]} == ZOOLOGY_NO_DECAY["common"] | ZOOLOGY_NO_DECAY[mixer]
    # every other parameter is decayed once, the (tied) embedding and the projections included
    assert {names[id(p)] for p in decay["params"]} == set(names.values()) - {
        names[id(p)] for p in no_decay["params"]
    }
    assert "embed.weight" in {names[id(p)] for p in decay["params"]}
    # the lmstack recipe decays everything
    (everything,) = param_groups(model, 0.1, "lmstack")
    assert len(everything["params"]) == len(names) and everything["weight_decay"] == 0.1


@pytest.mark.parametrize("init,std", [("zoology", 0.02), ("scaled", 64**-0.5)])
def test_probe_init_std(init, std):
    torch.manual_seed(0)
    data = mqar.sweep_config("zoology").data
    model = LM(mqar.probe_model_config("attention", 64, data, init=init))
    mixer = model.blocks[1].mixer
    # 64 x 64 = 4096 samples: the sample std is within ~3% of the true one
    for w, expected in (
        (mixer.q_proj.weight, std),
        (model.embed.weight, std),
        (mixer.o_proj.weight, std / 2),
    ):
        assert abs(w.std().item() / expected - 1) < 0.05, (w.std().item(), expected)
    with pytest.raises(LMStackError, match="init"):
        mqar.probe_model_config("attention", 64, data, init="xavier")


def test_zoology_recipe_presets_and_lr_grid():
    import numpy as np

    grid = np.logspace(-4, -2, 4)  # Zoology's figure-2 learning rates
    for name in ("cpu", "zoology"):
        cfg = mqar.sweep_config(name)
        assert cfg.train.recipe == "zoology" and cfg.seeds >= 3
        assert np.allclose(sorted(cfg.lrs), grid, rtol=0.025), cfg.lrs  # to 2 significant digits
        assert cfg.variants == {"gla_k1": {"mixer": "gla", "options": {"expand_k": 1.0}}}
    assert mqar.sweep_config("zoology").train.init == "recipe"  # Zoology's own N(0, 0.02)
    assert mqar.sweep_config("cpu").train.init == "scaled"  # see the cpu preset's comment
    assert mqar.sweep_config("zoology").train.epochs == 64
    with pytest.raises(LMStackError, match="recipe"):
        mqar.sweep_config("cpu", recipe="adam")


def test_gla_variant_runs_at_full_key_width():
    from lmstack.eval.mqar.sweep import mixer_and_options

    cfg = mqar.sweep_config("cpu")
    assert mixer_and_options(cfg, "gla_k1") == ("gla", {"gla": {"expand_k": 1.0}})
    assert mixer_and_options(cfg, "swa") == ("swa", {"swa": {"window": 16}})
    assert mixer_and_options(cfg, "gla") == ("gla", None)
    half = LM(mqar.probe_model_config("gla", 16, cfg.data))
    full = LM(mqar.probe_model_config("gla", 16, cfg.data, mixer_options={"gla": {"expand_k": 1.0}}))
    assert mqar.state_size(full, 32) == 2 * mqar.state_size(half, 32) == 16 * 16  # K x V of the one head
    with pytest.raises(LMStackError, match="unknown mixer 'nope'"):
        mqar.sweep_config("cpu", variants={"x": {"mixer": "nope"}})


def test_zoology_schedule_is_cosine_per_epoch_without_clipping(monkeypatch):
    """The learning rate of every step: constant within an epoch, lr * (1 + cos(pi e / E)) / 2."""
    seen = []
    real_step = torch.optim.AdamW.step

    def record(self, *args, **kwargs):
        seen.append(self.param_groups[0]["lr"])
        return real_step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.AdamW, "step", record)
    cfg = mqar.MQARConfig(vocab_size=32, seq_len=16, num_kv_pairs=2, train_size=64, val_size=8, test_size=8)
    settings = mqar.TrainSettings(recipe="zoology", epochs=4, batch_size=16, solved_at=2.0)
    mqar.train_one("attention", 16, 1e-2, cfg, mqar.make_splits(cfg), settings, log=lambda m: None)
    import math

    expected = [1e-2 * (1 + math.cos(math.pi * e / 4)) / 2 for e in range(4) for _ in range(4)]
    assert seen == pytest.approx(expected)
