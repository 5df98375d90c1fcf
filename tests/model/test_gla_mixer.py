"""The `gla` mixer: cached decoding (prefill, single steps, a chunk), packed documents, the state
entering only the first document, the Triton path against the chunked path, option errors, and a
tiny LM whose loss falls. Two slices with the state handed over: tests/model/test_interface.py (with
and without the short convolution)."""

from __future__ import annotations

import mixer_checks as checks
import pytest
import torch
from helpers import assert_lm_learns, assert_rel_rmse

from lmstack.errors import ConfigError
from lmstack.model.config import ModelConfig
from lmstack.model.lm import LM
from lmstack.model.mixers import get_mixer
from lmstack.model.mixers.gla import GLAState


def _config(**kw) -> ModelConfig:
    return checks.mixer_config("gla", **kw)


def _mixer(**options):
    cfg = _config(mixer_options={"gla": options})
    torch.manual_seed(0)
    mixer = get_mixer("gla")(cfg, 0, cfg.mixer_options_for("gla"))
    with torch.no_grad():  # not all ones / zeros, so that a mix-up of heads or gates would show
        mixer.norm_weight.normal_(1.0, 0.1)
        mixer.gate_up.bias.normal_(0.0, 1.0)
    return mixer.eval()


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
    full, none, _ = mixer(x, checks.context(x))
    assert none is None
    decoded, state = checks.decode_in_pieces(mixer, x, 10, 30)
    K = 32 * options.get("expand_k", 0.5)
    assert isinstance(state, GLAState) and state.kv.shape == (2, 2, K, 32)
    assert state.kv.dtype == torch.float32
    assert (state.conv is not None) == options.get("use_short_conv", False)
    assert_rel_rmse(decoded, full, 1e-5, "cached vs full")


def test_lm_generation_cache_equals_full_forward() -> None:
    torch.manual_seed(0)
    checks.assert_generation_cache_equals_full_forward(
        LM(_config(mixer_options={"gla": {"use_short_conv": True}})).eval()
    )


@pytest.mark.parametrize("options", OPTIONS[:2])
@torch.no_grad()
def test_packed_documents_are_isolated(options: dict) -> None:
    checks.assert_packed_documents_are_isolated(_mixer(**options), {"kv": 1e-5})


@torch.no_grad()
def test_state_continues_only_into_first_document() -> None:
    checks.assert_state_continues_only_into_first_document(_mixer(use_short_conv=True), {"kv": 1e-5})


def test_triton_backend_matches_torch_backend() -> None:
    """Forward and backward, the gates' projections included."""
    checks.assert_triton_matches_torch(
        lambda backend: _mixer(backend=backend), ("k_proj.weight", "gate_up.weight")
    )


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
