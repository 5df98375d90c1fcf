"""FlexAttention compiled on the CPU (inductor's C++ template) with attention's block masks: packed
documents, a sliding window, and a sequence-parallel slice after the earlier slices' keys
(`document_block_mask(context, window, past)`), against SDPA with a mask built from the document
ids alone. Rows of 256 tokens, so the 128-token blocks include skipped, partial and full ones.

torch 2.13 has no FlexAttention backward on the CPU, eager or compiled ("FlexAttention does not
support backward on CPU"): the gradient check skips with that reason until torch adds one."""

from __future__ import annotations

import pytest
import torch
import torch._dynamo
import torch.nn.functional as F
from helpers import assert_rel_rmse, rel_rmse

from lmstack.model.mixers import BatchContext
from lmstack.model.mixers.attention import document_block_mask

B, H, T, DH = 2, 2, 256, 16
# (window, keys before the slice); 11-14 s of compile each (2 shared cores): two in CI.
CASES = [
    (None, 0),
    (40, 128),
    pytest.param(40, 0, marks=pytest.mark.slow),
    pytest.param(None, 128, marks=pytest.mark.slow),
]


def doc_ids() -> torch.Tensor:
    """Row 0: documents across both 128-token blocks and one inside the second; row 1: one document."""
    ids = torch.zeros(B, T, dtype=torch.long)
    ids[0, 100:] = 1
    ids[0, 150:] = 2
    return ids


def reference_mask(ids: torch.Tensor, window: int | None, past: int) -> torch.Tensor:
    """[B, 1, T - past, T]: query t sees key s iff s <= t, same document, and t - s < window."""
    distance = torch.arange(T)[:, None] - torch.arange(T)[None, :]
    mask = (distance >= 0) & (ids[:, :, None] == ids[:, None, :])
    if window is not None:
        mask &= distance < window
    return mask[:, None, past:]


def inputs(past: int, requires_grad: bool):
    q = torch.randn(B, H, T - past, DH, requires_grad=requires_grad)
    k, v = (torch.randn(B, H, T, DH, requires_grad=requires_grad) for _ in range(2))
    return q, k, v


def block_mask(window: int | None, past: int):
    ids = doc_ids()
    context = BatchContext.for_slice(ids, past, T) if past else BatchContext.from_doc_ids(ids)
    return document_block_mask(context, window, past)


def compiled_flex():
    from torch.nn.attention.flex_attention import flex_attention

    torch._dynamo.reset()
    return torch.compile(flex_attention, dynamic=False)


@pytest.mark.parametrize("window, past", CASES)
def test_compiled_flex_forward_equals_the_explicit_mask(window, past):
    q, k, v = inputs(past, requires_grad=False)
    mask = reference_mask(doc_ids(), window, past)
    want = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    got = compiled_flex()(q, k, v, block_mask=block_mask(window, past))
    assert_rel_rmse(got, want, 1e-5, f"window {window}, past {past}")
    # The masks matter: plain causal attention over the same keys is far off.
    causal = F.scaled_dot_product_attention(
        q, k, v, attn_mask=reference_mask(torch.zeros_like(doc_ids()), None, past)
    )
    assert rel_rmse(got, causal) > 0.1


@pytest.mark.parametrize("window, past", [(40, 0), (40, 128)])
def test_compiled_flex_backward_equals_the_explicit_mask(window, past):
    q, k, v = inputs(past, requires_grad=True)
    want = F.scaled_dot_product_attention(q, k, v, attn_mask=reference_mask(doc_ids(), window, past))
    want_grads = torch.autograd.grad(want.square().sum(), (q, k, v))
    try:
        got = compiled_flex()(q, k, v, block_mask=block_mask(window, past))
    except NotImplementedError as e:
        if "backward on CPU" not in str(e):
            raise
        pytest.skip("torch 2.13: FlexAttention has no CPU backward, eager or compiled")
    assert_rel_rmse(got, want, 1e-5, "output")
    for name, g, w in zip("qkv", torch.autograd.grad(got.square().sum(), (q, k, v)), want_grads):
        assert_rel_rmse(g, w, 1e-5, f"d{name}")
