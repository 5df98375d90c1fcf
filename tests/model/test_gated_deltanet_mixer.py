"""The `gated_deltanet` mixer: the whole layer against an independent fp64 re-implementation of the
paper's equations (outputs and every gradient), cached decoding with the convolution and recurrent
states, packed documents, the state continuing into each row's first document only, grouped value
heads, the decay's initialisation and its exclusion from weight decay, FLOPs, LMs (alone and in a
hybrid with sliding-window attention) that train on CPU, and option errors.

fla 0.6.0's `GatedDeltaNet` layer needs its Triton GPU kernels (ShortConvolution, the fused gated
RMSNorm, the chunked op), so the layer is compared against the fp64 re-implementation below instead.
"""

from __future__ import annotations

import math

import mixer_checks as checks
import pytest
import torch
import torch.nn.functional as F
from helpers import assert_lm_learns, assert_rel_rmse

from lmstack.errors import ConfigError
from lmstack.model.config import ModelConfig
from lmstack.model.lm import LM
from lmstack.model.mixers import get_mixer
from lmstack.model.mixers.gated_deltanet import GatedDeltaNetState
from lmstack.train.optim import param_groups

# K = 16 per head so that the tiny test model stays small; V = expand_v · K.
BASE = {"head_dim": 16, "num_heads": 2, "expand_v": 2.0}


def _config(**kw) -> ModelConfig:
    return checks.mixer_config("gated_deltanet", **kw)


def _mixer(**options):
    cfg = _config(mixer_options={"gated_deltanet": BASE | options})
    mixer = get_mixer("gated_deltanet")(cfg, 0, cfg.mixer_options_for("gated_deltanet"))
    torch.nn.init.normal_(mixer.norm_weight, 1.0, 0.1)  # not all ones, so that a mix-up would show
    return mixer.eval()


def reference_layer(mixer, x: torch.Tensor) -> torch.Tensor:
    """The layer from the paper's equations, in fp64, one document per row: depthwise causal
    convolutions + SiLU, L2-normalised q and k, β = σ(x W_b) (×2), α_t = exp(−A Δ_t) with
    Δ_t = softplus(x W_a + dt_bias), S_t = α_t (I − β_t k_t k_tᵀ) S_{t−1} + β_t k_t v_tᵀ,
    o_t = S_tᵀ q_t / √K, y = W_o (RMSNorm(o_t) w ⊙ SiLU(x W_g))."""
    p = {name: t.double() for name, t in mixer.named_parameters()}
    x = x.double()
    B, T, _ = x.shape
    H, K, Hv, V = mixer.n_heads, mixer.head_k, mixer.n_v_heads, mixer.head_v

    def conv(name: str, u: torch.Tensor) -> torch.Tensor:
        w = p[f"{name}.weight"]  # [C, k]
        out = F.conv1d(F.pad(u.transpose(1, 2), (w.shape[1] - 1, 0)), w[:, None], groups=w.shape[0])
        return F.silu(out.transpose(1, 2))

    q = conv("q_conv", x @ p["q_proj.weight"].T).view(B, T, H, K)
    k = conv("k_conv", x @ p["k_proj.weight"].T).view(B, T, H, K)
    v = conv("v_conv", x @ p["v_proj.weight"].T).view(B, T, Hv, V)
    q, k = q / q.norm(dim=-1, keepdim=True), k / k.norm(dim=-1, keepdim=True)
    beta = torch.sigmoid(x @ p["b_proj.weight"].T) * (2 if mixer.options.allow_neg_eigval else 1)
    alpha = torch.exp(-p["A_log"].exp() * F.softplus(x @ p["a_proj.weight"].T + p["dt_bias"]))
    o = torch.zeros(B, T, Hv, V, dtype=torch.float64)
    eye = torch.eye(K, dtype=torch.float64)
    for b in range(B):
        for j in range(Hv):
            h = j // (Hv // H)  # the q/k head of value head j
            S = torch.zeros(K, V, dtype=torch.float64)
            for t in range(T):
                kt = k[b, t, h]
                S = alpha[b, t, j] * (eye - beta[b, t, j] * torch.outer(kt, kt)) @ S
                S = S + beta[b, t, j] * torch.outer(kt, v[b, t, j])
                o[b, t, j] = S.T @ q[b, t, h] / math.sqrt(K)
    o = o * torch.rsqrt(o.pow(2).mean(-1, keepdim=True) + mixer.config.norm_eps) * p["norm_weight"]
    o = o.reshape(B, T, Hv * V)
    if mixer.g_proj is not None:
        o = o * F.silu(x @ p["g_proj.weight"].T)
    return o @ p["o_proj.weight"].T


REFERENCE_OPTIONS = [{}, {"allow_neg_eigval": True, "use_gate": False}, {"num_v_heads": 4, "expand_v": 1.0}]


@pytest.mark.parametrize("options", REFERENCE_OPTIONS)
def test_layer_equals_fp64_reference(options: dict) -> None:
    torch.manual_seed(0)
    mixer = _mixer(**options)
    x = torch.randn(2, 21, 64, requires_grad=True)  # odd T
    y = mixer(x, checks.context(x)).y
    x64 = x.detach().double().requires_grad_()
    params = dict(mixer.named_parameters())
    ref_params = {n: t.detach().double().requires_grad_() for n, t in params.items()}
    shadow = _Shadow(mixer, ref_params)
    ref = reference_layer(shadow, x64)
    assert_rel_rmse(y.detach(), ref.detach(), 1e-5, "y")
    w = torch.randn_like(ref)
    (y * w.float()).sum().backward()
    (ref * w).sum().backward()
    assert_rel_rmse(x.grad, x64.grad, 1e-5, "dx")
    for name, param in params.items():
        assert_rel_rmse(param.grad, ref_params[name].grad, 1e-5, f"d{name}")


class _Shadow:
    """The mixer's shapes and options with fp64 leaf copies of its parameters (for gradients)."""

    def __init__(self, mixer, params: dict[str, torch.Tensor]) -> None:
        self._params = params
        for attr in ("n_heads", "head_k", "n_v_heads", "head_v", "options", "config", "g_proj"):
            setattr(self, attr, getattr(mixer, attr))

    def named_parameters(self):
        return self._params.items()


@pytest.mark.parametrize(
    "options", [{}, {"allow_neg_eigval": True, "use_gate": False, "conv_size": 2}, {"num_v_heads": 4}]
)
@torch.no_grad()
def test_cached_decoding_equals_full_forward(options: dict) -> None:
    """Prefill a chunk, decode single tokens, then another chunk: the three convolution windows and
    the recurrent state carry over exactly."""
    mixer = _mixer(**options)
    x = torch.randn(2, 40, 64)
    full, none, _ = mixer(x, checks.context(x))
    assert none is None
    decoded, state = checks.decode_in_pieces(mixer, x, 10, 17)
    assert isinstance(state, GatedDeltaNetState)
    assert state.recurrent.shape == (2, mixer.n_v_heads, 16, mixer.head_v)
    assert state.recurrent.dtype == torch.float32
    k = mixer.options.conv_size
    assert [c.window.shape for c in state.conv] == [
        (2, k - 1, 32),
        (2, k - 1, 32),
        (2, k - 1, mixer.n_v_heads * mixer.head_v),
    ]
    assert_rel_rmse(decoded, full, 1e-5, "decoded vs full")


def test_lm_generation_cache_equals_full_forward() -> None:
    checks.assert_generation_cache_equals_full_forward(
        LM(_config(mixer_options={"gated_deltanet": BASE})).eval()
    )


@torch.no_grad()
def test_packed_documents_equal_each_document_alone() -> None:
    checks.assert_packed_documents_are_isolated(_mixer(), {"recurrent": 1e-5})


@torch.no_grad()
def test_state_continues_only_into_first_document() -> None:
    checks.assert_state_continues_only_into_first_document(_mixer(), {"recurrent": 1e-5})


def test_decay_initialisation_and_no_weight_decay() -> None:
    """A = exp(A_log) ~ U(0, 16) and Δ = softplus(dt_bias) in [1e-3, 1e-1] per value head (the
    paper's ranges), and neither is weight-decayed."""
    torch.manual_seed(0)
    model = LM(_config(n_layers=8, mixer_options={"gated_deltanet": BASE | {"num_v_heads": 8}}))
    A = torch.cat([b.mixer.A_log.exp() for b in model.blocks])
    dt = torch.cat([F.softplus(b.mixer.dt_bias) for b in model.blocks])
    assert A.shape == dt.shape == (64,)
    assert A.min() > 0 and A.max() < 16 and A.mean().item() == pytest.approx(8, abs=1.5)
    assert dt.min() >= 1e-3 * (1 - 1e-5) and dt.max() <= 1e-1 * (1 + 1e-5)
    # log-uniform: log Δ has mean (log 1e-3 + log 1e-1) / 2
    assert dt.log().mean().item() == pytest.approx((math.log(1e-3) + math.log(1e-1)) / 2, abs=0.5)
    no_decay = {id(p) for p in param_groups(model, 0.1)[1]["params"]}
    for block in model.blocks:
        assert id(block.mixer.A_log) in no_decay and id(block.mixer.dt_bias) in no_decay
        assert id(block.mixer.q_proj.weight) not in no_decay


def test_flops_per_token() -> None:
    D, H, K, V = 64, 2, 16, 32
    proj = 2 * D * (2 * H * K + H * V + 2 * H) + 2 * H * V * D
    gate = 2 * D * H * V
    conv = 2 * (2 * H * K + H * V) * 4
    at = lambda C, steps: H * (6 * C * K + 4 * C * V + 6 * K * V + steps * 4 * C * C)  # noqa: E731
    assert _mixer().flops_per_token(2048) == proj + gate + conv + at(32, 5)
    assert _mixer().flops_per_token(16) == proj + gate + conv + at(16, 4)
    assert _mixer(use_gate=False).flops_per_token(16) == proj + conv + at(16, 4)
    assert _mixer().flops_per_token(32) == _mixer().flops_per_token(65536)  # linear in T


def test_bad_options_raise() -> None:
    with pytest.raises(ConfigError, match="head_dim"):
        LM(_config(mixer_options={"gated_deltanet": {"head_dim": 8}}))
    with pytest.raises(ConfigError, match="expand_v"):
        LM(_config(mixer_options={"gated_deltanet": BASE | {"expand_v": 1.3}}))
    with pytest.raises(ConfigError, match="num_v_heads"):
        LM(_config(mixer_options={"gated_deltanet": BASE | {"num_v_heads": 3}}))
    with pytest.raises(ConfigError, match="conv_size"):
        _config(mixer_options={"gated_deltanet": {"conv_size": 0}})


def test_lm_trains_on_cpu() -> None:
    torch.manual_seed(0)
    assert_lm_learns(LM(_config(d_model=32, vocab_size=16, mixer_options={"gated_deltanet": BASE})), 16)


def test_hybrid_with_sliding_window_attention_trains_on_cpu() -> None:
    torch.manual_seed(0)
    cfg = _config(
        d_model=32, vocab_size=16, layer_mixers=["gated_deltanet", {"mixer": "swa", "window": 8}],
        mixer_options={"gated_deltanet": BASE},
    )  # fmt: skip
    model = LM(cfg)
    assert [b.mixer.name for b in model.blocks] == ["gated_deltanet", "swa"]
    assert_lm_learns(model, 16)
