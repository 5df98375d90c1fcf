"""`swa`: equal to softmax attention under an explicit window ∧ document mask (forward and gradients,
packed documents, GQA, odd lengths); the banded kernel equals causal attention when the window covers
T; the FlexAttention path equals the banded one; decoding with the rolling window equals the full
forward far beyond the window, chunked prefill included, in constant memory."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers import assert_rel_rmse

from lmstack.errors import ConfigError
from lmstack.model import LM, BatchContext, ModelConfig
from lmstack.model.mixers.swa import SlidingWindowAttention, SWAOptions, banded_attention
from lmstack.model.rotary import apply_rotary, rotary_cos_sin

D, H, HKV = 32, 4, 2


def packed_doc_ids(T: int) -> torch.Tensor:
    """Row 0: documents of T//3, 5 and the rest; row 1: one document."""
    a = T // 3
    return torch.tensor([[0] * a + [1] * 5 + [2] * (T - a - 5), [0] * T])


def reference(mixer: SlidingWindowAttention, x: torch.Tensor, doc_ids: torch.Tensor, window: int):
    """Softmax attention with an explicit [T, T] mask: same document (from doc_ids), s <= t, t - s < window."""
    B, T, _ = x.shape
    Dh = mixer.head_dim
    t = torch.arange(T)
    starts = torch.stack(
        [torch.searchsorted(row, row, right=False) for row in doc_ids]
    )  # first index of each doc
    positions = t - starts
    q = mixer.q_proj(x).view(B, T, H, Dh)
    k = mixer.k_proj(x).view(B, T, HKV, Dh)
    v = mixer.v_proj(x).view(B, T, HKV, Dh)
    cos, sin = rotary_cos_sin(positions, Dh, mixer.config.rope_theta, x.dtype)
    q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
    k, v = k.repeat_interleave(H // HKV, 2), v.repeat_interleave(H // HKV, 2)
    scores = torch.einsum("bthd,bshd->bhts", q, k) / Dh**0.5
    same_doc = doc_ids[:, :, None] == doc_ids[:, None, :]
    band = (t[:, None] >= t[None, :]) & (t[:, None] - t[None, :] < window)
    scores = scores.masked_fill(~(same_doc & band)[:, None], float("-inf"))
    y = torch.einsum("bhts,bshd->bthd", scores.softmax(-1), v)
    return mixer.o_proj(y.reshape(B, T, H * Dh))


def swa_layer(window: int, path: str = "blocked", seed: int = 0) -> SlidingWindowAttention:
    cfg = ModelConfig(d_model=D, n_heads=H, n_kv_heads=HKV, n_layers=1)
    torch.manual_seed(seed)
    return SlidingWindowAttention(cfg, 0, SWAOptions(window=window, path=path))


@pytest.mark.parametrize(("T", "window"), [(63, 1), (63, 5), (100, 16), (129, 70), (100, 100)])
def test_equals_masked_attention_forward_and_gradients(T: int, window: int) -> None:
    doc_ids = packed_doc_ids(T)
    results = []
    for use_reference in (False, True):
        mixer = swa_layer(window)
        torch.manual_seed(1)
        x = torch.randn(2, T, D, requires_grad=True)
        if use_reference:
            y = reference(mixer, x, doc_ids, window)
        else:
            y = mixer(x, BatchContext.from_doc_ids(doc_ids)).y
        (y * torch.randn_like(y)).sum().backward()
        results.append((y.detach(), x.grad, {n: p.grad for n, p in mixer.named_parameters()}))
    (y, dx, grads), (y_ref, dx_ref, grads_ref) = results
    assert_rel_rmse(y, y_ref, 1e-5, "y")
    assert_rel_rmse(dx, dx_ref, 1e-5, "dx")
    for name, grad in grads_ref.items():
        if window == 1 and name in ("q_proj.weight", "k_proj.weight"):  # one key per query: no scores
            scale = grads_ref["v_proj.weight"].abs().max()
            assert grad.abs().max() == 0 and grads[name].abs().max() < 1e-5 * scale, name
        else:
            assert_rel_rmse(grads[name], grad, 1e-5, f"d{name}")


@pytest.mark.parametrize("T", [63, 129])
def test_banded_kernel_is_causal_attention_when_the_window_covers_t(T: int) -> None:
    torch.manual_seed(0)
    q = torch.randn(2, T, H, 16, requires_grad=True)
    k, v = (torch.randn(2, T, HKV, 16, requires_grad=True) for _ in range(2))
    positions = torch.arange(T).expand(2, T)
    grad_out = torch.randn(2, T, H, 16)
    outs = []
    for banded in (True, False):
        if banded:
            y = banded_attention(q, k, v, positions, past=0, window=T)
        else:
            args = (t.transpose(1, 2) for t in (q, k, v))
            y = F.scaled_dot_product_attention(*args, is_causal=True, enable_gqa=True).transpose(1, 2)
        grads = torch.autograd.grad(y, (q, k, v), grad_out)
        outs.append((y.detach(), grads))
    assert_rel_rmse(outs[0][0], outs[1][0], 1e-5, "y")
    for name, a, b in zip("qkv", outs[0][1], outs[1][1]):
        assert_rel_rmse(a, b, 1e-5, f"d{name}")


@torch.no_grad()
def test_flex_path_equals_banded_path() -> None:
    """The GPU path (FlexAttention with the sliding-window ∧ document block mask, eager on CPU)."""
    doc_ids = packed_doc_ids(100)
    x = torch.randn(2, 100, D)
    ctx = BatchContext.from_doc_ids(doc_ids)
    y_flex = swa_layer(9, "flex")(x, ctx).y
    assert ("document_block_mask", 9, 0) in ctx._memo  # built once per batch, window and past, for all layers
    assert_rel_rmse(y_flex, swa_layer(9, "blocked")(x, ctx).y, 1e-5, "flex vs blocked")


def lm(window: int) -> LM:
    layers = [{"mixer": "swa", "window": window}, "shortconv", {"mixer": "swa", "window": window + 3}]
    cfg = ModelConfig(vocab_size=53, d_model=D, n_heads=H, n_kv_heads=HKV, n_layers=3, layer_mixers=layers)
    cfg.validate()
    torch.manual_seed(0)
    return LM(cfg).eval()


def state_bytes(cache) -> int:
    states = [s for s in cache.states if hasattr(s, "k")]
    return sum(t.untyped_storage().nbytes() for s in states for t in (s.k, s.v))


@torch.no_grad()
def test_decoding_beyond_the_window_equals_full_forward_in_constant_memory() -> None:
    window, T = 6, 60
    model = lm(window)
    ids = torch.randint(0, 53, (2, T))
    full = model(ids).logits
    # Chunks of several sizes (a prefill longer than the window, single steps, chunks shorter than it).
    sizes = [9, 1, 1, 2, 13, 1, 4] + [1] * (T - 31)
    logits, cache, memory = [], None, []
    start = 0
    for size in sizes:
        out = model(ids[:, start : start + size], cache=cache, use_cache=True)
        logits.append(out.logits)
        cache, start = out.cache, start + size
        memory.append(state_bytes(cache))
    assert start == T
    assert_rel_rmse(torch.cat(logits, 1), full, 1e-5, "chunked decoding")
    # Two swa layers keep window - 1 and window + 2 keys and values: [2, W-1, 2, 8] fp32 each.
    expected = 2 * (2 * (window - 1) * HKV * 8 * 4) + 2 * (2 * (window + 2) * HKV * 8 * 4)
    assert memory == [expected] * len(sizes)


@torch.no_grad()
def test_packed_prefill_then_decoding_masks_the_previous_document() -> None:
    """A prefill whose last document starts 2 tokens before its end: decoding steps must not see the
    previous document's keys still in the rolling window."""
    window = 8
    model = lm(window)
    doc_ids = torch.tensor([[0] * 10 + [1] * 2 + [1] * 5])  # prefill 12 tokens, then 5 decoding steps
    ids = torch.randint(0, 53, (1, 17))
    full = model(ids, BatchContext.from_doc_ids(doc_ids)).logits
    out = model(ids[:, :12], BatchContext.for_slice(doc_ids, 0, 12), use_cache=True)
    logits, cache = [out.logits], out.cache
    for t in range(12, 17):
        out = model(ids[:, t : t + 1], BatchContext.for_slice(doc_ids, t, t + 1), cache=cache, use_cache=True)
        logits.append(out.logits)
        cache = out.cache
    assert_rel_rmse(torch.cat(logits, 1), full, 1e-5, "packed prefill + decoding")


def test_window_must_be_positive() -> None:
    cfg = ModelConfig(
        d_model=32, n_heads=4, n_layers=2, layer_mixers=["attention", {"mixer": "swa", "window": 0}]
    )
    with pytest.raises(ConfigError, match=r"^model\.layer_mixers\[1\]\.window: expected a positive number"):
        cfg.validate("model.")
