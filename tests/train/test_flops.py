"""MFU's FLOPs: each mixer's own count matches a hand count for a small config, and the LM sums them.

Conventions: 2 FLOPs per multiply-add; forward only for mixers; the LM's training count is
3 x forward (backward = 2 x forward). Small config: D=64, H=4 heads of Dh=16, 2 KV heads for
attention, SwiGLU hidden F=192, vocabulary V=128, T=16.
"""

from __future__ import annotations

import pytest
import torch

from lmstack.model import LM, MIXERS, ModelConfig

D, H, Dh, Hkv, F, V, T = 64, 4, 16, 2, 192, 128, 16


def small_config(mixer: str, **extra) -> ModelConfig:
    cfg = dict(vocab_size=V, d_model=D, n_layers=2, n_heads=H, mlp_hidden=F, max_seq_len=64, mixer=mixer)
    cfg.update(extra)
    return ModelConfig.from_dict(cfg)


# Hand counts of one mixer layer, forward, per token, for the small config at T=16.
HAND = {
    # q: 2*64*64, k and v: 2*64*(2*16) each, o: 2*64*64 -> 8192 + 4096 + 4096 + 8192 = 24576.
    # Causal scores: token t sees t+1 keys, (16+1)/2 = 8.5 on average; QK^T and PV cost 2*Dh per
    # key and head each: 2 * 2*16 * 4 heads * 8.5 = 2176.
    "attention": 24576 + 2176,
    # q, k, v, u: 2*64*64 each = 32768; o: 8192. Chunked linear attention with chunk C = min(64, T) = 16:
    # intra-chunk QK^T and PV over the full C x C block, 2*C*Dh each per head: 4 * (2*16*16*2) = 4096;
    # q.S (inter-chunk) and k v^T (state update), 2*Dh*Dh each per head: 4 * (2*16*16*2) = 4096.
    "lightning": 32768 + 8192 + 4096 + 4096,
    # q, k, v: 2*64*192 = 24576; β: 2*64*4 = 512; o: 8192. Short conv of 4 taps on the 192 q/k/v
    # channels: 2*192*4 = 1536. Per head, chunk C = min(32, T) = 16: KK^T, QK^T, W, U0 and tril(QK^T)U,
    # 2*C*Dh each: 5 * 512 = 2560; WS, QS and K^T U, 2*Dh*Dh each: 3 * 512 = 1536; the UT transform,
    # log2(16) = 4 doubling steps of two C x C products: 4 * 2 * 2*16*16 = 4096 -> 4 * 8192 = 32768.
    "deltanet": 24576 + 512 + 8192 + 1536 + 32768,
    # Defaults: 4 q/k heads of K = 16, 4 value heads of V = 2*16 = 32 (expand_v 2), the output gate.
    # q, k: 2*64*64 each, 16384 both; v, g: 2*64*128 each, 32768 both; a, b: 2*64*4 each, 1024; o: 2*128*64 =
    # 16384. Short convs of 4 taps on the 64 + 64 + 128 q/k/v channels: 2*256*4 = 2048. Per value head,
    # chunk C = min(32, T) = 16: KK^T, QK^T, W (2*C*K each) 1536; U0, tril(QK^T)U (2*C*V each) 2048;
    # WS, QS, K^T U (2*K*V each) 3072; the UT transform, 4 doubling steps of 4*C*C: 4096 -> 4 * 10752.
    "gated_deltanet": 16384 + 32768 + 1024 + 16384 + 2048 + 4 * 10752,
    # depthwise kernel of 4 taps on 64 channels: 2*64*4 = 512.
    "shortconv": 512,
    # Keys 0.5*64 = 32 (K = 8 per head), values 64 (V = 16). q, k: 2*64*32 each = 8192; v, output gate
    # r, o: 2*64*64 each = 24576; low-rank gate 64 -> 16 -> 32: 2*64*16 + 2*16*32 = 3072.
    # Triton chunks of C = min(16, T) = 16 per head: scores 2*C*K = 256, times v 2*C*V = 512, q.S and
    # k v^T 2*K*V each = 512: 4 heads * 1280 = 5120.
    "gla": 8192 + 24576 + 3072 + 5120,
    # attention's projections; window 4: tokens 0..3 see 1..4 keys, the other 12 see 4, so
    # (1+2+3+4 + 12*4) / 16 = 3.625 keys on average: 2 * 2*16 * 4 heads * 3.625 = 928.
    "swa": 24576 + 928,
    # attention's count for all 4 heads (all are computed) + the router, 64 -> 2 shared + 2 routed + 2
    # group logits: 2*64*6 = 768.
    "moh": 24576 + 2176 + 768,
}
OPTIONS = {
    "attention": {"n_kv_heads": Hkv},
    "swa": {"n_kv_heads": Hkv, "mixer_options": {"swa": {"window": 4}}},
    "moh": {"n_kv_heads": Hkv},
}


def test_every_registered_mixer_has_a_hand_count():
    missing = sorted(set(MIXERS) - set(HAND))
    assert not missing, f"add a hand count for {missing} to HAND"


@pytest.mark.parametrize("name", sorted(HAND))
def test_mixer_flops_match_hand_count(name):
    model = LM(small_config(name, **OPTIONS.get(name, {})))
    for block in model.blocks:
        assert block.mixer.flops_per_token(T) == pytest.approx(HAND[name], rel=1e-12)
    # The LM: mixers + SwiGLU (3 matrices of 64x192: 2*3*64*192 = 73728) + LM head (2*64*128 = 16384),
    # times 3 for training.
    assert model.flops_per_token(T) == pytest.approx(3 * (16384 + 2 * (HAND[name] + 73728)), rel=1e-12)


def test_attention_projections_agree_with_torch_flop_counter():
    """torch's counter sees every linear layer of a forward (aten.mm); the causal score/value term,
    which the counter does not count the causal way (or at all, on some SDPA paths), is the hand part."""
    from torch.utils.flop_counter import FlopCounterMode

    model = LM(small_config("attention", n_kv_heads=Hkv))
    with FlopCounterMode(display=False) as counter:
        model(torch.randint(0, V, (1, T)))
    linear = sum(
        n for op, n in counter.get_flop_counts()["Global"].items() if "mm" in str(op) and "bmm" not in str(op)
    )
    causal_attention = 2 * 2176  # two layers, per token
    assert linear / T + causal_attention == pytest.approx(model.flops_per_token(T) / 3, rel=1e-12)


def test_linear_mixers_are_not_charged_the_softmax_formula():
    """At T=2048 softmax attention's T^2 term dominates; a linear mixer's count stays flat in T."""
    cfg = dict(d_model=1024, n_heads=16, n_layers=2, vocab_size=1000, max_seq_len=4096)
    soft = LM(ModelConfig.from_dict({**cfg, "mixer": "attention"})).blocks[0].mixer
    lin = LM(ModelConfig.from_dict({**cfg, "mixer": "lightning"})).blocks[0].mixer
    assert soft.flops_per_token(4096) > soft.flops_per_token(2048) * 1.2
    assert lin.flops_per_token(4096) == lin.flops_per_token(2048)
