"""Gated DeltaNet (the gated delta rule) in Triton: chunked forward and backward, fp32 accumulation.

DeltaNet's kernels (`lmstack_kernels.deltanet.triton_kernels`) with the decay: every program owns one
(sequence, head) pair and one tile of the state's V dimension and walks its sequence in blocks of
BT tokens (MATH.md). Per block, with a = cumsum(g) inside the block, D_ij = exp(a_i − a_j) on and
below the diagonal and r = exp(a_end − a):
- the UT transform T = (I + tril(diag(β) (K Kᵀ ⊙ D), -1))⁻¹ (DeltaNet's block doubling, fp32),
  W = T diag(β e^a) K and U = T diag(β) V − W S;
- o = scale · (diag(e^a) Q S + (Q Kᵀ ⊙ D) U), and S ← e^{a_end} S + (diag(r) K)ᵀ U.
Every exponent is ≤ 0 (masked entries are set to 0 before exp), so g = −20 per token underflows
harmlessly.

Kernels:
- `_fwd_kernel`  grid (N*H, V tiles): o and the final state; with STORE_STATES it instead writes the
  state entering every block (the backward's recomputation).
- `_bwd_kernel`  grid (N*H, V tiles): backward in time with the carry dS: dv and d(initial state)
  exactly, and this V tile's share of dq, dk, dβ and dg (summed over tiles afterwards).
Sequences are addressed through `cu_seqlens` over flattened tokens; rows past the end load
k = v = 0, β = 0 and g = 0 (identity transitions). Precision as DeltaNet's kernels: 16-bit tl.dot
operands on a GPU with 16-bit inputs, fp32 everywhere else (and always in the interpreter).
"""

from __future__ import annotations

import torch

from lmstack_kernels.common.triton_utils import HAS_TRITON, device_arch, interpreting, load_tile, tl, triton
from lmstack_kernels.deltanet.triton_kernels import _chunk_offsets, launch_configs

__all__ = ["GatedDeltaRuleFunction", "HAS_TRITON", "interpreting"]

if HAS_TRITON:
    from lmstack_kernels.deltanet.triton_kernels import _ut_transform

    @triton.jit
    def _block_decays(g, row, m_t, o_t, BT: tl.constexpr):
        """(a = cumsum(g), its block total a_end, D [BT, BT] = exp(a_i − a_j) for i ≥ j, else 0)."""
        b_g = tl.load(g + row, mask=m_t, other=0.0).to(tl.float32)
        b_a = tl.cumsum(b_g, 0)
        causal = o_t[:, None] >= o_t[None, :]
        b_d = tl.where(causal, tl.exp(tl.where(causal, b_a[:, None] - b_a[None, :], 0.0)), 0.0)
        # a_end is the cumsum's own last entry (padded rows add g = 0), not a separate sum: their
        # roundings differ by ~1 ulp of |a|, and r = exp(a_end − a) near 1 would carry that error.
        return b_a, tl.sum(tl.where(o_t == BT - 1, b_a, 0.0), 0), b_d

    @triton.jit
    def _fwd_kernel(
        q, k, v, beta, g, h0, o, ht, states, cu, chunk_offsets, scale,
        H: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
        BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
        USE_H0: tl.constexpr, STORE_O: tl.constexpr, STORE_HT: tl.constexpr,
        STORE_STATES: tl.constexpr, LOWP: tl.constexpr,
    ):  # fmt: skip
        i_nh, i_v = tl.program_id(0), tl.program_id(1)
        i_n, i_h = i_nh // H, i_nh % H
        bos = tl.load(cu + i_n).to(tl.int64)
        L = tl.load(cu + i_n + 1).to(tl.int64) - bos
        o_t = tl.arange(0, BT)
        o_k = tl.arange(0, BK)
        o_v = i_v * BV + tl.arange(0, BV)
        m_k, m_v = o_k < K, o_v < V
        m_kv = m_k[:, None] & m_v[None, :]
        p_kv = o_k[:, None] * V + o_v[None, :]
        b_h = tl.zeros([BK, BV], dtype=tl.float32)
        if USE_H0:
            b_h += tl.load(h0 + i_nh.to(tl.int64) * K * V + p_kv, mask=m_kv, other=0.0).to(tl.float32)
        if STORE_STATES:
            first_chunk = tl.load(chunk_offsets + i_n).to(tl.int64)
        for start in range(0, L, BT):
            m_t = o_t < L - start
            row = (bos + start + o_t) * H + i_h
            b_k = load_tile(k + row[:, None] * K + o_k[None, :], m_t[:, None] & m_k[None, :], LOWP)
            b_v = load_tile(v + row[:, None] * V + o_v[None, :], m_t[:, None] & m_v[None, :], LOWP)
            b_beta = tl.load(beta + row, mask=m_t, other=0.0).to(tl.float32)
            b_a, a_end, b_d = _block_decays(g, row, m_t, o_t, BT)
            if STORE_STATES:
                p_s = ((first_chunk + start // BT) * H + i_h) * K * V + p_kv
                tl.store(states + p_s, b_h, mask=m_kv)
            dt = b_k.dtype
            b_T = _ut_transform(tl.dot(b_k, tl.trans(b_k)) * b_d, b_beta, o_t, BT).to(dt)
            b_w = tl.dot(b_T, (b_k * (b_beta * tl.exp(b_a))[:, None]).to(dt))
            b_u = tl.dot(b_T, (b_v * b_beta[:, None]).to(dt))
            b_u -= tl.dot(b_w.to(dt), b_h.to(dt))
            if STORE_O:
                b_q = load_tile(q + row[:, None] * K + o_k[None, :], m_t[:, None] & m_k[None, :], LOWP)
                b_s = tl.dot(b_q, tl.trans(b_k)) * b_d * scale
                b_o = tl.dot(b_q, b_h.to(dt)) * (scale * tl.exp(b_a))[:, None]
                b_o += tl.dot(b_s.to(dt), b_u.to(dt))
                tl.store(
                    o + row[:, None] * V + o_v[None, :],
                    b_o.to(o.dtype.element_ty),
                    mask=m_t[:, None] & m_v[None, :],
                )
            b_kr = (b_k * tl.exp(a_end - b_a)[:, None]).to(dt)  # each key decayed to the block end
            b_h = b_h * tl.exp(a_end) + tl.dot(tl.trans(b_kr), b_u.to(dt))
        if STORE_HT:
            tl.store(ht + i_nh.to(tl.int64) * K * V + p_kv, b_h, mask=m_kv)

    @triton.jit
    def _bwd_kernel(
        q, k, v, beta, g, states, dht, do, dq, dk, dv, dbeta, dg, dh0, cu, chunk_offsets, scale, TT,
        H: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
        BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
        USE_DHT: tl.constexpr, STORE_DH0: tl.constexpr, LOWP: tl.constexpr,
    ):  # fmt: skip
        # Per block, backward in time (MATH.md, "Backward"); b_h is the state entering the block
        # (recomputed by the forward kernel), b_dh the gradient of the state at the block end.
        i_nh, i_v = tl.program_id(0), tl.program_id(1)
        i_n, i_h = i_nh // H, i_nh % H
        bos = tl.load(cu + i_n).to(tl.int64)
        L = tl.load(cu + i_n + 1).to(tl.int64) - bos
        first_chunk = tl.load(chunk_offsets + i_n).to(tl.int64)
        o_t = tl.arange(0, BT)
        o_k = tl.arange(0, BK)
        o_v = i_v * BV + tl.arange(0, BV)
        m_k, m_v = o_k < K, o_v < V
        m_kv = m_k[:, None] & m_v[None, :]
        p_kv = o_k[:, None] * V + o_v[None, :]
        strict = o_t[:, None] > o_t[None, :]
        share = i_v.to(tl.int64) * TT * H  # this V tile's slice of the dq, dk, dβ, dg shares
        b_dh = tl.zeros([BK, BV], dtype=tl.float32)
        if USE_DHT:
            b_dh += tl.load(dht + i_nh.to(tl.int64) * K * V + p_kv, mask=m_kv, other=0.0).to(tl.float32)
        nb = tl.cdiv(L, BT)
        for ib in range(0, nb):
            c = nb - 1 - ib
            start = c * BT
            m_t = o_t < L - start
            m_tk = m_t[:, None] & m_k[None, :]
            m_tv = m_t[:, None] & m_v[None, :]
            row = (bos + start + o_t) * H + i_h
            b_q = load_tile(q + row[:, None] * K + o_k[None, :], m_tk, LOWP)
            b_k = load_tile(k + row[:, None] * K + o_k[None, :], m_tk, LOWP)
            b_v = load_tile(v + row[:, None] * V + o_v[None, :], m_tv, LOWP)
            b_do = load_tile(do + row[:, None] * V + o_v[None, :], m_tv, LOWP)
            b_beta = tl.load(beta + row, mask=m_t, other=0.0).to(tl.float32)
            b_a, a_end, b_d = _block_decays(g, row, m_t, o_t, BT)
            b_h = tl.load(states + ((first_chunk + c) * H + i_h) * K * V + p_kv, mask=m_kv, other=0.0)
            dt = b_k.dtype
            b_gam = tl.exp(b_a)  # Γ: the decay from the block start
            b_r = tl.exp(a_end - b_a)  # r: the decay to the block end
            b_kkd = tl.dot(b_k, tl.trans(b_k)) * b_d
            b_T = _ut_transform(b_kkd, b_beta, o_t, BT)
            b_ks = tl.dot(b_k, b_h.to(dt))  # K S
            b_vt = b_v - b_ks * b_gam[:, None]  # Ṽ = V − diag(Γ) K S
            b_u = tl.dot(b_T.to(dt), (b_vt * b_beta[:, None]).to(dt))  # U = T diag(β) Ṽ
            b_qkd = tl.dot(b_q, tl.trans(b_k)) * b_d  # Q Kᵀ ⊙ D (zero above the diagonal)
            b_kdh = tl.dot(b_k, b_dh.to(dt))  # K dS'
            b_du = tl.dot(tl.trans(b_qkd * scale).to(dt), b_do.to(dt)) + b_kdh * b_r[:, None]
            b_dp = tl.dot(b_do.to(dt), tl.trans(b_u.to(dt))) * scale  # ∂/∂(Q Kᵀ ⊙ D), before masking
            b_dpd = b_dp * b_d
            b_dq = tl.dot(b_do.to(dt), tl.trans(b_h.to(dt))) * (scale * b_gam)[:, None]
            b_dq += tl.dot(b_dpd.to(dt), b_k)
            b_dk = tl.dot(tl.trans(b_dpd).to(dt), b_q)
            b_dk += tl.dot(b_u.to(dt), tl.trans(b_dh.to(dt))) * b_r[:, None]
            b_dx = tl.dot(tl.trans(b_T).to(dt), b_du.to(dt))  # dX, X = diag(β) Ṽ
            b_dvt = b_dx * b_beta[:, None]
            b_dk -= tl.dot(b_dvt.to(dt), tl.trans(b_h.to(dt))) * b_gam[:, None]
            b_gl = -tl.where(strict, tl.dot(b_dx.to(dt), tl.trans(b_u.to(dt))), 0.0)  # dL (this tile's)
            b_gbd = b_gl * b_d * b_beta[:, None]
            b_dk += tl.dot(b_gbd.to(dt), b_k) + tl.dot(tl.trans(b_gbd).to(dt), b_k)
            b_dbeta = tl.sum(b_dx * b_vt, 1) + tl.sum(b_gl * b_kkd, 1)
            # The log decays: through D (Z = ∂D ⊙ D), Γ, r and the block's total decay.
            b_z = tl.where(strict, b_gl * b_beta[:, None] * b_kkd, 0.0) + b_dp * b_qkd
            b_da = tl.sum(b_z, 1) - tl.sum(b_z, 0)
            b_dgam = tl.sum(b_do * tl.dot(b_q, b_h.to(dt)), 1) * scale - tl.sum(b_dvt * b_ks, 1)
            b_rdr = b_r * tl.sum(b_kdh * b_u, 1)
            b_da += b_gam * b_dgam - b_rdr
            da_end = tl.sum(b_rdr, 0) + tl.exp(a_end) * tl.sum(tl.sum(b_dh * b_h, 1), 0)
            # g_t enters every a_i with i ≥ t (and a_end): dg = reverse cumsum of da, plus da_end.
            b_dg = tl.sum(b_da, 0) - tl.cumsum(b_da, 0) + b_da + da_end
            tl.store(dv + row[:, None] * V + o_v[None, :], b_dvt.to(dv.dtype.element_ty), mask=m_tv)
            tl.store(dq + (share + row)[:, None] * K + o_k[None, :], b_dq, mask=m_tk)
            tl.store(dk + (share + row)[:, None] * K + o_k[None, :], b_dk, mask=m_tk)
            tl.store(dbeta + share + row, b_dbeta, mask=m_t)
            tl.store(dg + share + row, b_dg, mask=m_t)
            b_dh = b_dh * tl.exp(a_end)
            b_dh += tl.dot(tl.trans(b_q).to(dt), (b_do * (scale * b_gam)[:, None]).to(dt))
            b_dh -= tl.dot(tl.trans(b_k), (b_dvt * b_gam[:, None]).to(dt))
        if STORE_DH0:
            tl.store(dh0 + i_nh.to(tl.int64) * K * V + p_kv, b_dh, mask=m_kv)


def gated_delta_rule_fwd(q, k, v, beta, g, scale, h0, cu, output_final_state, BT, store_states=False):
    """q, k: [1, TT, H, K]; v: [1, TT, H, V]; beta, g: [1, TT, H] contiguous; h0: [N, H, K, V] fp32 or
    None; cu: [N+1] int32 on q's device. Returns (o like v or None, final state fp32 or None,
    (states [blocks, H, K, V] fp32 entering every block, block offsets) or Nones)."""
    _, TT, H, K = k.shape
    V = v.shape[-1]
    N = cu.numel() - 1
    lowp = k.dtype != torch.float32 and not interpreting()
    o = None if store_states else torch.empty_like(v)
    ht = k.new_empty(N, H, K, V, dtype=torch.float32) if output_final_state else None
    offsets, states = None, None
    if store_states:
        offsets, n_seq = _chunk_offsets(cu, BT)
        states = k.new_empty(TT // BT + n_seq, H, K, V, dtype=torch.float32)
    # DeltaNet's tiles and launch options: the same programs with one more per-token input (g)
    cfg = launch_configs(K, V, lowp, device_arch(k))["states" if store_states else "fwd"]
    _fwd_kernel[(N * H, triton.cdiv(V, cfg["BV"]))](
        q, k, v, beta, g, h0, o, ht, states, cu, offsets, scale, H=H, K=K, V=V, BT=BT,
        USE_H0=h0 is not None, STORE_O=not store_states, STORE_HT=output_final_state,
        STORE_STATES=store_states, LOWP=lowp, **cfg,
    )  # fmt: skip
    return o, ht, (states, offsets)


def gated_delta_rule_bwd(q, k, v, beta, g, scale, h0, cu, do, dht, need_dh0, BT):
    """Gradients (dq, dk, dv, dbeta, dg, dh0 or None) for `gated_delta_rule_fwd`; dht is the final
    state's gradient (or None)."""
    _, TT, H, K = k.shape
    V = v.shape[-1]
    N = cu.numel() - 1
    lowp = k.dtype != torch.float32 and not interpreting()
    _, _, (states, offsets) = gated_delta_rule_fwd(q, k, v, beta, g, scale, h0, cu, False, BT, True)
    cfg = launch_configs(K, V, lowp, device_arch(k))["bwd"]
    NV = triton.cdiv(V, cfg["BV"])
    dq = q.new_empty(NV, TT, H, K, dtype=torch.float32)
    dk = torch.empty_like(dq)
    dbeta = q.new_empty(NV, TT, H, dtype=torch.float32)
    dg = torch.empty_like(dbeta)
    dv = torch.empty_like(v)
    dh0 = q.new_empty(N, H, K, V, dtype=torch.float32) if need_dh0 else None
    _bwd_kernel[(N * H, NV)](
        q, k, v, beta, g, states, dht, do.contiguous(), dq, dk, dv, dbeta, dg, dh0, cu, offsets, scale,
        TT, H=H, K=K, V=V, BT=BT, USE_DHT=dht is not None, STORE_DH0=need_dh0, LOWP=lowp, **cfg,
    )  # fmt: skip
    sum_shares = lambda x, like: x.sum(0).to(like.dtype).view(like.shape)
    return sum_shares(dq, q), sum_shares(dk, k), dv, sum_shares(dbeta, beta), sum_shares(dg, g), dh0


class GatedDeltaRuleFunction(torch.autograd.Function):
    """Autograd wiring of the Triton kernels (inputs already validated, flattened to B = 1 and made
    contiguous by `gated_delta_rule_attn`)."""

    @staticmethod
    def forward(ctx, q, k, v, beta, g, scale, h0, cu, output_final_state, BT):
        o, ht, _ = gated_delta_rule_fwd(q, k, v, beta, g, scale, h0, cu, output_final_state, BT)
        ctx.save_for_backward(q, k, v, beta, g, h0, cu)
        ctx.scale, ctx.BT = scale, BT
        ctx.set_materialize_grads(False)  # an unused final state passes None, not a zero tensor
        return o, ht

    @staticmethod
    def backward(ctx, do, dht):
        q, k, v, beta, g, h0, cu = ctx.saved_tensors
        if do is None:
            do = torch.zeros_like(v)
        need_dh0 = h0 is not None and ctx.needs_input_grad[6]
        grads = gated_delta_rule_bwd(q, k, v, beta, g, ctx.scale, h0, cu, do, dht, need_dh0, ctx.BT)
        dq, dk, dv, dbeta, dg, dh0 = grads
        return dq, dk, dv, dbeta, dg, None, dh0, None, None, None
