"""The fused linear cross-entropy (lmstack/model/loss.py) against the plain LM head + cross-entropy and
an fp64 reference: loss, labelled count, and the gradients of hidden states and head weight."""

from __future__ import annotations

import pytest
import torch

from lmstack.model import LM, ModelConfig
from lmstack.model.loss import IGNORE_INDEX, fused_linear_next_token_loss_sum, next_token_loss_sum


def _inputs(B=2, T=13, D=16, V=97, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(B, T, D, generator=g).to(dtype).requires_grad_()
    weight = (torch.randn(V, D, generator=g) / D**0.5).to(dtype).requires_grad_()
    labels = torch.randint(0, V, (B, T), generator=g)
    labels[0, :4] = IGNORE_INDEX  # a padded start
    labels[1, -1] = IGNORE_INDEX
    return hidden, weight, labels


def _plain(hidden, weight, labels, dtype=None):
    """(loss, count, grad hidden, grad weight) of the unfused path; dtype float64: an fp64 loop over
    the labelled tokens instead (the independent reference)."""
    h = hidden.detach().to(dtype or hidden.dtype).requires_grad_()
    w = weight.detach().to(dtype or weight.dtype).requires_grad_()
    if dtype == torch.float64:
        logits, flat = (h @ w.t()).flatten(0, 1), labels.flatten()
        kept = [i for i in range(len(flat)) if flat[i] != IGNORE_INDEX]
        loss = sum(torch.logsumexp(logits[i], 0) - logits[i, flat[i]] for i in kept)
        count = torch.tensor(len(kept))
    else:
        loss, count = next_token_loss_sum(h @ w.t(), labels)
    loss.backward()
    return loss.detach(), count, h.grad, w.grad


@pytest.mark.parametrize("chunk_size", [1, 5, 13, 26, 1000])  # 26 = B*T; 5 and 13 leave ragged chunks
def test_fp32_equals_the_plain_path(chunk_size):
    hidden, weight, labels = _inputs()
    ref_loss, ref_count, ref_gh, ref_gw = _plain(hidden, weight, labels, torch.float64)
    loss, count = fused_linear_next_token_loss_sum(hidden, weight, labels, chunk_size=chunk_size)
    (0.5 * loss).backward()  # a non-unit incoming gradient reaches both grads
    plain_loss, _, plain_gh, plain_gw = _plain(hidden, weight, labels)
    assert count == ref_count == 26 - 5
    torch.testing.assert_close(loss.double(), ref_loss, rtol=1e-6, atol=0)
    torch.testing.assert_close(loss, plain_loss, rtol=1e-6, atol=0)
    torch.testing.assert_close(hidden.grad.double(), 0.5 * ref_gh, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(weight.grad.double(), 0.5 * ref_gw, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(hidden.grad, 0.5 * plain_gh, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(weight.grad, 0.5 * plain_gw, rtol=1e-5, atol=1e-6)


def test_under_no_grad_the_loss_is_the_same_and_no_gradient_is_formed(monkeypatch):
    # Evaluation runs the fused loss under torch.no_grad on leaves that require grad: the loss only.
    hidden, weight, labels = _inputs()
    plain_loss, *_ = _plain(hidden, weight, labels)

    def no_grad_products(*args, **kw):
        raise AssertionError("a gradient product under torch.no_grad")

    monkeypatch.setattr(torch.Tensor, "addmm_", no_grad_products)
    with torch.no_grad():
        loss, _ = fused_linear_next_token_loss_sum(hidden, weight, labels, chunk_size=5)
    torch.testing.assert_close(loss, plain_loss, rtol=1e-6, atol=0)


def test_ignored_tokens_contribute_nothing():
    hidden, weight, labels = _inputs()
    loss, _ = fused_linear_next_token_loss_sum(hidden, weight, labels, chunk_size=4)
    loss.backward()
    assert torch.all(hidden.grad[0, :4] == 0) and torch.all(hidden.grad[1, -1] == 0)
    everything_ignored = torch.full_like(labels, IGNORE_INDEX)
    empty, count = fused_linear_next_token_loss_sum(hidden, weight, everything_ignored)
    assert count == 0 and empty.item() == 0.0


def test_bf16_loss_matches_plain_and_grads_are_no_worse_than_plain():
    """bf16 weights (DeepSpeed's bf16 runs): the logits are bf16 in both paths, so the losses agree to
    fp32 rounding; the fused gradients stay in fp32, so they are at least as close to fp64 as plain's."""
    hidden, weight, labels = _inputs(T=33, V=301, dtype=torch.bfloat16)
    loss, _ = fused_linear_next_token_loss_sum(hidden, weight, labels, chunk_size=7)
    loss.backward()
    assert hidden.grad.dtype == weight.grad.dtype == torch.bfloat16
    plain_loss, _, plain_gh, plain_gw = _plain(hidden, weight, labels)
    torch.testing.assert_close(loss, plain_loss, rtol=1e-6, atol=0)
    _, _, ref_gh, ref_gw = _plain(hidden, weight, labels, torch.float64)
    for fused, plain, ref in ((hidden.grad, plain_gh, ref_gh), (weight.grad, plain_gw, ref_gw)):
        assert (fused.double() - ref).abs().max() <= (plain.double() - ref).abs().max()


def test_under_autocast_the_logits_take_the_autocast_dtype():
    hidden, weight, labels = _inputs(T=21, V=211)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, _ = fused_linear_next_token_loss_sum(hidden, weight, labels, chunk_size=8)
        plain, _ = next_token_loss_sum(hidden @ weight.t(), labels)
    loss.backward()
    assert hidden.grad.dtype == weight.grad.dtype == torch.float32
    torch.testing.assert_close(loss, plain, rtol=1e-6, atol=0)


def test_the_lm_with_tied_embeddings_gets_the_same_grads():
    """Through a whole tied-embedding LM: the head weight's gradient adds to the embedding's."""
    torch.manual_seed(0)
    cfg = ModelConfig.from_dict(
        dict(vocab_size=64, d_model=32, n_layers=2, n_heads=2, max_seq_len=16, tie_embeddings=True)
    )
    model = LM(cfg)
    ids = torch.randint(0, 64, (2, 16))
    labels = torch.roll(ids, -1, 1)
    labels[:, -1] = IGNORE_INDEX
    grads = []
    for fused in (False, True):
        model.zero_grad()
        out = model(ids, return_hidden=fused)
        if fused:
            loss, _ = fused_linear_next_token_loss_sum(out.logits, model.lm_head.weight, labels, chunk_size=9)
        else:
            loss, _ = next_token_loss_sum(out.logits, labels)
        loss.backward()
        grads.append((loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
    (plain_loss, plain), (fused_loss, fused) = grads
    torch.testing.assert_close(fused_loss, plain_loss, rtol=1e-6, atol=0)
    assert model.lm_head.weight is model.embed.weight and plain.keys() == fused.keys()
    for name in plain:
        torch.testing.assert_close(fused[name], plain[name], rtol=1e-5, atol=1e-6, msg=name)


def test_bad_arguments_name_the_field():
    hidden, weight, labels = _inputs()
    with pytest.raises(ValueError, match="chunk_size"):
        fused_linear_next_token_loss_sum(hidden, weight, labels, chunk_size=0)
    with pytest.raises(ValueError, match="hidden/weight/labels"):
        fused_linear_next_token_loss_sum(hidden, weight[:, :8], labels)
