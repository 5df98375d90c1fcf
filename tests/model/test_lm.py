"""The LM with softmax attention: shapes, gradients, causality, packed documents, cached decoding."""

import pytest
import torch
from helpers import generate_in_pieces

from lmstack.model import LM, BatchContext, ModelConfig


def tiny(**kw) -> LM:
    cfg = ModelConfig(vocab_size=97, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=128, **kw)
    cfg.validate()
    return LM(cfg).eval()


def test_forward_backward() -> None:
    model = tiny()
    ids = torch.randint(0, 97, (2, 24))
    logits, cache, _ = model(ids)
    assert logits.shape == (2, 24, 97) and cache is None
    torch.nn.functional.cross_entropy(logits.flatten(0, 1), ids.flatten()).backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_tied_and_untied_head() -> None:
    tied, untied = tiny(), tiny(tie_embeddings=False)
    assert tied.lm_head.weight is tied.embed.weight
    assert untied.lm_head.weight is not untied.embed.weight
    assert untied.num_params(non_embedding=False) - tied.num_params(non_embedding=False) == 97 * 64


def test_initialisation_scales_residual_projections() -> None:
    model = tiny()
    std = model.config.init_std
    o = model.blocks[0].mixer.o_proj.weight.std().item()
    q = model.blocks[0].mixer.q_proj.weight.std().item()
    assert abs(q - std) < 0.2 * std
    assert abs(o - std / 2.0) < 0.2 * std / 2.0  # 1/sqrt(2 * n_layers) with n_layers=2


def test_causality() -> None:
    model = tiny()
    ids = torch.randint(0, 97, (2, 32))
    changed = ids.clone()
    changed[:, 20:] = torch.randint(0, 97, (2, 12))
    a = model(ids).logits
    b = model(changed).logits
    torch.testing.assert_close(a[:, :20], b[:, :20], rtol=0, atol=1e-5)
    assert (a[:, 20:] - b[:, 20:]).abs().max() > 1e-3


@pytest.mark.parametrize("lengths", [[10, 22], [1, 15, 16], [32]])
def test_packed_documents_are_isolated(lengths: list[int]) -> None:
    model = tiny()
    docs = [torch.randint(0, 97, (1, n)) for n in lengths]
    packed = torch.cat(docs, dim=1)
    doc_ids = torch.cat([torch.full((1, n), i) for i, n in enumerate(lengths)], dim=1)
    logits = model(packed, BatchContext.from_doc_ids(doc_ids)).logits
    alone = torch.cat([model(d)[0] for d in docs], dim=1)
    assert (logits - alone).abs().max() < 1e-4


def test_context_from_cu_seqlens_round_trip() -> None:
    doc_ids = torch.tensor([[0, 0, 1, 1, 1], [5, 6, 6, 6, 7]])
    ctx = BatchContext.from_doc_ids(doc_ids)
    assert ctx.positions.tolist() == [[0, 1, 0, 1, 2], [0, 0, 1, 2, 0]]
    assert ctx.cu_seqlens.tolist() == list(ctx.cu_seqlens_host) == [0, 2, 5, 6, 9, 10]
    assert (ctx.max_seqlen, ctx.packed) == (3, True)
    assert ctx.first_piece.tolist() == [0, 2] and ctx.last_piece.tolist() == [1, 4]
    again = BatchContext.from_cu_seqlens(ctx.cu_seqlens, batch=2, seq_len=5)
    assert torch.equal(again.positions, ctx.positions)


def test_cached_decoding_matches_full_forward() -> None:
    model = tiny()
    ids = torch.randint(0, 97, (2, 40))
    full = model(ids).logits
    logits, cache = generate_in_pieces(model, ids, 17, 30)  # a chunk, single tokens, a chunk
    assert cache.seen_tokens == 40
    assert (logits - full).abs().max() < 1e-4


def test_flops_count_attention_by_hand() -> None:
    # D=64, H=4, H_kv=2, Dh=16, T=32, SwiGLU hidden 192, vocab 97, by hand:
    # q,k,v,o projections 2*64*(64+32+32) + 2*64*64 = 24576; QK^T and PV 2*2*4*16 * 16.5 = 4224.
    model = tiny()
    assert model.config.ffn_hidden == 192
    assert model.blocks[0].mixer.flops_per_token(32) == 24576 + 4224
    # 3 x (2 layers x (28800 + MLP 3*2*64*192) + LM head 2*64*97)
    assert model.flops_per_token(32) == 3 * (2 * (28800 + 73728) + 12416)
