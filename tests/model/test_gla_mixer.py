"""The `gla` mixer: cached decoding (prefill, single steps, a chunk), packed documents, the state
entering only the first document, the Triton path against the chunked path, option errors, and a
tiny LM whose loss falls. Two slices with the state handed over: tests/model/test_interface.py (with
and without the short convolution)."""

from __future__ import annotations

import pytest
import torch
from helpers import assert_lm_learns, assert_rel_rmse

from lmstack.errors import ConfigError
from lmstack.model.config import ModelConfig
from lmstack.model.lm import LM
from lmstack.model.mixers import get_mixer
from lmstack.model.mixers.base import BatchContext
from lmstack.model.mixers.gla import GLAState


def _config(**kw) -> ModelConfig:
    base = dict(vocab_size=40, d_model=64, n_layers=2, n_heads=2, mixer="gla", max_seq_len=128)
    cfg = ModelConfig(**(base | kw))
    cfg.validate()
    return cfg


def _mixer(**options):
    cfg = _config(mixer_options={"gla": options})
    torch.manual_seed(0)
    mixer = get_mixer("gla")(cfg, 0, cfg.mixer_options_for("gla"))
    with torch.no_grad():  # not all ones / zeros, so that a mix-up of heads or gates would show
        mixer.norm_weight.normal_(1.0, 0.1)
        mixer.gate_up.bias.normal_(0.0, 1.0)
    return mixer.eval()


def _ctx(x: torch.Tensor, doc_ids: torch.Tensor | None = None, offset: int = 0) -> BatchContext:
    """Context of x: [B, T, D]: one document per row (continuing after `offset` tokens), or packed."""
    if doc_ids is None:
        return BatchContext.for_rows(x.shape[0], x.shape[1], offset=offset)
    return BatchContext.from_doc_ids(doc_ids, offsets=[offset] * x.shape[0])


OPTIONS = [
    {},
    {"use_short_conv": True},
    {"expand_k": 1.0, "gate_logit_normalizer": 2.0, "use_short_conv": True},
]


@pytest.mark.parametrize("options", OPTIONS)
@torch.no_grad()
def test_cached_decoding_equals_full_forward(options: dict) -> None:
    """Prefill 10 tokens, decode 20 one at a time, then a chunk of 7 with the state handed over."""
    mixer = _mixer(**options)
    x = torch.randn(2, 37, 64)
    full, none, _ = mixer(x, _ctx(x))
    assert none is None
    y, state, _ = mixer(x[:, :10], _ctx(x[:, :10]), use_cache=True)
    outs = [y]
    for t in range(10, 30):
        y, state, _ = mixer(x[:, t : t + 1], _ctx(x[:, :1], offset=t), state=state, use_cache=True)
        outs.append(y)
    y, state, _ = mixer(x[:, 30:], _ctx(x[:, 30:], offset=30), state=state, use_cache=True)
    outs.append(y)
    K = 32 * options.get("expand_k", 0.5)
    assert isinstance(state, GLAState) and state.kv.shape == (2, 2, K, 32)
    assert state.kv.dtype == torch.float32
    assert (state.conv is not None) == options.get("use_short_conv", False)
    assert_rel_rmse(torch.cat(outs, 1), full, 1e-5, "cached vs full")


@torch.no_grad()
def test_lm_generation_cache_equals_full_forward() -> None:
    torch.manual_seed(0)
    model = LM(_config(mixer_options={"gla": {"use_short_conv": True}})).eval()
    ids = torch.randint(0, 40, (2, 30))
    full = model(ids).logits
    logits, cache, _ = model(ids[:, :5], use_cache=True)
    outs = [logits]
    for t in range(5, 30):
        logits, cache, _ = model(ids[:, t : t + 1], cache=cache, use_cache=True)
        outs.append(logits)
    assert cache.seen_tokens == 30
    assert_rel_rmse(torch.cat(outs, 1), full, 1e-5, "generation cache")


@pytest.mark.parametrize("options", OPTIONS[:2])
@torch.no_grad()
def test_packed_documents_are_isolated(options: dict) -> None:
    mixer = _mixer(**options)
    x = torch.randn(2, 48, 64)
    doc_ids = torch.tensor([[0] * 11 + [1] * 30 + [2] * 7, [5] * 48])
    y, state, _ = mixer(x, _ctx(x, doc_ids), use_cache=True)
    for row, s, e in [(0, 0, 11), (0, 11, 41), (0, 41, 48), (1, 0, 48)]:
        xi = x[row : row + 1, s:e]
        alone, alone_state, _ = mixer(xi, _ctx(xi), use_cache=True)
        assert_rel_rmse(y[row : row + 1, s:e], alone, 1e-5, f"row {row} doc {s}:{e}")
        if e == 48:  # the returned state is that of each row's last document
            assert_rel_rmse(state.kv[row : row + 1], alone_state.kv, 1e-5, f"row {row} state")


@torch.no_grad()
def test_state_continues_only_into_first_document() -> None:
    """With a state, each row's first document continues it and later documents start afresh."""
    mixer = _mixer(use_short_conv=True)
    x = torch.randn(2, 30, 64)
    prefix = torch.randn(2, 12, 64)
    _, state, _ = mixer(prefix, _ctx(prefix), use_cache=True)
    doc_ids = torch.tensor([[0] * 20 + [1] * 10, [0] * 30])
    y, new_state, _ = mixer(x, _ctx(x, doc_ids, offset=12), state=state, use_cache=True)
    cont, _, _ = mixer(x[:, :20], _ctx(x[:, :20], offset=12), state=state, use_cache=True)
    assert_rel_rmse(y[:, :20], cont, 1e-5, "first document continues the state")
    fresh, fresh_state, _ = mixer(x[:1, 20:], _ctx(x[:1, 20:]), use_cache=True)
    assert_rel_rmse(y[:1, 20:], fresh, 1e-5, "second document starts from zero")
    assert_rel_rmse(new_state.kv[:1], fresh_state.kv, 1e-5, "row 0 state")


def test_triton_backend_matches_torch_backend() -> None:
    """The mixer through the Triton kernels (interpreter on CPU) and through the chunked path,
    forward and backward (the gates' projections included), with packed documents."""
    torch.manual_seed(1)
    x = torch.randn(2, 40, 64)
    ctx = _ctx(x, torch.tensor([[0] * 25 + [1] * 15, [0] * 40]))
    results = []
    for backend in ("triton", "torch"):
        mixer = _mixer(backend=backend)
        xi = x.clone().requires_grad_()
        y = mixer(xi, ctx).y
        y.pow(2).sum().backward()
        results.append((y.detach(), xi.grad, mixer.k_proj.weight.grad, mixer.gate_up.weight.grad))
    for name, a, b in zip(("y", "dx", "dWk", "dW_gate_up"), *results):
        assert_rel_rmse(a, b, 1e-5, name)


@pytest.mark.parametrize(
    ("options", "field", "shape"),
    [
        ({"expand_k": 0.3}, "expand_k", {}),  # 64 · 0.3 keys is not a whole number
        ({"expand_k": 0.25}, "expand_k", {"d_model": 40, "n_heads": 4}),  # 10 keys over 4 heads
        ({"expand_k": 0}, "expand_k", {}),
        ({"conv_size": 0}, "conv_size", {}),
        ({"gate_logit_normalizer": -1.0}, "gate_logit_normalizer", {}),
        ({"gate_low_rank_dim": 0}, "gate_low_rank_dim", {}),
    ],
)
def test_bad_options_are_config_errors(options: dict, field: str, shape: dict) -> None:
    cfg = {"vocab_size": 40, "d_model": 64, "n_layers": 1, "n_heads": 2, "mixer": "gla"} | shape
    with pytest.raises(ConfigError, match=rf"model\.mixer_options\.gla\.{field}: "):
        ModelConfig(**cfg, mixer_options={"gla": options}).validate("model.")


def test_tiny_lm_trains() -> None:
    torch.manual_seed(0)
    assert_lm_learns(
        LM(_config(d_model=32, vocab_size=16, mixer_options={"gla": {"use_short_conv": True}})), 16
    )
