"""The `deltanet` mixer: cached decoding with convolution and recurrent states, packed documents,
the state continuing into each row's first document only, the Triton and PyTorch backends, FLOPs, a
tiny LM that trains on CPU, and option errors."""

from __future__ import annotations

import mixer_checks as checks
import pytest
import torch
from helpers import assert_lm_learns, assert_rel_rmse

from lmstack.errors import ConfigError
from lmstack.model.config import ModelConfig
from lmstack.model.lm import LM
from lmstack.model.mixers import get_mixer
from lmstack.model.mixers.deltanet import DeltaNetState


def _config(**kw) -> ModelConfig:
    return checks.mixer_config("deltanet", **kw)


def _mixer(**options):
    cfg = _config(mixer_options={"deltanet": options})
    mixer = get_mixer("deltanet")(cfg, 0, cfg.mixer_options_for("deltanet"))
    torch.nn.init.normal_(mixer.norm_weight, 1.0, 0.1)  # not all ones, so that a mix-up would show
    return mixer.eval()


OPTIONS = [{}, {"allow_neg_eigval": True, "gate": True}, {"conv_size": 2}]


@pytest.mark.parametrize("options", OPTIONS)
@torch.no_grad()
def test_cached_decoding_equals_full_forward(options: dict) -> None:
    """Prefill a chunk, decode single tokens, then another chunk: the convolution windows and the
    recurrent state carry over exactly."""
    mixer = _mixer(**options)
    x = torch.randn(2, 40, 64)
    full, none, _ = mixer(x, checks.context(x))
    assert none is None
    decoded, state = checks.decode_in_pieces(mixer, x, 10, 17)
    assert isinstance(state, DeltaNetState) and state.recurrent.shape == (2, 2, 32, 32)
    assert state.recurrent.dtype == torch.float32
    assert state.conv.window.shape == (2, mixer.options.conv_size - 1, 3 * 64)
    assert_rel_rmse(decoded, full, 1e-5, "decoded vs full")


def test_lm_generation_cache_equals_full_forward() -> None:
    checks.assert_generation_cache_equals_full_forward(LM(_config()).eval())


@torch.no_grad()
def test_packed_documents_equal_each_document_alone() -> None:
    checks.assert_packed_documents_are_isolated(_mixer(), {"recurrent": 1e-5, "conv.window": 1e-6})


@torch.no_grad()
def test_state_continues_only_into_first_document() -> None:
    checks.assert_state_continues_only_into_first_document(_mixer(), {"recurrent": 1e-5, "conv.window": 1e-6})


def test_triton_backend_matches_torch_backend() -> None:
    checks.assert_triton_matches_torch(
        lambda backend: _mixer(backend=backend, allow_neg_eigval=True),
        ("qkv_proj.weight", "beta_proj.weight", "conv.weight"),
    )


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
