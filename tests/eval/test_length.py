"""`lmstack eval length`: loss per context position at evaluation lengths beyond the training length."""

from __future__ import annotations

import json
import math

import pytest
import torch

from lmstack.errors import LMStackError
from lmstack.eval.length import context_positions, length_losses, run_length
from lmstack.eval.ppl import perplexity


def test_context_positions_restart_at_each_document():
    doc_ids = torch.tensor([[0, 0, 0, 1, 1, 2], [0, 0, 0, 0, 0, 0]])
    expected = torch.tensor([[0, 1, 2, 0, 1, 0], [0, 1, 2, 3, 4, 5]])
    assert torch.equal(context_positions(doc_ids), expected)


def test_length_at_training_length_equals_ppl(prepared, models):
    cfg, _ = prepared
    _, trained = models
    ppl = perplexity(trained, cfg.path, seq_len=64, batch_size=4)
    r = length_losses(trained, cfg.path, 64, bucket_size=16, tokens_per_batch=256)
    assert r["tokens"] == ppl["tokens"]
    assert r["loss"] == pytest.approx(ppl["loss"], rel=1e-6)
    buckets = [b for b in r["buckets"] if b["tokens"]]
    assert sum(b["tokens"] for b in r["buckets"]) == r["tokens"]
    weighted = sum(b["loss"] * b["tokens"] for b in buckets) / r["tokens"]
    assert weighted == pytest.approx(r["loss"], rel=1e-9)


def test_joined_rows_bucket_by_row_position(prepared, models):
    """With documents joined, the first bucket of a row is scored by a plain forward of its first tokens."""
    import torch.nn.functional as F

    from lmstack.data.reader import TokenStream

    cfg, index = prepared
    _, trained = models
    L, bucket = 128, 32
    stream = TokenStream(index, "val")
    tokens = torch.from_numpy(stream.read(0, L + 1)[0])
    with torch.no_grad():
        logp = F.log_softmax(trained(tokens[None, :L]).logits[0].double(), -1)
    nll = -logp.gather(1, tokens[1:, None])[:, 0]
    r = length_losses(trained, cfg.path, L, bucket_size=bucket, max_rows=1, join_documents=True)
    assert r["rows"] == 1 and r["tokens"] == L
    for i, b in enumerate(r["buckets"]):
        assert b["loss"] == pytest.approx(nll[i * bucket : (i + 1) * bucket].mean().item(), rel=1e-5)


@pytest.mark.parametrize("mixer", ["attention", "lightning", "gla", "deltanet", "shortconv"])
def test_lengths_beyond_training_length_run_for_each_mixer(prepared, mixer):
    from lmstack.model import LM, ModelConfig

    cfg, index = prepared
    torch.manual_seed(0)
    model = LM(
        ModelConfig(
            vocab_size=index.vocab_size, d_model=32, n_layers=1, n_heads=2, max_seq_len=64, mixer=mixer
        )
    ).eval()
    for L in (64, 512):
        r = length_losses(model, cfg.path, L, bucket_size=64, max_rows=2, join_documents=True)
        assert r["rows"] == 2 and r["tokens"] == 2 * L
        assert len(r["buckets"]) == L // 64 and all(b["tokens"] == 128 for b in r["buckets"])
        assert math.isfinite(r["loss"])
        assert r["loss"] == pytest.approx(math.log(index.vocab_size), rel=0.2)  # untrained: near uniform


def test_run_length_writes_json_and_figure(tmp_path, prepared, exported):
    cfg, _ = prepared
    out = tmp_path / "len"
    report = run_length(
        [str(exported["trained"])],
        cfg.path,
        [64, 256],
        bucket_size=32,
        max_rows=3,
        output=str(out),
        log=lambda m: None,
    )
    saved = json.loads(out.with_suffix(".json").read_text())
    assert saved == report
    assert [r["seq_len"] for r in saved["models"][0]["lengths"]] == [64, 256]
    assert saved["models"][0]["lengths"][1]["times_train_length"] == 256 / 128  # export: max_seq_len
    assert out.with_suffix(".png").stat().st_size > 0


def test_bad_lengths_are_one_line_errors(prepared, models):
    cfg, index = prepared
    _, trained = models
    with pytest.raises(LMStackError, match="do not fit the 'val' split"):
        length_losses(trained, cfg.path, index.num_tokens("val") + 10)
    with pytest.raises(LMStackError, match="--lengths"):
        run_length([], cfg.path, [], log=lambda m: None)
    with pytest.raises(LMStackError, match="--max-rows"):
        length_losses(trained, cfg.path, 64, max_rows=0)
