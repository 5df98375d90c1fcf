"""`moh`: with a uniform router and every routed head in, MoH is multi-head attention with head i's
output scaled by α/h of its group; with a trained router each token's output is the weighted sum of
exactly its shared and top-k heads; the balancing loss matches its formula and trains the router."""

from __future__ import annotations

import pytest
import torch
from helpers import assert_rel_rmse

from lmstack.errors import ConfigError
from lmstack.model import BatchContext, ModelConfig
from lmstack.model.mixers.attention import Attention, AttentionOptions
from lmstack.model.mixers.moh import MixtureOfHeadAttention, MoHOptions

D, H, HKV, DH = 48, 6, 3, 8
CFG = ModelConfig(d_model=D, n_heads=H, n_kv_heads=HKV, n_layers=1)
DOC_IDS = torch.tensor([[0] * 40 + [1] * 23, [0] * 63])


def moh_layer(shared: int, top_k: int) -> MixtureOfHeadAttention:
    torch.manual_seed(0)
    return MixtureOfHeadAttention(CFG, 0, MoHOptions(shared_heads=shared, top_k=top_k))


def head_outputs(layer: MixtureOfHeadAttention, x: torch.Tensor, ctx: BatchContext) -> torch.Tensor:
    """Each head's output projected by its own slice of W_o: [B, T, H, D] (from `attention`'s heads)."""
    heads, _ = layer._heads(x, ctx, None, False)  # [B, T, H, Dh]
    w_o = layer.o_proj.weight.view(D, H, DH)
    return torch.einsum("bthd,ehd->bthe", heads, w_o)


def test_uniform_router_with_every_head_routed_is_scaled_multi_head_attention() -> None:
    """Router weights 0 and top_k = all routed heads: g = 1/2 · 1/h_s for a shared head and 1/2 · 1/h_r
    for a routed one, so MoH = multi-head attention with W_o's head columns scaled by those."""
    shared, routed = 2, 4
    layer = moh_layer(shared, routed)
    with torch.no_grad():
        layer.router.weight.zero_()
    mha = Attention(CFG, 0, AttentionOptions())
    mha.load_state_dict({k: v for k, v in layer.state_dict().items() if not k.startswith("router")})
    scale = torch.tensor([0.5 / shared] * shared + [0.5 / routed] * routed)
    with torch.no_grad():
        mha.o_proj.weight.view(D, H, DH).mul_(scale[None, :, None])
    x = torch.randn(2, 63, D, requires_grad=True)
    ctx = BatchContext.from_doc_ids(DOC_IDS)
    out = layer(x, ctx)
    (dx,) = torch.autograd.grad(out.y.sum(), x)
    y_ref = mha(x, ctx).y
    (dx_ref,) = torch.autograd.grad(y_ref.sum(), x)
    assert_rel_rmse(out.y, y_ref, 1e-6, "y")
    assert_rel_rmse(dx, dx_ref, 1e-5, "dx")
    assert out.aux["moh_active_heads"].item() == 1.0


@pytest.mark.parametrize(("shared", "top_k"), [(3, 1), (1, 2), (2, 3)])
def test_each_token_uses_its_shared_and_top_k_heads_only(shared: int, top_k: int) -> None:
    layer = moh_layer(shared, top_k)
    with torch.no_grad():
        layer.router.weight.normal_(0, 1.0)
    x = torch.randn(2, 63, D)
    ctx = BatchContext.from_doc_ids(DOC_IDS)
    with torch.no_grad():
        out = layer(x, ctx)
        per_head = head_outputs(layer, x, ctx)
        logits = layer.router(x)
    # The paper's weights, token by token.
    expected = torch.zeros_like(out.y)
    active = torch.zeros(2, 63, dtype=torch.long)
    for b in range(2):
        for t in range(63):
            s, r, g = logits[b, t, :shared], logits[b, t, shared:H], logits[b, t, H:]
            alpha, p = g.softmax(0), r.softmax(0)
            chosen = sorted(range(H - shared), key=lambda i: -r[i].item())[:top_k]
            weights = [alpha[0] * w for w in s.softmax(0)] + [alpha[1] * p[i] for i in chosen]
            heads = list(range(shared)) + [shared + i for i in chosen]
            expected[b, t] = sum(w * per_head[b, t, h] for w, h in zip(weights, heads))
            active[b, t] = len(heads)
    assert_rel_rmse(out.y, expected, 1e-5, "y")
    routing = layer.route(x)
    assert torch.equal((routing.weights > 0).sum(-1), active) and bool((active == shared + top_k).all())
    assert out.aux["moh_active_heads"].item() == pytest.approx((shared + top_k) / H, abs=1e-6)


def test_balance_loss_matches_its_formula_and_trains_the_router() -> None:
    layer = moh_layer(2, 2)
    with torch.no_grad():
        layer.router.weight.normal_(0, 0.5)
    x = torch.randn(2, 63, D)
    out = layer(x, BatchContext.from_doc_ids(DOC_IDS))
    logits = layer.router(x).detach()[..., 2:H].reshape(-1, 4)
    top = logits.topk(2, -1).indices
    f = torch.stack([(top == i).any(-1).float().mean() for i in range(4)])
    expected = (f * logits.softmax(-1).mean(0)).sum()
    assert out.aux["moh_balance"].item() == pytest.approx(expected.item(), rel=1e-6)
    assert out.aux["moh_max_load"].item() == pytest.approx(f.max().item() * 4 / 2, rel=1e-6)
    (grad,) = torch.autograd.grad(out.aux["moh_balance"], layer.router.weight)
    routed_rows = grad[2:H]
    assert routed_rows.abs().sum() > 0  # the loss reaches the routed logits
    assert grad[:2].abs().sum() == 0 and grad[H:].abs().sum() == 0  # and nothing else
    assert set(type(layer).aux_losses) == {"moh_balance"}  # the statistics are not losses


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        (
            {"mixer": "moh", "shared_heads": 6},
            r"model\.layer_mixers\[0\]\.shared_heads: expected 1 \.\. n_heads - 1",
        ),
        (
            {"mixer": "moh", "top_k": 4},
            r"model\.layer_mixers\[0\]\.top_k: expected 1 \.\. 3 \(the routed heads\)",
        ),
    ],
)
def test_head_counts_are_checked(entry, message) -> None:
    cfg = ModelConfig(d_model=D, n_heads=H, n_layers=1, layer_mixers=[entry])
    with pytest.raises(ConfigError, match=message):
        cfg.validate("model.")
