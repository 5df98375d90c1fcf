"""Held-out perplexity on prepared data, and the eval CLI on a checkpoint-style model folder."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from lmstack.errors import LMStackError
from lmstack.eval.ppl import perplexity, run_ppl


def test_ppl_scores_every_validation_token(prepared, models):
    cfg, index = prepared
    untrained, trained = models
    r_u = perplexity(untrained, cfg.path, seq_len=64, batch_size=4)
    r_t = perplexity(trained, cfg.path, seq_len=64, batch_size=4)
    assert r_t["tokens"] == r_u["tokens"] == index.num_tokens("val") - 1
    assert r_t["perplexity"] < r_u["perplexity"] / 3
    assert math.isclose(r_t["perplexity"], math.exp(r_t["loss"]))
    assert r_u["perplexity"] == pytest.approx(index.vocab_size, rel=0.5)  # untrained: near uniform
    # the row length does not change the sum over documents much (documents are masked, not cut)
    r_long = perplexity(trained, cfg.path, seq_len=128, batch_size=2)
    assert r_long["tokens"] == r_t["tokens"]


@pytest.mark.parametrize("seq_len", [64, 100])
def test_ppl_equals_nll_of_plain_forward_passes(prepared, models, seq_len):
    """The reader cuts the split's token stream into rows of seq_len; each piece of a document inside
    a row is scored here on its own by a plain forward (no batch context, no packing), and its last
    token predicts the token after the piece (the next row's or document's first)."""
    import torch
    import torch.nn.functional as F

    from lmstack.data.reader import TokenStream

    cfg, index = prepared
    _, model = models
    stream = TokenStream(index, "val")
    tokens, docs = (torch.from_numpy(a) for a in stream.read(0, stream.num_tokens))
    nll, count = 0.0, 0
    with torch.no_grad():
        for row in range(0, len(tokens) - 1, seq_len):
            end = min(row + seq_len, len(tokens) - 1)
            cuts = [
                row,
                *(torch.nonzero(docs[row + 1 : end] != docs[row : end - 1]).flatten() + row + 1).tolist(),
                end,
            ]
            for a, b in zip(cuts[:-1], cuts[1:]):
                logp = F.log_softmax(model(tokens[a:b][None]).logits[0].double(), -1)
                nll -= logp.gather(1, tokens[a + 1 : b + 1, None]).sum().item()
                count += b - a
    result = perplexity(model, cfg.path, seq_len=seq_len, batch_size=3)
    assert result["tokens"] == count == index.num_tokens("val") - 1
    assert result["loss"] == pytest.approx(nll / count, rel=1e-5)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, prepared, models):
    """A plain model directory (config.yaml naming the data, model.safetensors, tokenizer/)."""
    from lmstack.config import RunConfig
    from lmstack.export.checkpoint import save_model_dir

    cfg, _ = prepared
    _, trained = models
    run_config = RunConfig(model=trained.config, data=cfg)
    out = tmp_path_factory.mktemp("ckpt") / "model"
    return save_model_dir(trained, out, run_config, tokenizer_dir=Path(cfg.path) / "tokenizer")


def test_run_ppl_reads_data_from_run_config(model_dir, prepared, models, tmp_path):
    cfg, _ = prepared
    out = tmp_path / "ppl.json"
    res = run_ppl(str(model_dir), output=str(out), log=lambda m: None)
    assert res["data"] == cfg.path and res["seq_len"] == cfg.seq_len
    direct = perplexity(models[1], cfg.path, seq_len=cfg.seq_len)
    assert res["perplexity"] == pytest.approx(direct["perplexity"], rel=1e-5)
    assert json.loads(out.read_text())["perplexity"] == res["perplexity"]


def test_run_ppl_on_export(exported, prepared):
    cfg, _ = prepared
    res = run_ppl(str(exported["trained"]), data_dir=cfg.path, seq_len=64, log=lambda m: None)
    with pytest.raises(LMStackError, match="--data"):
        run_ppl(str(exported["trained"]), log=lambda m: None)
    assert res["tokens"] > 0 and res["perplexity"] > 1


def test_checkpoint_scores_the_perplexity_of_its_export(checkpoint, prepared):
    """A DeepSpeed checkpoint (its run dir: data and seq_len from the run config) and its export score
    what the engine's own weights in a freshly built LM score."""
    from lmstack.model import LM

    cfg, _ = prepared
    from_run = run_ppl(str(checkpoint["run"]), log=lambda m: None)
    from_export = run_ppl(
        str(checkpoint["export"]), data_dir=cfg.path, seq_len=cfg.seq_len, log=lambda m: None
    )
    model = LM(checkpoint["config"].model)
    model.load_state_dict(checkpoint["reference"])
    direct = perplexity(model, cfg.path, seq_len=cfg.seq_len)
    assert from_run["data"] == cfg.path and from_run["seq_len"] == cfg.seq_len
    assert from_run["tokens"] == from_export["tokens"] == direct["tokens"] > 0
    assert from_run["loss"] == pytest.approx(direct["loss"], rel=1e-6, abs=0)
    assert from_export["loss"] == pytest.approx(direct["loss"], rel=1e-6, abs=0)


def test_cli_harness_on_a_checkpoint_equals_its_export(model_dir, exported, tmp_path, capsys):
    """`eval harness` reads a checkpoint as its export would be read: the same lm-eval results."""
    from lmstack.cli import main

    for name, path in (("checkpoint", model_dir), ("export", exported["trained"])):
        main(
            [
                "eval",
                "harness",
                str(path),
                "--tasks",
                "lmstack_mc",
                "--limit",
                "8",
                "-o",
                str(tmp_path / name),
            ]
        )
    out = capsys.readouterr()
    assert "| lmstack_mc | acc (%) |" in out.out
    assert f"loaded the checkpoint {model_dir} (not an export)" in out.err
    checkpoint, export = (
        json.loads((tmp_path / n / "harness.json").read_text()) for n in ("checkpoint", "export")
    )
    assert checkpoint["n_samples"]["lmstack_mc"]["effective"] == 8
    assert checkpoint["results"] == export["results"] and checkpoint["settings"] == export["settings"]


def test_cli_ppl(model_dir, capsys):
    from lmstack.cli import main

    main(["eval", "ppl", str(model_dir), "--max-batches", "1", "--batch-size", "2"])
    out = capsys.readouterr()
    res = json.loads(out.out)
    assert 0 < res["tokens"] <= 2 * 64 and not res["complete"]
    assert "ppl" in out.err
