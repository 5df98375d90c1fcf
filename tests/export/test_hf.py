"""LMStackForCausalLM in-process: forward/loss, generate() with lmstack's cache, padding, registration."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F
from export_helpers import hybrid_layers, tiny_model
from helpers import assert_rel_rmse

from lmstack.export.hf import LMStackCache, LMStackConfig, LMStackForCausalLM, register_auto_classes
from lmstack.model import LM, MIXERS

V = 97


def wrap(model: LM) -> LMStackForCausalLM:
    hf = LMStackForCausalLM(LMStackConfig.from_model_config(model.config))
    hf.model.load_state_dict(model.state_dict())
    return hf.eval()


@pytest.fixture(params=["attention", "hybrid"])
def hf_model(request) -> LMStackForCausalLM:
    layers = ["attention", "attention"] if request.param == "attention" else hybrid_layers()
    return wrap(tiny_model(V, layer_mixers=layers, n_layers=len(layers)))


def test_config_round_trip() -> None:
    model = tiny_model(V, tie_embeddings=False, rope_theta=500.0)
    config = LMStackConfig.from_model_config(model.config)
    assert config.hidden_size == 64 and config.num_hidden_layers == 2 and config.tie_word_embeddings is False
    again = LMStackConfig.from_dict(config.to_dict())
    assert again.to_model_config() == model.config


def test_forward_matches_lm_and_loss(hf_model: LMStackForCausalLM) -> None:
    ids = torch.randint(0, V, (2, 12))
    out = hf_model(ids, labels=ids)
    with torch.no_grad():
        reference = hf_model.model(ids)[0]
    assert (out.logits - reference).abs().max().item() == 0.0
    expected = F.cross_entropy(reference[:, :-1].reshape(-1, V), ids[:, 1:].reshape(-1))
    assert abs(out.loss.item() - expected.item()) < 1e-6
    out.loss.backward()
    assert hf_model.model.embed.weight.grad is not None and hf_model.model.embed.weight.grad.abs().sum() > 0
    # -100 labels are ignored
    labels = ids.clone()
    labels[:, :6] = -100
    partial = F.cross_entropy(reference[:, 5:-1].reshape(-1, V), ids[:, 6:].reshape(-1))
    assert abs(hf_model(ids, labels=labels).loss.item() - partial.item()) < 1e-6


def test_cached_greedy_generation_matches_full_forward(hf_model: LMStackForCausalLM) -> None:
    prompt = torch.randint(0, V, (2, 5))
    seen_lengths = []
    hook = hf_model.model.register_forward_pre_hook(
        lambda m, args, kwargs: seen_lengths.append(args[0].shape[1]), with_kwargs=True
    )
    try:
        out = hf_model.generate(
            prompt, max_new_tokens=8, do_sample=False, return_dict_in_generate=True, output_logits=True
        )
    finally:
        hook.remove()
    # The cache is really used: the prompt once, then one token per step.
    assert seen_lengths == [5] + [1] * 7
    seq = out.sequences
    assert seq.shape == (2, 13)
    with torch.no_grad():
        full = hf_model.model(seq)[0]
    step_logits = torch.stack(out.logits, dim=1)  # [B, new, V]
    assert (step_logits - full[:, 4:-1]).abs().max().item() < 1e-4
    assert torch.equal(full[:, 4:-1].argmax(-1), seq[:, 5:])


def test_sampling_with_and_without_cache_agree(hf_model: LMStackForCausalLM) -> None:
    prompt = torch.randint(0, V, (1, 4))
    runs = []
    for use_cache in (True, False):
        torch.manual_seed(123)
        runs.append(
            hf_model.generate(prompt, max_new_tokens=10, do_sample=True, top_k=20, use_cache=use_cache)
        )
    assert runs[0].shape == (1, 14)
    assert torch.equal(runs[0], runs[1])
    assert int(runs[0].max()) < V


def test_beam_search_reorders_opaque_states(hf_model: LMStackForCausalLM) -> None:
    prompt = torch.randint(0, V, (2, 4))
    cached = hf_model.generate(prompt, max_new_tokens=6, num_beams=3, do_sample=False)
    uncached = hf_model.generate(prompt, max_new_tokens=6, num_beams=3, do_sample=False, use_cache=False)
    assert torch.equal(cached, uncached)


def test_user_cache_continues_a_sequence(hf_model: LMStackForCausalLM) -> None:
    ids = torch.randint(0, V, (2, 10))
    cache = LMStackCache()
    with torch.no_grad():
        first = hf_model(ids[:, :6], past_key_values=cache, use_cache=True)
        second = hf_model(ids[:, 6:], past_key_values=first.past_key_values, use_cache=True)
        full = hf_model(ids, use_cache=False).logits
    assert cache.get_seq_length() == 10  # updated in place
    assert (torch.cat([first.logits, second.logits], 1) - full).abs().max().item() < 1e-4


def test_padding_without_cache_isolates_pads() -> None:
    hf = wrap(tiny_model(V))
    ids = torch.randint(0, V, (1, 7))
    padded = torch.cat([torch.zeros(1, 3, dtype=torch.long), ids], dim=1)
    mask = torch.cat([torch.zeros(1, 3, dtype=torch.long), torch.ones(1, 7, dtype=torch.long)], dim=1)
    with torch.no_grad():
        alone = hf(ids).logits
        left = hf(padded, attention_mask=mask).logits[:, 3:]
    assert (left - alone).abs().max().item() < 1e-4
    right = torch.flip(mask, [1])
    with pytest.raises(ValueError, match="left padding"):
        hf(padded, attention_mask=right, use_cache=True)


def left_padded(prompts: list[torch.Tensor], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    """([B, T] ids, [B, T] attention mask) with every prompt padded on the left to the longest."""
    T = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), T), pad, dtype=torch.long)
    mask = torch.zeros(len(prompts), T, dtype=torch.long)
    for row, p in enumerate(prompts):
        ids[row, T - len(p) :], mask[row, T - len(p) :] = p, 1
    return ids, mask


@pytest.mark.parametrize("mixer", sorted(MIXERS))
def test_batched_generation_with_left_padding_equals_one_at_a_time(mixer: str) -> None:
    """Every mixer's state (and the short convolution's, in the middle layer) ignores the pads, and
    each row decodes at its own position: batched greedy generation equals generating alone."""
    hf = wrap(tiny_model(V, layer_mixers=[mixer, "shortconv", mixer], n_layers=3, eos_token_id=None))
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(1, V, (n,), generator=g) for n in (5, 11, 1, 8)]
    ids, mask = left_padded(prompts, pad=0)
    settings = dict(max_new_tokens=7, do_sample=False, pad_token_id=0, output_scores=True)
    with torch.no_grad():
        batched = hf.generate(ids, attention_mask=mask, return_dict_in_generate=True, **settings)
        for row, prompt in enumerate(prompts):
            alone = hf.generate(prompt[None], return_dict_in_generate=True, **settings)
            assert (
                batched.sequences[row, ids.shape[1] :].tolist() == alone.sequences[0, len(prompt) :].tolist()
            )
            for step, (b, a) in enumerate(zip(batched.scores, alone.scores)):
                assert_rel_rmse(b[row], a[0], 1e-5, f"{mixer}: row {row}, step {step} logits")


def test_non_persistent_buffers_are_refilled_after_from_pretrained(tmp_path) -> None:
    from lmstack.model.mixers import MIXERS, register
    from lmstack.model.mixers.attention import Attention

    @dataclasses.dataclass
    class _Opts:
        pass

    class Buffered(Attention):
        Options = _Opts

        def __init__(self, config, layer_idx, options) -> None:
            super().__init__(config, layer_idx, options)
            self.register_buffer("table", torch.arange(8.0) + layer_idx, persistent=False)

    register("_test_buffered")(Buffered)
    try:
        model = tiny_model(V, mixer="_test_buffered")
        wrap(model).save_pretrained(tmp_path)
        loaded = LMStackForCausalLM.from_pretrained(tmp_path)
        for i, block in enumerate(loaded.model.blocks):
            assert torch.equal(block.mixer.table, torch.arange(8.0) + i)
    finally:
        del MIXERS["_test_buffered"]


def test_register_auto_classes_is_idempotent() -> None:
    from transformers import AutoConfig, AutoModelForCausalLM

    register_auto_classes()
    register_auto_classes()
    config = AutoConfig.for_model("lmstack", vocab_size=V, d_model=64, n_heads=4, n_layers=1)
    assert isinstance(config, LMStackConfig)
    assert isinstance(AutoModelForCausalLM.from_config(config), LMStackForCausalLM)


def test_cache_row_selection_moves_the_pad_counts_with_the_states() -> None:
    from lmstack.model.lm import LMCache

    cache = LMStackCache(LMCache([torch.arange(6.0).view(3, 2)], 5, torch.tensor([0, 2, 1])))
    cache.batch_select_indices(torch.tensor([2, 0]))
    assert cache.lm_cache.states[0].tolist() == [[4.0, 5.0], [0.0, 1.0]] and cache.lm_cache.pads.tolist() == [
        1,
        0,
    ]
    cache.reorder_cache(torch.tensor([1, 0]))
    assert cache.lm_cache.pads.tolist() == [0, 1] and cache.lm_cache.seen_tokens == 5
    cache.batch_repeat_interleave(2)
    assert cache.lm_cache.pads.tolist() == [0, 0, 1, 1] and cache.batch_size == 4
