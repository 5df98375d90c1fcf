"""The `lightning` mixer: decoding with an O(1) state, packed documents, decay slopes, FLOPs, a tiny
LM that trains on CPU, and the model importing where triton is absent."""

from __future__ import annotations

import json
import subprocess
import sys

import mixer_checks as checks
import pytest
import torch
from helpers import assert_lm_learns

from lmstack.errors import ConfigError
from lmstack.export.exporter import export_model
from lmstack.model.config import ModelConfig
from lmstack.model.lm import LM
from lmstack.model.mixers import get_mixer
from lmstack.model.mixers.lightning import LightningState, alibi_slopes, decay_slopes


def _config(**kw) -> ModelConfig:
    return checks.mixer_config("lightning", **kw)


def _mixer(layer_idx: int = 0, **options):
    cfg = _config(mixer_options={"lightning": options})
    mixer = get_mixer("lightning")(cfg, layer_idx, cfg.mixer_options_for("lightning"))
    if mixer.norm_weight is not None:  # not all ones, so that a mix-up of heads would show
        torch.nn.init.normal_(mixer.norm_weight, 1.0, 0.1)
    return mixer.eval()


OPTIONS = [{}, {"norm": "srms", "gate": "identity", "qk_activation": "identity"}, {"gate": "silu"}]


@pytest.mark.parametrize("options", OPTIONS)
@torch.no_grad()
def test_cached_decoding_equals_full_forward(options: dict) -> None:
    mixer = _mixer(1, **options)
    x = torch.randn(2, 37, 64)
    full, none, _ = mixer(x, checks.context(x))
    assert none is None
    decoded, state = checks.decode_in_pieces(mixer, x, 10, 37)  # prefill a chunk, then one token at a time
    assert isinstance(state, LightningState) and state.kv.shape == (2, 2, 32, 32)
    assert state.kv.dtype == torch.float32
    assert (decoded - full).abs().max().item() < 1e-4


def test_lm_generation_cache_equals_full_forward() -> None:
    checks.assert_generation_cache_equals_full_forward(LM(_config()).eval())


@torch.no_grad()
def test_packed_documents_are_isolated() -> None:
    checks.assert_packed_documents_are_isolated(_mixer(), {"kv": 1e-5})


@torch.no_grad()
def test_state_continues_only_into_first_document() -> None:
    checks.assert_state_continues_only_into_first_document(_mixer(), {"kv": 1e-5})


def test_triton_backend_matches_torch_backend() -> None:
    checks.assert_triton_matches_torch(
        lambda backend: _mixer(backend=backend), ("q_proj.weight", "k_proj.weight")
    )


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
