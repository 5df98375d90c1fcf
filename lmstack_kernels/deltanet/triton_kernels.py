"""DeltaNet (the delta rule) in Triton: chunked forward and backward, fp32 accumulation.

Every program owns one (sequence, head) pair and one tile of the state's V dimension (the state
update S ← S + Kᵀ(U⁰ − W S) keeps V columns independent, so the [K, V-tile] state stays in
registers), and walks its sequence in blocks of BT tokens (Yang et al. 2024; MATH.md):
- per block, the UT transform T = (I + tril(diag(β) K Kᵀ, -1))⁻¹ by forward substitution in fp32,
  then W = T diag(β) K and U = T diag(β) V − W S, all matrix multiplies;
- o = scale · (Q S + tril(Q Kᵀ) U), and S ← S + Kᵀ U.

With the log decays g (USE_G, Gated DeltaNet: `lmstack_kernels.gated_deltanet`, its MATH.md), per
block, with a = cumsum(g) inside the block, D_ij = exp(a_i − a_j) on and below the diagonal and
r = exp(a_end − a): T = (I + tril(diag(β) (K Kᵀ ⊙ D), -1))⁻¹, W = T diag(β e^a) K,
o = scale · (diag(e^a) Q S + (Q Kᵀ ⊙ D) U) and S ← e^{a_end} S + (diag(r) K)ᵀ U. Every exponent is
≤ 0 (masked entries are set to 0 before exp), so g = −20 per token underflows harmlessly.

Kernels:
- `_fwd_kernel`  grid (N*H, V tiles): o and the final state, forward in time; with STORE_STATES it
  instead writes the state entering every block (the backward's recomputation).
- `_bwd_kernel`  grid (N*H, V tiles): backward in time with the carry dS (gradient of the state at the
  block end): dv and d(initial state) exactly, and this V tile's share of dq, dk, dβ (and dg) (they
  sum over V; the shares are added up afterwards).
Sequences are always addressed through `cu_seqlens` over flattened tokens (a dense batch is B equal
documents). Tails are masked: rows past the end load k = v = 0, β = 0 and g = 0, which leave the
state as it is, so partial blocks need no special case.

Inputs are loaded in their own dtype; on a GPU with 16-bit inputs the tl.dot operands are 16-bit
(fp32 accumulate), the UT transform and the carried states are always fp32; otherwise (fp32 inputs,
or the CPU interpreter, whose bf16 arithmetic is wrong) everything is computed in fp32.
"""

from __future__ import annotations

import torch

from lmstack_kernels.common.triton_utils import (
    HAS_TRITON,
    device_arch,
    interpreting,
    launch_opts,
    load_tile,
    pow2,
    tl,
    triton,
)

__all__ = ["DeltaRuleFunction", "HAS_TRITON", "interpreting"]

if HAS_TRITON:

    @triton.jit
    def _ut_transform(b_kk, b_beta, o_t, BT: tl.constexpr):
        """(I + tril(diag(β) K Kᵀ, -1))⁻¹ [BT, BT] in fp32 from the Gram matrix b_kk = K Kᵀ, by block
        doubling (MATH.md, "The UT transform"): with D the inverses of the diagonal blocks of size b,
        the blocks of size 2b are D − D C D, C the lower-left b-blocks of the matrix. Exact block
        forward substitution, log2(BT) steps of two matrix multiplies each, in IEEE fp32."""
        strict = o_t[:, None] > o_t[None, :]
        b_l = tl.where(strict, b_kk * b_beta[:, None], 0.0)
        b_d = (o_t[:, None] == o_t[None, :]).to(tl.float32)
        for s in tl.static_range(0, 8):
            if (1 << s) < BT:
                lower_left = ((o_t[:, None] >> (s + 1)) == (o_t[None, :] >> (s + 1))) & (
                    (o_t[:, None] >> s) != (o_t[None, :] >> s)
                )
                b_c = tl.where(lower_left & strict, b_l, 0.0)
                b_cd = tl.dot(b_c, b_d, input_precision="ieee")
                b_d -= tl.dot(b_d, b_cd, input_precision="ieee")
        return b_d

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
        USE_G: tl.constexpr, USE_H0: tl.constexpr, STORE_O: tl.constexpr, STORE_HT: tl.constexpr,
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
        causal = o_t[:, None] >= o_t[None, :]
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
            if STORE_STATES:
                p_s = ((first_chunk + start // BT) * H + i_h) * K * V + p_kv
                tl.store(states + p_s, b_h, mask=m_kv)
            dt = b_k.dtype
            b_kk = tl.dot(b_k, tl.trans(b_k))
            b_wk = b_k * b_beta[:, None]  # the keys W is made of: diag(β) K, gated diag(β e^a) K
            if USE_G:
                b_a, a_end, b_d = _block_decays(g, row, m_t, o_t, BT)
                b_kk = b_kk * b_d
                b_wk = b_wk * tl.exp(b_a)[:, None]
            b_T = _ut_transform(b_kk, b_beta, o_t, BT).to(dt)
            b_w = tl.dot(b_T, b_wk.to(dt))
            b_u = tl.dot(b_T, (b_v * b_beta[:, None]).to(dt))
            b_u -= tl.dot(b_w.to(dt), b_h.to(dt))
            if STORE_O:
                b_q = load_tile(q + row[:, None] * K + o_k[None, :], m_t[:, None] & m_k[None, :], LOWP)
                b_s = tl.dot(b_q, tl.trans(b_k)) * scale
                b_qh = tl.dot(b_q, b_h.to(dt)) * scale
                if USE_G:
                    b_s = b_s * b_d
                    b_qh = b_qh * tl.exp(b_a)[:, None]
                else:
                    b_s = tl.where(causal, b_s, 0.0)
                b_o = b_qh + tl.dot(b_s.to(dt), b_u.to(dt))
                tl.store(
                    o + row[:, None] * V + o_v[None, :],
                    b_o.to(o.dtype.element_ty),
                    mask=m_t[:, None] & m_v[None, :],
                )
            if USE_G:
                b_kr = (b_k * tl.exp(a_end - b_a)[:, None]).to(dt)  # each key decayed to the block end
                b_h = b_h * tl.exp(a_end) + tl.dot(tl.trans(b_kr), b_u.to(dt))
            else:
                b_h += tl.dot(tl.trans(b_k), b_u.to(dt))
        if STORE_HT:
            tl.store(ht + i_nh.to(tl.int64) * K * V + p_kv, b_h, mask=m_kv)

    @triton.jit
    def _bwd_kernel(
        q, k, v, beta, g, states, dht, do, dq, dk, dv, dbeta, dg, dh0, cu, chunk_offsets, scale, TT,
        H: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
        BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
        USE_G: tl.constexpr, USE_DHT: tl.constexpr, STORE_DH0: tl.constexpr, LOWP: tl.constexpr,
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
        causal = o_t[:, None] >= o_t[None, :]
        strict = o_t[:, None] > o_t[None, :]
        share = i_v.to(tl.int64) * TT * H  # this V tile's slice of the dq, dk, dβ (and dg) shares
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
            b_h = tl.load(states + ((first_chunk + c) * H + i_h) * K * V + p_kv, mask=m_kv, other=0.0)
            dt = b_k.dtype
            # Gated, with Γ = e^a the decay from the block start and r = e^{a_end − a} to its end:
            # the Gram matrices take ⊙ D, K S the rows Γ, K dS' the rows r (MATH.md of gated_deltanet).
            b_kk = tl.dot(b_k, tl.trans(b_k))
            b_qk = tl.dot(b_q, tl.trans(b_k))  # [i, j]
            b_ks = tl.dot(b_k, b_h.to(dt))  # K S
            b_kdh = tl.dot(b_k, b_dh.to(dt))  # K dS'
            if USE_G:
                b_a, a_end, b_d = _block_decays(g, row, m_t, o_t, BT)
                b_gam, b_r = tl.exp(b_a), tl.exp(a_end - b_a)
                b_kk, b_qk = b_kk * b_d, b_qk * b_d
                b_vt = b_v - b_ks * b_gam[:, None]  # Ṽ = V − diag(Γ) K S
                b_kdh = b_kdh * b_r[:, None]
            else:
                b_qk = tl.where(causal, b_qk, 0.0)
                b_vt = b_v - b_ks  # Ṽ = V − K S: what the keys do not yet recall
            b_T = _ut_transform(b_kk, b_beta, o_t, BT)
            b_u = tl.dot(b_T.to(dt), (b_vt * b_beta[:, None]).to(dt))  # U = T diag(β) Ṽ
            b_du = tl.dot(tl.trans(b_qk * scale).to(dt), b_do.to(dt)) + b_kdh
            b_dp = tl.dot(b_do.to(dt), tl.trans(b_u.to(dt))) * scale  # [i, j], before the mask
            b_dqh = tl.dot(b_do.to(dt), tl.trans(b_h.to(dt))) * scale
            b_udh = tl.dot(b_u.to(dt), tl.trans(b_dh.to(dt)))
            if USE_G:
                b_dpm = b_dp * b_d
                b_dqh = b_dqh * b_gam[:, None]
                b_udh = b_udh * b_r[:, None]
            else:
                b_dpm = tl.where(causal, b_dp, 0.0)
            b_dq = b_dqh + tl.dot(b_dpm.to(dt), b_k)
            b_dk = tl.dot(tl.trans(b_dpm).to(dt), b_q) + b_udh
            b_dx = tl.dot(tl.trans(b_T).to(dt), b_du.to(dt))  # dX, X = diag(β) Ṽ
            b_dvt = b_dx * b_beta[:, None]
            b_dkh = tl.dot(b_dvt.to(dt), tl.trans(b_h.to(dt)))
            if USE_G:
                b_dkh = b_dkh * b_gam[:, None]
            b_dk -= b_dkh
            b_gl = -tl.where(strict, tl.dot(b_dx.to(dt), tl.trans(b_u.to(dt))), 0.0)  # dL (this tile's)
            b_glb = b_gl * b_beta[:, None]
            if USE_G:
                b_glb = b_glb * b_d
            b_dk += tl.dot(b_glb.to(dt), b_k) + tl.dot(tl.trans(b_glb).to(dt), b_k)
            b_dbeta = tl.sum(b_dx * b_vt, 1) + tl.sum(b_gl * b_kk, 1)
            tl.store(dv + row[:, None] * V + o_v[None, :], b_dvt.to(dv.dtype.element_ty), mask=m_tv)
            tl.store(dq + (share + row)[:, None] * K + o_k[None, :], b_dq, mask=m_tk)
            tl.store(dk + (share + row)[:, None] * K + o_k[None, :], b_dk, mask=m_tk)
            tl.store(dbeta + share + row, b_dbeta, mask=m_t)
            b_dog, b_dvg = b_do, b_dvt  # dO and dṼ as the state gradient takes them (gated: ×Γ)
            if USE_G:
                # The log decays: through D (Z = ∂D ⊙ D), Γ, r and the block's total decay.
                b_z = tl.where(strict, b_gl * b_beta[:, None] * b_kk, 0.0) + b_dp * b_qk
                b_da = tl.sum(b_z, 1) - tl.sum(b_z, 0)
                b_dgam = tl.sum(b_do * tl.dot(b_q, b_h.to(dt)), 1) * scale - tl.sum(b_dvt * b_ks, 1)
                b_rdr = tl.sum(b_kdh * b_u, 1)
                b_da += b_gam * b_dgam - b_rdr
                da_end = tl.sum(b_rdr, 0) + tl.exp(a_end) * tl.sum(tl.sum(b_dh * b_h, 1), 0)
                # g_t enters every a_i with i ≥ t (and a_end): dg = reverse cumsum of da, plus da_end.
                b_dg = tl.sum(b_da, 0) - tl.cumsum(b_da, 0) + b_da + da_end
                tl.store(dg + share + row, b_dg, mask=m_t)
                b_dh = b_dh * tl.exp(a_end)
                b_dog, b_dvg = b_do * b_gam[:, None], b_dvt * b_gam[:, None]
            b_dh += tl.dot(tl.trans(b_q).to(dt), b_dog.to(dt)) * scale
            b_dh -= tl.dot(tl.trans(b_k), b_dvg.to(dt))
        if STORE_DH0:
            tl.store(dh0 + i_nh.to(tl.int64) * K * V + p_kv, b_dh, mask=m_kv)


def tiles(K: int, V: int) -> tuple[int, int]:
    """(BK, BV): the whole key dimension (padded to a power of two) and a V tile of 64, or 32 above
    K = 64 to bound the registers of the backward program. Not yet tuned on a GPU."""
    BK = max(16, pow2(K))
    return BK, max(16, min(64 if BK <= 64 else 32, pow2(V)))


def launch_configs(
    K: int, V: int, lowp: bool, arch: int | None, chunk_size: int, gated: bool
) -> dict[str, dict]:
    """Per kernel, the block length BT, the tiles (BK, BV) and launch options the launchers pass:
    `delta_rule_fwd`/`delta_rule_bwd` and the resource check (`compile_check.py`) both call this;
    "states" is the forward kernel in its state-recomputing form (the backward's first launch), with
    the backward's BT (it stores the states at the backward's block boundaries). chunk_size: the
    op's block length (the op's output does not depend on it); gated: with the log decays. arch None:
    the interpreter."""
    BK, BV = tiles(K, V)
    sm80 = arch == 80
    # ptxas -O3 collapses on sm_80 (32 or 128 registers, `PTXAS_O1`) in every backward at K >= 64
    # (and the gated fp32 one at K = 32) and in 9 of the 16 forward variants at K >= 128 (both
    # rules, both dtypes): -O1 for every backward and for the forwards from K = 128 there.
    fwd = dict(BT=chunk_size, BK=BK, BV=BV, **launch_opts(BK, ptxas_o1=sm80 and BK >= 128))
    bwd = dict(fwd, **launch_opts(BK, ptxas_o1=sm80))
    if sm80 and BK > 128:
        # sm_80 gives a block 163 KB of shared memory: at K = 256 the fp32 backward needs 188,672 B
        # (217,600 B with the decays) at BV = 32 and 3 stages; BV = 16 with 1 stage needs 159,744 B,
        # with the decays still 172,032 B, which BT = 16 brings to 101,376 B (BT = 16 with BV = 32:
        # 136,192 B, but 10,100 B of spills against 6,916 B).
        bwd.update(BV=16, **launch_opts(BK, num_stages=1, ptxas_o1=True))
        if gated and not lowp:
            bwd["BT"] = min(chunk_size, 16)
    return {"fwd": fwd, "states": dict(fwd, BT=bwd["BT"]), "bwd": bwd}


def _chunk_offsets(cu: torch.Tensor, BT: int) -> tuple[torch.Tensor, int]:
    """Index of each sequence's first block among all blocks, and a bound on the block count
    (Σ ⌈L_n / BT⌉ ≤ TT // BT + N) that needs no device-to-host copy."""
    n_blocks = (cu[1:] - cu[:-1] + BT - 1) // BT
    return (n_blocks.cumsum(0) - n_blocks).to(torch.int32), int(cu.numel() - 1)


def delta_rule_fwd(q, k, v, beta, g, scale, h0, cu, output_final_state, BT, store_states=False):
    """q, k: [1, TT, H, K]; v: [1, TT, H, V]; beta: [1, TT, H] contiguous; g: [1, TT, H] contiguous log
    decays (the gated delta rule) or None; h0: [N, H, K, V] fp32 or None; cu: [N+1] int32 on q's
    device. Returns (o like v or None, final state fp32 or None, (states [blocks, H, K, V] fp32
    entering every block, block offsets) or Nones); with `store_states` only the states."""
    _, TT, H, K = k.shape
    V = v.shape[-1]
    N = cu.numel() - 1
    lowp = k.dtype != torch.float32 and not interpreting()
    cfg = launch_configs(K, V, lowp, device_arch(k), BT, g is not None)["states" if store_states else "fwd"]
    o = None if store_states else torch.empty_like(v)
    ht = k.new_empty(N, H, K, V, dtype=torch.float32) if output_final_state else None
    offsets, states = None, None
    if store_states:
        offsets, n_seq = _chunk_offsets(cu, cfg["BT"])
        states = k.new_empty(TT // cfg["BT"] + n_seq, H, K, V, dtype=torch.float32)
    _fwd_kernel[(N * H, triton.cdiv(V, cfg["BV"]))](
        q, k, v, beta, g, h0, o, ht, states, cu, offsets, scale, H=H, K=K, V=V,
        USE_G=g is not None, USE_H0=h0 is not None, STORE_O=not store_states, STORE_HT=output_final_state,
        STORE_STATES=store_states, LOWP=lowp, **cfg,
    )  # fmt: skip
    return o, ht, (states, offsets)


def delta_rule_bwd(q, k, v, beta, g, scale, h0, cu, do, dht, need_dh0, BT):
    """Gradients (dq, dk, dv, dbeta, dg or None, dh0 or None) for `delta_rule_fwd`; dht is the final
    state's gradient (or None)."""
    _, TT, H, K = k.shape
    V = v.shape[-1]
    N = cu.numel() - 1
    lowp = k.dtype != torch.float32 and not interpreting()
    # The states at the backward's block boundaries (its BT: `launch_configs` gives both the same).
    _, _, (states, offsets) = delta_rule_fwd(q, k, v, beta, g, scale, h0, cu, False, BT, store_states=True)
    cfg = launch_configs(K, V, lowp, device_arch(k), BT, g is not None)["bwd"]
    NV = triton.cdiv(V, cfg["BV"])
    dq = q.new_empty(NV, TT, H, K, dtype=torch.float32)
    dk = torch.empty_like(dq)
    dbeta = q.new_empty(NV, TT, H, dtype=torch.float32)
    dg = None if g is None else torch.empty_like(dbeta)
    dv = torch.empty_like(v)
    dh0 = q.new_empty(N, H, K, V, dtype=torch.float32) if need_dh0 else None
    _bwd_kernel[(N * H, NV)](
        q, k, v, beta, g, states, dht, do.contiguous(), dq, dk, dv, dbeta, dg, dh0, cu, offsets, scale,
        TT, H=H, K=K, V=V, USE_G=g is not None, USE_DHT=dht is not None, STORE_DH0=need_dh0, LOWP=lowp, **cfg,
    )  # fmt: skip
    sum_shares = lambda x, like: x.sum(0).to(like.dtype).view(like.shape)
    dg = None if g is None else sum_shares(dg, g)
    return sum_shares(dq, q), sum_shares(dk, k), dv, sum_shares(dbeta, beta), dg, dh0


class DeltaRuleFunction(torch.autograd.Function):
    """Autograd wiring of the Triton kernels (inputs already validated, flattened to B = 1 and made
    contiguous by `delta_rule_attn`, or with g by `gated_delta_rule_attn`)."""

    @staticmethod
    def forward(ctx, q, k, v, beta, g, scale, h0, cu, output_final_state, BT):
        o, ht, _ = delta_rule_fwd(q, k, v, beta, g, scale, h0, cu, output_final_state, BT)
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
        grads = delta_rule_bwd(q, k, v, beta, g, ctx.scale, h0, cu, do, dht, need_dh0, ctx.BT)
        dq, dk, dv, dbeta, dg, dh0 = grads
        return dq, dk, dv, dbeta, dg, None, dh0, None, None, None
