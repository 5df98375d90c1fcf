"""The `deltanet` mixer: cached decoding with convolution and recurrent states, packed documents,
the state continuing into each row's first document only, the Triton and PyTorch backends, FLOPs, a
tiny LM that trains on CPU, and option errors."""

from __future__ import annotations

import pytest
import torch
from helpers import assert_lm_learns, assert_rel_rmse

from lmstack.errors import ConfigError
from lmstack.model.config import ModelConfig
from lmstack.model.lm import LM
from lmstack.model.mixers import get_mixer
from lmstack.model.mixers.base import BatchContext
from lmstack.model.mixers.deltanet import DeltaNetState


def _config(**kw) -> ModelConfig:
    base = dict(vocab_size=40, d_model=64, n_layers=2, n_heads=2, mixer="deltanet", max_seq_len=128)
    cfg = ModelConfig(**(base | kw))
    cfg.validate()
    return cfg


def _mixer(**options):
    cfg = _config(mixer_options={"deltanet": options})
    mixer = get_mixer("deltanet")(cfg, 0, cfg.mixer_options_for("deltanet"))
    torch.nn.init.normal_(mixer.norm_weight, 1.0, 0.1)  # not all ones, so that a mix-up would show
    return mixer.eval()


def _ctx(x: torch.Tensor, doc_ids: torch.Tensor | None = None, offset: int = 0) -> BatchContext:
    """Context of x: [B, T, D]: one document per row (continuing after `offset` tokens), or packed."""
    if doc_ids is None:
        return BatchContext.for_rows(x.shape[0], x.shape[1], offset=offset)
    return BatchContext.from_doc_ids(doc_ids, offsets=[offset] * x.shape[0])


OPTIONS = [{}, {"allow_neg_eigval": True, "gate": True}, {"conv_size": 2}]


@pytest.mark.parametrize("options", OPTIONS)
@torch.no_grad()
def test_cached_decoding_equals_full_forward(options: dict) -> None:
    """Prefill a chunk, decode single tokens, then another chunk: the convolution windows and the
    recurrent state carry over exactly."""
    mixer = _mixer(**options)
    x = torch.randn(2, 40, 64)
    full, none, _ = mixer(x, _ctx(x))
    assert none is None
    y, state, _ = mixer(x[:, :10], _ctx(x[:, :10]), use_cache=True)
    outs = [y]
    for t in range(10, 17):
        y, state, _ = mixer(x[:, t : t + 1], _ctx(x[:, :1], offset=t), state=state, use_cache=True)
        outs.append(y)
    y, state, _ = mixer(x[:, 17:], _ctx(x[:, 17:], offset=17), state=state, use_cache=True)
    outs.append(y)
    assert isinstance(state, DeltaNetState) and state.recurrent.shape == (2, 2, 32, 32)
    assert state.recurrent.dtype == torch.float32
    assert state.conv.window.shape == (2, mixer.options.conv_size - 1, 3 * 64)
    assert_rel_rmse(torch.cat(outs, 1), full, 1e-5, "decoded vs full")


@torch.no_grad()
def test_lm_generation_cache_equals_full_forward() -> None:
    model = LM(_config()).eval()
    ids = torch.randint(0, 40, (2, 30))
    full = model(ids).logits
    logits, cache, _ = model(ids[:, :5], use_cache=True)
    outs = [logits]
    for t in range(5, 30):
        logits, cache, _ = model(ids[:, t : t + 1], cache=cache, use_cache=True)
        outs.append(logits)
    assert_rel_rmse(torch.cat(outs, 1), full, 1e-5, "generation logits")


@torch.no_grad()
def test_packed_documents_equal_each_document_alone() -> None:
    mixer = _mixer()
    x = torch.randn(2, 48, 64)
    doc_ids = torch.tensor([[0] * 11 + [1] * 30 + [2] * 7, [5] * 48])
    y, state, _ = mixer(x, _ctx(x, doc_ids), use_cache=True)
    for row, s, e in [(0, 0, 11), (0, 11, 41), (0, 41, 48), (1, 0, 48)]:
        xi = x[row : row + 1, s:e]
        alone, alone_state, _ = mixer(xi, _ctx(xi), use_cache=True)
        assert_rel_rmse(y[row : row + 1, s:e], alone, 1e-5, f"row {row} doc {s}:{e}")
        if e == 48:  # the returned states are those of each row's last document
            assert_rel_rmse(state.recurrent[row : row + 1], alone_state.recurrent, 1e-5, f"row {row} state")
            assert_rel_rmse(
                state.conv.window[row : row + 1], alone_state.conv.window, 1e-6, f"row {row} conv"
            )


@torch.no_grad()
def test_state_continues_only_into_first_document() -> None:
    mixer = _mixer()
    x, prefix = torch.randn(2, 30, 64), torch.randn(2, 12, 64)
    _, state, _ = mixer(prefix, _ctx(prefix), use_cache=True)
    doc_ids = torch.tensor([[0] * 20 + [1] * 10, [0] * 30])
    y, _, _ = mixer(x, _ctx(x, doc_ids, offset=12), state=state, use_cache=True)
    cont, _, _ = mixer(x[:, :20], _ctx(x[:, :20], offset=12), state=state)
    assert_rel_rmse(y[:, :20], cont, 1e-5, "first document continues the state")
    fresh, _, _ = mixer(x[:1, 20:], _ctx(x[:1, 20:]))
    assert_rel_rmse(y[:1, 20:], fresh, 1e-5, "second document starts from zero")


def test_triton_backend_matches_torch_backend() -> None:
    """The mixer through the Triton kernels (interpreter on CPU) and through the chunked path,
    forward and backward, with packed documents."""
    torch.manual_seed(1)
    x = torch.randn(2, 40, 64)
    ctx = _ctx(x, torch.tensor([[0] * 25 + [1] * 15, [0] * 40]))
    results = []
    for backend in ("triton", "torch"):
        torch.manual_seed(0)
        mixer = _mixer(backend=backend, allow_neg_eigval=True)
        xi = x.clone().requires_grad_()
        y = mixer(xi, ctx).y
        y.pow(2).sum().backward()
        grads = [mixer.qkv_proj.weight.grad, mixer.beta_proj.weight.grad, mixer.conv.weight.grad]
        results.append((y.detach(), xi.grad, *grads))
    for name, a, b in zip(("y", "dx", "dWqkv", "dWbeta", "dconv"), *results):
        assert_rel_rmse(a, b, 1e-5, name)


def test_flops_per_token() -> None:
    D, H, Dh = 64, 2, 32
    proj = 2 * D * (3 * H * Dh + H) + 2 * H * Dh * D
    conv = 2 * 3 * H * Dh * 4
    at = lambda C, steps: H * (10 * C * Dh + 6 * Dh * Dh + steps * 4 * C * C)
    mixer = _mixer()
    assert mixer.flops_per_token(2048) == proj + conv + at(32, 5)
    assert mixer.flops_per_token(16) == proj + conv + at(16, 4)
    assert mixer.flops_per_token(32) == mixer.flops_per_token(65536)  # linear in T
    assert _mixer(gate=True).flops_per_token(16) == proj + 2 * D * H * Dh + conv + at(16, 4)


def test_bad_head_dim_and_options_raise() -> None:
    with pytest.raises(ConfigError, match="head_dim"):
        LM(_config(d_model=32, n_heads=4))  # head_dim 8
    with pytest.raises(ConfigError, match="conv_size"):
        _config(mixer_options={"deltanet": {"conv_size": 0}})
    with pytest.raises(ConfigError, match="gate"):
        _config(mixer_options={"deltanet": {"gate": "sigmoid"}})


def test_lm_trains_on_cpu() -> None:
    torch.manual_seed(0)
    assert_lm_learns(LM(_config(d_model=32, vocab_size=16)), 16)
