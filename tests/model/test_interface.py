"""The mixer interface, for every registered mixer: a sequence run as two slices (state and
positions handed over, a document crossing the slice boundary, another starting exactly on it)
equals one pass, forward and gradients; the batch context; per-layer options; both attention paths."""

from __future__ import annotations

import pytest
import torch
from helpers import assert_rel_rmse

from lmstack.errors import ConfigError
from lmstack.model import LM, MIXERS, BatchContext, ModelConfig
from lmstack.model.mixers.attention import Attention, AttentionOptions

# Row 0: documents of 15, 20 and 5 tokens (the second crosses the cut at 24); row 1: 24 + 16 (the
# second starts exactly at the cut, so row 1 does not continue).
DOC_IDS = torch.tensor([[0] * 15 + [1] * 20 + [2] * 5, [0] * 24 + [1] * 16])
CUT = 24
# Options that make a mixer's own structure matter at this length (a window shorter than the slices).
OPTIONS = {"swa": {"window": 7}}


def _model(mixer: str, options: dict) -> LM:
    cfg = ModelConfig(
        vocab_size=61, d_model=64, n_layers=2, n_heads=2, mixer=mixer, max_seq_len=64,
        mixer_options={mixer: options},
    )  # fmt: skip
    cfg.validate()
    torch.manual_seed(0)
    return LM(cfg)


# Every mixer (with OPTIONS where given), plus option sets that add state of their own.
VARIANTS = [(name, OPTIONS.get(name, {})) for name in sorted(MIXERS)] + [("gla", {"use_short_conv": True})]


@pytest.mark.parametrize(("mixer", "options"), VARIANTS)
def test_two_slices_equal_one_pass(mixer: str, options: dict) -> None:
    ids = torch.randint(0, 61, DOC_IDS.shape)
    weights = torch.randn(*DOC_IDS.shape, 61)
    results = []
    for sliced in (False, True):
        model = _model(mixer, options)
        if sliced:
            first = model(ids[:, :CUT], BatchContext.for_slice(DOC_IDS, 0, CUT), use_cache=True)
            second = model(ids[:, CUT:], BatchContext.for_slice(DOC_IDS, CUT, 40), cache=first.cache)
            logits = torch.cat([first.logits, second.logits], 1)
        else:
            logits = model(ids, BatchContext.from_doc_ids(DOC_IDS)).logits
        (logits * weights).sum().backward()
        results.append((logits.detach(), {n: p.grad for n, p in model.named_parameters()}))
    (full, full_grads), (sliced, sliced_grads) = results
    assert_rel_rmse(sliced, full, 1e-5, f"{mixer} logits")
    for name, grad in full_grads.items():
        assert_rel_rmse(sliced_grads[name], grad, 1e-4, f"{mixer} d{name}")


def test_slice_context_continues_documents() -> None:
    ctx = BatchContext.for_slice(DOC_IDS, CUT, 40)
    assert ctx.continues_host == (True, False)
    assert ctx.positions[0].tolist() == list(range(9, 20)) + list(range(5))
    assert ctx.positions[1].tolist() == list(range(16))
    assert ctx.cu_seqlens_host == (0, 11, 16, 32) and ctx.packed and ctx.max_seqlen == 16
    assert ctx.first_piece.tolist() == [0, 2] and ctx.last_piece.tolist() == [1, 2]


def test_cu_seqlens_crossing_a_row_is_refused() -> None:
    with pytest.raises(ValueError, match="crosses the row boundary at token 5"):
        BatchContext.from_cu_seqlens(torch.tensor([0, 3, 7, 10]), batch=2, seq_len=5)
    ok = BatchContext.from_cu_seqlens(torch.tensor([0, 3, 5, 10]), batch=2, seq_len=5)
    assert ok.positions.tolist() == [[0, 1, 2, 0, 1], [0, 1, 2, 3, 4]]


@torch.no_grad()
def test_flex_and_mask_paths_agree() -> None:
    """The GPU path for packed documents (FlexAttention, here eager on CPU) equals the masked SDPA."""
    cfg = ModelConfig(vocab_size=61, d_model=64, n_layers=1, n_heads=4, n_kv_heads=2)
    x = torch.randn(*DOC_IDS.shape, 64)
    ctx = BatchContext.from_doc_ids(DOC_IDS)
    outs = []
    for path in ("flex", "mask"):
        torch.manual_seed(0)
        outs.append(Attention(cfg, 0, AttentionOptions(packed_path=path))(x, ctx).y)
    assert_rel_rmse(outs[0], outs[1], 1e-5, "flex vs mask")


def test_per_layer_options() -> None:
    layers = [
        {"mixer": "lightning", "gate": "silu"},
        "attention",
        {"mixer": "lightning", "norm": "srms"},
        {"mixer": "shortconv", "kernel_size": 2},
    ]
    cfg = ModelConfig(
        d_model=64,
        n_layers=4,
        n_heads=2,
        layer_mixers=layers,
        mixer_options={"lightning": {"gate": "identity"}},
    )
    cfg.validate()
    model = LM(cfg)
    opts = [b.mixer.options for b in model.blocks]
    assert (opts[0].gate, opts[0].norm) == ("silu", "head")  # the layer's own option wins
    assert (opts[2].gate, opts[2].norm) == ("identity", "srms")  # mixer_options fills the rest
    assert model.blocks[3].mixer.conv.kernel_size == 2


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        ({"mixer": "lightning", "gate": "tanh"}, "model.layer_mixers[1].gate: expected one of"),
        ({"mixer": "lightning", "gaet": "silu"}, "model.layer_mixers[1].gaet: unknown key; did you mean"),
        ({"gate": "silu"}, "model.layer_mixers[1].mixer: expected a mixer name"),
        ({"mixer": "lightnin"}, "model.layer_mixers[1]: unknown mixer 'lightnin'; did you mean 'lightning'?"),
    ],
)
def test_per_layer_option_errors_name_the_layer(entry, message) -> None:
    cfg = ModelConfig(d_model=64, n_layers=2, n_heads=2, layer_mixers=["attention", entry])
    with pytest.raises(
        ConfigError, match=message.replace("[", r"\[").replace("]", r"\]").replace("?", r"\?")
    ):
        cfg.validate("model.")


@pytest.mark.parametrize(
    ("layers", "shared", "message"),
    [
        # a check across the option and the model (GLA's key width, MoH's head split) names the entry
        # that set the value: the layer's own entry, else mixer_options.<name> (shared or default)
        (["attention", {"mixer": "gla", "expand_k": 0.3}], {}, "model.layer_mixers[1].expand_k: d_model"),
        (["attention", "gla"], {"gla": {"expand_k": 0.3}}, "model.mixer_options.gla.expand_k: d_model"),
        (["moh", {"mixer": "moh", "top_k": 9}], {}, "model.layer_mixers[1].top_k: expected 1 .. 2"),
        (
            [{"mixer": "moh", "shared_heads": 1}, "attention"],
            {"moh": {"top_k": 7}},
            "model.mixer_options.moh.top_k: expected 1 .. 3",
        ),
        (
            None,
            {"moh": {"shared_heads": 4}},
            "model.mixer_options.moh.shared_heads: expected 1 .. n_heads - 1",
        ),
    ],
)
def test_cross_field_option_errors_name_the_entry_that_set_the_value(layers, shared, message) -> None:
    cfg = ModelConfig(
        d_model=64, n_layers=2, n_heads=4, mixer="moh", layer_mixers=layers, mixer_options=shared
    )
    with pytest.raises(ConfigError) as err:
        cfg.validate("model.")
    assert str(err.value).startswith(message), str(err.value)
