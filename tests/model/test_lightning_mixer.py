"""The `lightning` mixer: decoding with an O(1) state, packed documents, decay slopes, FLOPs, a tiny
LM that trains on CPU, and the model importing where triton is absent."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from helpers import assert_lm_learns, assert_rel_rmse

from lmstack.errors import ConfigError
from lmstack.export.exporter import export_model
from lmstack.model.config import ModelConfig
from lmstack.model.lm import LM
from lmstack.model.mixers import get_mixer
from lmstack.model.mixers.base import BatchContext
from lmstack.model.mixers.lightning import LightningState, alibi_slopes, decay_slopes


def _config(**kw) -> ModelConfig:
    base = dict(vocab_size=40, d_model=64, n_layers=2, n_heads=2, mixer="lightning", max_seq_len=128)
    cfg = ModelConfig(**(base | kw))
    cfg.validate()
    return cfg


def _mixer(layer_idx: int = 0, **options):
    cfg = _config(mixer_options={"lightning": options})
    mixer = get_mixer("lightning")(cfg, layer_idx, cfg.mixer_options_for("lightning"))
    if mixer.norm_weight is not None:  # not all ones, so that a mix-up of heads would show
        torch.nn.init.normal_(mixer.norm_weight, 1.0, 0.1)
    return mixer.eval()


def _ctx(x: torch.Tensor, doc_ids: torch.Tensor | None = None, offset: int = 0) -> BatchContext:
    """Context of x: [B, T, D]: one document per row (continuing after `offset` tokens), or packed."""
    if doc_ids is None:
        return BatchContext.for_rows(x.shape[0], x.shape[1], offset=offset)
    return BatchContext.from_doc_ids(doc_ids, offsets=[offset] * x.shape[0])


OPTIONS = [{}, {"norm": "srms", "gate": "identity", "qk_activation": "identity"}, {"gate": "silu"}]


@pytest.mark.parametrize("options", OPTIONS)
@torch.no_grad()
def test_cached_decoding_equals_full_forward(options: dict) -> None:
    mixer = _mixer(1, **options)
    x = torch.randn(2, 37, 64)
    full, none, _ = mixer(x, _ctx(x))
    assert none is None
    y, state, _ = mixer(
        x[:, :10], _ctx(x[:, :10]), use_cache=True
    )  # prefill a chunk, then one token at a time
    outs = [y]
    for t in range(10, 37):
        y, state, _ = mixer(x[:, t : t + 1], _ctx(x[:, :1], offset=t), state=state, use_cache=True)
        outs.append(y)
    assert isinstance(state, LightningState) and state.kv.shape == (2, 2, 32, 32)
    assert state.kv.dtype == torch.float32
    assert (torch.cat(outs, 1) - full).abs().max().item() < 1e-4


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
    assert cache.seen_tokens == 30
    assert (torch.cat(outs, 1) - full).abs().max().item() < 1e-4


@torch.no_grad()
def test_packed_documents_are_isolated() -> None:
    mixer = _mixer()
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
    mixer = _mixer()
    x = torch.randn(2, 30, 64)
    prefix = torch.randn(2, 12, 64)
    _, state, _ = mixer(prefix, _ctx(prefix), use_cache=True)
    doc_ids = torch.tensor([[0] * 20 + [1] * 10, [0] * 30])
    y, new_state, _ = mixer(x, _ctx(x, doc_ids, offset=12), state=state, use_cache=True)
    cont, cont_state, _ = mixer(x[:, :20], _ctx(x[:, :20], offset=12), state=state, use_cache=True)
    assert_rel_rmse(y[:, :20], cont, 1e-5, "first document continues the state")
    fresh, fresh_state, _ = mixer(x[:1, 20:], _ctx(x[:1, 20:]), use_cache=True)
    assert_rel_rmse(y[:1, 20:], fresh, 1e-5, "second document starts from zero")
    assert_rel_rmse(new_state.kv[:1], fresh_state.kv, 1e-5, "row 0 state")
    whole, whole_state, _ = mixer(
        x[1:], _ctx(x[1:], offset=12), state=LightningState(state.kv[1:]), use_cache=True
    )
    assert_rel_rmse(new_state.kv[1:], whole_state.kv, 1e-5, "row 1 state")


def test_triton_backend_matches_torch_backend() -> None:
    """The mixer through the Triton kernels (interpreter on CPU) and through the chunked path,
    forward and backward, with packed documents."""
    torch.manual_seed(1)
    x = torch.randn(2, 40, 64)
    ctx = _ctx(x, torch.tensor([[0] * 25 + [1] * 15, [0] * 40]))
    results = []
    for backend in ("triton", "torch"):
        torch.manual_seed(0)
        mixer = _mixer(backend=backend)
        xi = x.clone().requires_grad_()
        y = mixer(xi, ctx).y
        y.pow(2).sum().backward()
        results.append((y.detach(), xi.grad, mixer.q_proj.weight.grad, mixer.k_proj.weight.grad))
    for name, a, b in zip(("y", "dx", "dWq", "dWk"), *results):
        assert_rel_rmse(a, b, 1e-5, name)


def test_decay_slopes() -> None:
    assert alibi_slopes(8) == pytest.approx([2.0**-i for i in range(1, 9)])
    assert alibi_slopes(4) == pytest.approx([2.0**-2, 2.0**-4, 2.0**-6, 2.0**-8])
    six = alibi_slopes(6)  # not a power of two: ALiBi's interleaved extension
    assert len(six) == 6 and six[:4] == alibi_slopes(4) and six[4:] == alibi_slopes(8)[0:4:2]
    first, last = decay_slopes(4, 0, 12), decay_slopes(4, 11, 12)
    assert first == pytest.approx([s * (1 + 1e-5) for s in alibi_slopes(4)])
    assert last == pytest.approx([s * 1e-5 for s in alibi_slopes(4)])  # the last layer barely decays
    assert decay_slopes(4, 0, 1) == alibi_slopes(4)
    assert decay_slopes(4, 5, 12, depth_scaling=False) == alibi_slopes(4)
    mixer = _mixer(1)  # layer 1 of 2: nearly no decay
    assert all(-1e-5 < d < 0 for d in mixer.log_decay)


def test_flops_per_token() -> None:
    mixer = _mixer()
    D, H, Dh = 64, 2, 32
    proj = 2 * D * 4 * H * Dh + 2 * H * Dh * D
    assert mixer.flops_per_token(2048) == proj + H * (4 * 64 * Dh + 4 * Dh * Dh)
    assert mixer.flops_per_token(16) == proj + H * (4 * 16 * Dh + 4 * Dh * Dh)
    # Linear attention: the per-token cost stops growing with the sequence length.
    assert mixer.flops_per_token(64) == mixer.flops_per_token(65536)


def test_bad_head_dim_and_options_raise() -> None:
    with pytest.raises(ConfigError, match="head_dim"):
        LM(_config(d_model=32, n_heads=4))  # head_dim 8
    with pytest.raises(ConfigError, match="gate"):
        _config(mixer_options={"lightning": {"gate": "tanh"}})


def test_lm_trains_on_cpu() -> None:
    torch.manual_seed(0)
    assert_lm_learns(LM(_config(d_model=32, vocab_size=16)), 16)


def test_model_runs_without_triton() -> None:
    """Exported models load where only torch (+ transformers) is installed."""
    code = (
        "import sys; sys.modules['triton'] = None\n"
        "import torch\n"
        "from lmstack.model.config import ModelConfig\n"
        "from lmstack.model.lm import LM\n"
        "cfg = ModelConfig(vocab_size=40, d_model=32, n_layers=2, n_heads=2, mixer='lightning')\n"
        "logits = LM(cfg)(torch.randint(0, 40, (1, 9))).logits\n"
        "assert logits.shape == (1, 9, 40)\n"
        "from lmstack_kernels.lightning import triton_kernels\n"
        "assert not triton_kernels.HAS_TRITON\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_export_reload_and_generate_without_triton(tmp_path) -> None:
    """Export a lightning LM, reload it through AutoModelForCausalLM in a process where triton,
    lmstack and lmstack_kernels cannot be imported, and generate greedily like the source model."""
    torch.manual_seed(0)
    model = LM(_config(d_model=32)).eval()
    export_model(model, tmp_path / "hf")
    prompt = torch.randint(0, 40, (2, 6))
    with torch.no_grad():  # greedy decoding with the mixer's recurrent state
        logits, cache, _ = model(prompt, use_cache=True)
        ids = prompt
        for _ in range(8):
            nxt = logits[:, -1:].argmax(-1)
            ids = torch.cat([ids, nxt], 1)
            logits, cache, _ = model(nxt, cache=cache, use_cache=True)
    code = (
        "import sys, json\n"
        "for name in ('triton', 'lmstack', 'lmstack_kernels'): sys.modules[name] = None\n"
        "import torch\n"
        "from transformers import AutoModelForCausalLM\n"
        f"m = AutoModelForCausalLM.from_pretrained({str(tmp_path / 'hf')!r}, trust_remote_code=True).eval()\n"
        f"out = m.generate(torch.tensor({prompt.tolist()}), max_new_tokens=8, do_sample=False)\n"
        "print(json.dumps(out.tolist()))\n"
    )
    run = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=tmp_path
    )
    assert run.returncode == 0, run.stderr[-3000:]
    assert json.loads(run.stdout.strip().splitlines()[-1]) == ids.tolist()
