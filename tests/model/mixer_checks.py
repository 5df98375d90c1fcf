"""Checks shared by the tests of the recurrent mixers (lightning, gla, deltanet; imported as
`mixer_checks`): a small config, batch contexts, and the properties every such mixer has: packed
documents are isolated, a state continues only into each row's first document, the Triton and the
PyTorch backends agree, and cached decoding and generation equal one full forward."""

from __future__ import annotations

from collections.abc import Callable
from operator import attrgetter

import torch
from helpers import assert_rel_rmse, generate_in_pieces

from lmstack.model.config import ModelConfig
from lmstack.model.mixers.base import BatchContext


def mixer_config(mixer: str, **kw) -> ModelConfig:
    """A validated 2-layer config of `mixer` (d_model 64, 2 heads), with `kw` on top."""
    base = dict(vocab_size=40, d_model=64, n_layers=2, n_heads=2, mixer=mixer, max_seq_len=128)
    cfg = ModelConfig(**(base | kw))
    cfg.validate()
    return cfg


def context(x: torch.Tensor, doc_ids: torch.Tensor | None = None, offset: int = 0) -> BatchContext:
    """Context of x: [B, T, D]: one document per row (continuing after `offset` tokens), or packed."""
    if doc_ids is None:
        return BatchContext.for_rows(x.shape[0], x.shape[1], offset=offset)
    return BatchContext.from_doc_ids(doc_ids, offsets=[offset] * x.shape[0])


def decode_in_pieces(mixer, x: torch.Tensor, prefill: int, steps_until: int):
    """Prefill `prefill` tokens, decode one token at a time up to `steps_until`, then the rest in one
    chunk (if any), the state handed over each time. Returns (the outputs joined, the last state)."""
    y, state, _ = mixer(x[:, :prefill], context(x[:, :prefill]), use_cache=True)
    outs = [y]
    for t in range(prefill, steps_until):
        y, state, _ = mixer(x[:, t : t + 1], context(x[:, :1], offset=t), state=state, use_cache=True)
        outs.append(y)
    if steps_until < x.shape[1]:
        rest = x[:, steps_until:]
        y, state, _ = mixer(rest, context(rest, offset=steps_until), state=state, use_cache=True)
        outs.append(y)
    return torch.cat(outs, 1), state


@torch.no_grad()
def assert_generation_cache_equals_full_forward(model) -> None:
    """Prefill 5 tokens, then generate one at a time to 30: the logits of one full forward (max
    absolute error below 1e-4, relative RMSE below 1e-5)."""
    ids = torch.randint(0, 40, (2, 30))
    logits, cache = generate_in_pieces(model, ids, 5, 30)
    assert cache.seen_tokens == 30
    full = model(ids).logits
    assert (logits - full).abs().max().item() < 1e-4
    assert_rel_rmse(logits, full, 1e-5, "generation cache")


@torch.no_grad()
def assert_packed_documents_are_isolated(mixer, state_fields: dict[str, float]) -> None:
    """Each document of a packed batch gives the outputs it gives alone, and the returned state
    (its `state_fields`, attribute paths -> tolerance) is that of each row's last document."""
    x = torch.randn(2, 48, 64)
    doc_ids = torch.tensor([[0] * 11 + [1] * 30 + [2] * 7, [5] * 48])
    y, state, _ = mixer(x, context(x, doc_ids), use_cache=True)
    for row, s, e in [(0, 0, 11), (0, 11, 41), (0, 41, 48), (1, 0, 48)]:
        xi = x[row : row + 1, s:e]
        alone, alone_state, _ = mixer(xi, context(xi), use_cache=True)
        assert_rel_rmse(y[row : row + 1, s:e], alone, 1e-5, f"row {row} doc {s}:{e}")
        if e == 48:
            for field, tol in state_fields.items():
                got, want = attrgetter(field)(state), attrgetter(field)(alone_state)
                assert_rel_rmse(got[row : row + 1], want, tol, f"row {row} {field}")


@torch.no_grad()
def assert_state_continues_only_into_first_document(mixer, state_fields: dict[str, float]) -> None:
    """With a state, each row's first document continues it and later documents start afresh; the
    returned state (its `state_fields`) is that of each row's last document."""
    x, prefix = torch.randn(2, 30, 64), torch.randn(2, 12, 64)
    _, state, _ = mixer(prefix, context(prefix), use_cache=True)
    doc_ids = torch.tensor([[0] * 20 + [1] * 10, [0] * 30])
    y, new_state, _ = mixer(x, context(x, doc_ids, offset=12), state=state, use_cache=True)
    cont, _, _ = mixer(x[:, :20], context(x[:, :20], offset=12), state=state, use_cache=True)
    assert_rel_rmse(y[:, :20], cont, 1e-5, "first document continues the state")
    fresh, fresh_state, _ = mixer(x[:1, 20:], context(x[:1, 20:]), use_cache=True)
    assert_rel_rmse(y[:1, 20:], fresh, 1e-5, "second document starts from zero")
    whole, whole_state, _ = mixer(x, context(x, offset=12), state=state, use_cache=True)
    assert_rel_rmse(y[1:], whole[1:], 1e-5, "row 1: one document continuing the state")
    for field, tol in state_fields.items():
        got = attrgetter(field)(new_state)
        assert_rel_rmse(got[:1], attrgetter(field)(fresh_state), tol, f"row 0 {field}")
        assert_rel_rmse(got[1:], attrgetter(field)(whole_state)[1:], tol, f"row 1 {field}")


def assert_triton_matches_torch(
    make_mixer: Callable[[str], torch.nn.Module], weights: tuple[str, ...]
) -> None:
    """The mixer through the Triton kernels (interpreter on CPU) and through the chunked path, with
    packed documents: the same output and gradients of the input and of `weights` (attribute paths)."""
    torch.manual_seed(1)
    x = torch.randn(2, 40, 64)
    ctx = context(x, torch.tensor([[0] * 25 + [1] * 15, [0] * 40]))
    results = []
    for backend in ("triton", "torch"):
        torch.manual_seed(0)
        mixer = make_mixer(backend)
        xi = x.clone().requires_grad_()
        y = mixer(xi, ctx).y
        y.pow(2).sum().backward()
        results.append((y.detach(), xi.grad, *(attrgetter(w)(mixer).grad for w in weights)))
    for name, a, b in zip(("y", "dx", *weights), *results):
        assert_rel_rmse(a, b, 1e-5, name)
