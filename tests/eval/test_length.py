"""`lmstack eval length`: loss by context position, checked against `eval ppl` and against plain
forward passes over each document piece, for every mixer beyond the training length."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from lmstack.errors import LMStackError
from lmstack.eval.length import context_positions, loss_by_position, run_length
from lmstack.eval.ppl import perplexity


def test_context_positions_restart_at_each_document():
    docs = torch.tensor([[0, 0, 0, 1, 1, 2, 2, 2], [0, 1, 2, 2, 2, 2, 3, 3]])
    expected = torch.tensor([[0, 1, 2, 0, 1, 0, 1, 2], [0, 0, 0, 1, 2, 3, 0, 1]])
    assert torch.equal(context_positions(docs, mask_documents=True), expected)
    assert torch.equal(context_positions(docs, mask_documents=False), torch.arange(8).expand(2, 8))


def test_at_the_training_length_it_equals_eval_ppl(prepared, models):
    cfg, _ = prepared
    _, model = models
    ppl = perplexity(model, cfg.path, seq_len=cfg.seq_len, batch_size=4)
    r = loss_by_position(model, cfg.path, cfg.seq_len, bucket_size=16, tokens_per_batch=4 * cfg.seq_len)
    assert r["tokens"] == ppl["tokens"]
    assert r["loss"] == pytest.approx(ppl["loss"], rel=1e-6)
    assert [(b["start"], b["end"]) for b in r["buckets"]] == [(i, i + 16) for i in range(0, cfg.seq_len, 16)]
    assert sum(b["tokens"] for b in r["buckets"]) == r["tokens"]
    weighted = sum(b["loss"] * b["tokens"] for b in r["buckets"]) / r["tokens"]
    assert weighted == pytest.approx(r["loss"], rel=1e-9)


@pytest.mark.parametrize("mask_documents", [True, False])
def test_buckets_equal_plain_forward_passes_beyond_the_training_length(prepared, models, mask_documents):
    """Length 200 (> the model's training rows of 64, not a multiple of the bucket size): every
    sequence (a document piece inside a row, or the whole row when joined) scored by a plain forward
    of its own, each token's loss put in the bucket of its position inside the sequence."""
    from lmstack.data.reader import TokenStream

    cfg, index = prepared
    _, model = models
    length, bucket = 200, 48
    stream = TokenStream(index, "val")
    tokens, docs = (torch.from_numpy(a) for a in stream.read(0, stream.num_tokens))
    n_buckets = -(-length // bucket)
    sums, counts = [0.0] * n_buckets, [0] * n_buckets
    with torch.no_grad():
        for row in range(0, len(tokens) - 1, length):
            end = min(row + length, len(tokens) - 1)
            cuts = [row, end]
            if mask_documents:
                inner = torch.nonzero(docs[row + 1 : end] != docs[row : end - 1]).flatten() + row + 1
                cuts = [row, *inner.tolist(), end]
            for a, b in zip(cuts[:-1], cuts[1:]):
                logp = F.log_softmax(model(tokens[a:b][None]).logits[0].double(), -1)
                nll = -logp.gather(1, tokens[a + 1 : b + 1, None])[:, 0]
                for pos, value in enumerate(nll.tolist()):
                    sums[pos // bucket] += value
                    counts[pos // bucket] += 1
    r = loss_by_position(
        model, cfg.path, length, bucket, tokens_per_batch=3 * length, mask_documents=mask_documents
    )
    assert r["tokens"] == sum(counts) == index.num_tokens("val") - 1
    assert [b["tokens"] for b in r["buckets"]] == [c for c in counts if c]
    assert [b["loss"] for b in r["buckets"]] == pytest.approx(
        [s / c for s, c in zip(sums, counts) if c], rel=1e-5
    )
    if not mask_documents:  # joined, every position of a full row is scored (these verses are shorter)
        assert r["buckets"][-1]["end"] == length


def test_every_mixer_at_four_times_its_training_length_equals_rowwise_forwards(prepared):
    """Rows of 256 tokens for models of max_seq_len 64, two rows per batch, documents joined: the
    buckets equal one plain forward per row, for every registered mixer."""
    from lmstack.data.reader import TokenStream
    from lmstack.model import LM, ModelConfig
    from lmstack.model.mixers import MIXERS

    cfg, index = prepared
    length, bucket = 256, 64
    tokens = torch.from_numpy(TokenStream(index, "val").read(0, 2 * length + 1)[0])
    for name in sorted(MIXERS):
        torch.manual_seed(0)
        layers = [name, name] if name != "shortconv" else ["shortconv", "attention"]
        model = LM(
            ModelConfig(
                vocab_size=index.vocab_size,
                d_model=32,
                n_layers=2,
                n_heads=2,
                max_seq_len=64,
                layer_mixers=layers,
                mlp_hidden=64,
                eos_token_id=0,
            )
        ).eval()
        with torch.no_grad():
            nll = torch.stack(
                [
                    F.cross_entropy(
                        model(tokens[a : a + length][None]).logits[0],
                        tokens[a + 1 : a + length + 1],
                        reduction="none",
                    )
                    for a in (0, length)
                ]
            )
        expected = nll.double().view(2, length // bucket, bucket).mean(dim=(0, 2))
        r = loss_by_position(
            model, cfg.path, length, bucket, tokens_per_batch=2 * length, max_rows=2, mask_documents=False
        )
        assert r["tokens"] == 2 * length, name
        assert [b["loss"] for b in r["buckets"]] == pytest.approx(expected.tolist(), rel=1e-5), name


def test_run_length_writes_json_and_png_and_rejects_bad_lengths(prepared, models, tmp_path):
    from lmstack.config import RunConfig
    from lmstack.export.checkpoint import save_model_dir

    cfg, index = prepared
    _, trained = models
    model_dir = save_model_dir(trained, tmp_path / "model", RunConfig(model=trained.config, data=cfg))
    report = run_length(
        [str(model_dir)], None, [64, 128], bucket_size=32, out=str(tmp_path / "len"), log=print
    )
    saved = json.loads((tmp_path / "len.json").read_text())
    assert saved == report and (tmp_path / "len.png").stat().st_size > 0
    entry = saved["models"][0]
    assert entry["train_seq_len"] == cfg.seq_len and [r["length"] for r in entry["lengths"]] == [64, 128]
    too_long = index.num_tokens("val") + 10
    with pytest.raises(LMStackError, match=f"--lengths {too_long}: the 'val' split"):
        run_length([str(model_dir)], None, [too_long], log=print)
    with pytest.raises(LMStackError, match="--lengths: each length must be at least 2"):
        run_length([str(model_dir)], None, [1], log=print)
