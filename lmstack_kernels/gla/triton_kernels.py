"""Gated linear attention in Triton: tiled forward and backward, fp32 accumulation.

Every program owns one (sequence, head) pair and one tile of the state's K or V dimension, and walks
its sequence in chunks of BT = 16 tokens with the state S ([K, V], fp32) in registers (MATH.md,
"The Triton kernels"):
- across chunks: through S, with gate sums measured from the chunk start (q side) and to the chunk
  end (k side), so every exponent is ≤ 0;
- inside a chunk: the pairs i ≥ j one key (or query) row at a time, exp(G_i − G_j) formed only where
  i ≥ j.

Kernels:
- `_fwd_kernel`    grid (N*H, V tiles): o and the final state; forward in time.
- `_bwd_dq_kernel` grid (N*H, K tiles): dq; forward in time, recomputing S from k, v, g.
- `_bwd_dk_kernel` grid (N*H, K tiles): dk, dg and d(initial state); backward in time with the carry
  dS (the gradient of the state); dg from dq, dk and the final state (MATH.md, "Gradient of g").
- `_bwd_dv_kernel` grid (N*H, V tiles): dv; backward in time.
Sequences are always addressed through `cu_seqlens` over flattened tokens (a dense batch is B equal
documents). Tails are masked: rows past the end load 0 (g = 0: no decay).

q, k and g are loaded in fp32 (they enter exp and element-wise products); v and dO keep their 16-bit
dtype for tl.dot on a GPU (fp32 accumulate), fp32 otherwise (the interpreter's bf16 arithmetic is
wrong).
"""

from __future__ import annotations

import torch

from lmstack_kernels.common.triton_utils import (
    HAS_TRITON,
    device_arch,
    interpreting,
    launch_opts,
    state_tiles,
)

BT = 16  # chunk length: the pairwise work inside a chunk grows with BT, the state work does not
BKS = 32  # key columns per slice of the [BT, BT, BKS] pairwise products in the forward and dv kernels

if HAS_TRITON:
    import triton
    import triton.language as tl

    from lmstack_kernels.common.triton_utils import load_state, load_tile, program_sequence, state_tile

    @triton.jit
    def _gate_sums(b_g):
        """From the chunk's gates [BT, D]: G_i = Σ_{l≤i} g_l, E_j = Σ_{l>j} g_l and the total Σ g
        (padded rows hold g = 0)."""
        G = tl.cumsum(b_g, 0)
        E = tl.cumsum(b_g, 0, reverse=True) - b_g
        return G, E, tl.sum(b_g, 0)

    @triton.jit
    def _pair_decay(G, o_t):
        """W [BT, BT, D]: W_ijd = exp(G_id − G_jd) for i ≥ j, 1 elsewhere (never a positive exponent;
        callers mask those entries)."""
        causal = (o_t[:, None] >= o_t[None, :])[:, :, None]
        return tl.exp(tl.where(causal, G[:, None, :] - G[None, :, :], 0.0))

    @triton.jit
    def _load_f32(x, row, m_t, o_k, m_k, K: tl.constexpr):
        """A [BT, BK] tile of q, k or g (K columns per row), in fp32."""
        m = m_t[:, None] & m_k[None, :]
        return tl.load(x + row[:, None] * K + o_k[None, :], mask=m, other=0.0).to(tl.float32)

    @triton.jit
    def _scores(q, k, g, row, m_t, o_t, scale, K: tl.constexpr, BT: tl.constexpr, BKS: tl.constexpr):
        """A [BT, BT]: A_ij = Σ_d scale·q_id k_jd exp(G_id − G_jd) for i ≥ j, else 0; the key dim is
        read in slices of BKS columns so that the [BT, BT, BKS] products stay small."""
        A = tl.zeros([BT, BT], dtype=tl.float32)
        for k0 in range(0, K, BKS):
            o_k = k0 + tl.arange(0, BKS)
            m_k = o_k < K
            b_q = _load_f32(q, row, m_t, o_k, m_k, K)
            b_k = _load_f32(k, row, m_t, o_k, m_k, K)
            G = tl.cumsum(_load_f32(g, row, m_t, o_k, m_k, K), 0)
            A += tl.sum(b_q[:, None, :] * b_k[None, :, :] * _pair_decay(G, o_t), 2)
        return tl.where(o_t[:, None] >= o_t[None, :], A * scale, 0.0)

    @triton.jit
    def _fwd_kernel(
        q, k, v, g, h0, o, ht, cu, scale,
        H: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
        BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, BKS: tl.constexpr,
        USE_H0: tl.constexpr, STORE_HT: tl.constexpr, LOWP: tl.constexpr,
    ):  # fmt: skip
        # o_i = exp(G_i) ⊙ qs_i · S + Σ_{j≤i} A_ij v_j;  S <- exp(Σ g) ⊙ S + (exp(E) ⊙ k)ᵀ v
        i_nh, i_h, bos, L = program_sequence(cu, H)
        i_v = tl.program_id(1)
        o_t = tl.arange(0, BT)
        o_k = tl.arange(0, BK)
        o_v = i_v * BV + tl.arange(0, BV)
        m_k, m_v = o_k < K, o_v < V
        p_h, m_kv = state_tile(i_nh, o_k, o_v, K, V)
        b_h = load_state(h0, p_h, m_kv, USE_H0, BK, BV)
        for start in range(0, L, BT):
            m_t = o_t < L - start
            row = (bos + start + o_t) * H + i_h
            b_q = _load_f32(q, row, m_t, o_k, m_k, K)
            b_k = _load_f32(k, row, m_t, o_k, m_k, K)
            b_g = _load_f32(g, row, m_t, o_k, m_k, K)
            b_v = load_tile(v + row[:, None] * V + o_v[None, :], m_t[:, None] & m_v[None, :], LOWP)
            G, E, g_tot = _gate_sums(b_g)
            b_qs = b_q * scale
            A = _scores(q, k, g, row, m_t, o_t, scale, K, BT, BKS)
            b_o = tl.dot(A.to(b_v.dtype), b_v)
            b_o += tl.dot((b_qs * tl.exp(G)).to(b_v.dtype), b_h.to(b_v.dtype))
            tl.store(
                o + row[:, None] * V + o_v[None, :],
                b_o.to(o.dtype.element_ty),
                mask=m_t[:, None] & m_v[None, :],
            )
            b_h = b_h * tl.exp(g_tot)[:, None] + tl.dot(tl.trans((b_k * tl.exp(E)).to(b_v.dtype)), b_v)
        if STORE_HT:
            tl.store(ht + p_h, b_h, mask=m_kv)

    @triton.jit
    def _bwd_dq_kernel(
        k, v, g, h0, do, dq, cu, scale,
        H: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
        BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
        USE_H0: tl.constexpr, LOWP: tl.constexpr,
    ):  # fmt: skip
        # dq_i = scale · [exp(G_i) ⊙ (S do_i) + Σ_{j≤i} (do_i·v_j) k_j ⊙ exp(G_i − G_j)]
        i_nh, i_h, bos, L = program_sequence(cu, H)
        i_k = tl.program_id(1)
        o_t = tl.arange(0, BT)
        o_k = i_k * BK + tl.arange(0, BK)
        o_v = tl.arange(0, BV)
        m_k, m_v = o_k < K, o_v < V
        p_h, m_kv = state_tile(i_nh, o_k, o_v, K, V)
        b_h = load_state(h0, p_h, m_kv, USE_H0, BK, BV)
        for start in range(0, L, BT):
            m_t = o_t < L - start
            row = (bos + start + o_t) * H + i_h
            b_k = _load_f32(k, row, m_t, o_k, m_k, K)
            b_g = _load_f32(g, row, m_t, o_k, m_k, K)
            m_tv = m_t[:, None] & m_v[None, :]
            b_v = load_tile(v + row[:, None] * V + o_v[None, :], m_tv, LOWP)
            b_do = load_tile(do + row[:, None] * V + o_v[None, :], m_tv, LOWP)
            G, E, g_tot = _gate_sums(b_g)
            dA = tl.where(o_t[:, None] >= o_t[None, :], tl.dot(b_do, tl.trans(b_v)), 0.0)
            b_dq = tl.sum(dA[:, :, None] * b_k[None, :, :] * _pair_decay(G, o_t), 1)
            b_dq += tl.dot(b_do, tl.trans(b_h.to(b_do.dtype))) * tl.exp(G)
            tl.store(
                dq + row[:, None] * K + o_k[None, :],
                (b_dq * scale).to(dq.dtype.element_ty),
                mask=m_t[:, None] & m_k[None, :],
            )
            b_h = b_h * tl.exp(g_tot)[:, None] + tl.dot(tl.trans((b_k * tl.exp(E)).to(b_v.dtype)), b_v)

    @triton.jit
    def _bwd_dk_kernel(
        q, k, v, g, ht, dht, do, dq, dk, dg, dh0, cu, scale,
        H: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
        BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
        USE_DHT: tl.constexpr, STORE_DH0: tl.constexpr, LOWP: tl.constexpr,
    ):  # fmt: skip
        # dk_j = Σ_{i≥j} (do_i·v_j) qs_i ⊙ exp(G_i − G_j) + exp(E_j) ⊙ (dS v_j), with the carry dS the
        # gradient of the state at the chunk end: dS <- exp(Σ g) ⊙ dS + (exp(G) ⊙ qs)ᵀ do.
        # dg_t = Σ_{s≥t} (q_s ⊙ dq_s − k_s ⊙ dk_s) + Σ_v (dht ⊙ ht): a reverse running sum, whose
        # carry starts at the final-state term (dq is read back from the dq kernel's output).
        i_nh, i_h, bos, L = program_sequence(cu, H)
        i_k = tl.program_id(1)
        o_t = tl.arange(0, BT)
        o_k = i_k * BK + tl.arange(0, BK)
        o_v = tl.arange(0, BV)
        m_k, m_v = o_k < K, o_v < V
        p_h, m_kv = state_tile(i_nh, o_k, o_v, K, V)
        b_dh = load_state(dht, p_h, m_kv, USE_DHT, BK, BV)
        b_dg_carry = tl.sum(b_dh * load_state(ht, p_h, m_kv, USE_DHT, BK, BV), 1)
        nb = tl.cdiv(L, BT)
        for ib in range(0, nb):
            start = (nb - 1 - ib) * BT
            m_t = o_t < L - start
            row = (bos + start + o_t) * H + i_h
            b_q = _load_f32(q, row, m_t, o_k, m_k, K)
            b_k = _load_f32(k, row, m_t, o_k, m_k, K)
            b_g = _load_f32(g, row, m_t, o_k, m_k, K)
            m_tv = m_t[:, None] & m_v[None, :]
            b_v = load_tile(v + row[:, None] * V + o_v[None, :], m_tv, LOWP)
            b_do = load_tile(do + row[:, None] * V + o_v[None, :], m_tv, LOWP)
            G, E, g_tot = _gate_sums(b_g)
            b_qs = b_q * scale
            dA = tl.where(o_t[:, None] >= o_t[None, :], tl.dot(b_do, tl.trans(b_v)), 0.0)
            b_dk = tl.sum(dA[:, :, None] * b_qs[:, None, :] * _pair_decay(G, o_t), 0)
            b_dk += tl.dot(b_v, tl.trans(b_dh.to(b_v.dtype))) * tl.exp(E)
            p_k = row[:, None] * K + o_k[None, :]
            m_tk = m_t[:, None] & m_k[None, :]
            tl.store(dk + p_k, b_dk.to(dk.dtype.element_ty), mask=m_tk)
            b_dq = tl.load(dq + p_k, mask=m_tk, other=0.0).to(tl.float32)
            b_x = b_q * b_dq - b_k * b_dk
            tl.store(
                dg + p_k,
                (tl.cumsum(b_x, 0, reverse=True) + b_dg_carry[None, :]).to(dg.dtype.element_ty),
                mask=m_tk,
            )
            b_dg_carry += tl.sum(b_x, 0)
            b_dh = b_dh * tl.exp(g_tot)[:, None] + tl.dot(tl.trans((b_qs * tl.exp(G)).to(b_do.dtype)), b_do)
        if STORE_DH0:
            tl.store(dh0 + p_h, b_dh, mask=m_kv)

    @triton.jit
    def _bwd_dv_kernel(
        q, k, g, dht, do, dv, cu, scale,
        H: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
        BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, BKS: tl.constexpr,
        USE_DHT: tl.constexpr, LOWP: tl.constexpr,
    ):  # fmt: skip
        # dv_j = Σ_{i≥j} A_ij do_i + (exp(E_j) ⊙ k_j)ᵀ dS
        i_nh, i_h, bos, L = program_sequence(cu, H)
        i_v = tl.program_id(1)
        o_t = tl.arange(0, BT)
        o_k = tl.arange(0, BK)
        o_v = i_v * BV + tl.arange(0, BV)
        m_k, m_v = o_k < K, o_v < V
        p_h, m_kv = state_tile(i_nh, o_k, o_v, K, V)
        b_dh = load_state(dht, p_h, m_kv, USE_DHT, BK, BV)
        nb = tl.cdiv(L, BT)
        for ib in range(0, nb):
            start = (nb - 1 - ib) * BT
            m_t = o_t < L - start
            row = (bos + start + o_t) * H + i_h
            b_q = _load_f32(q, row, m_t, o_k, m_k, K)
            b_k = _load_f32(k, row, m_t, o_k, m_k, K)
            b_g = _load_f32(g, row, m_t, o_k, m_k, K)
            b_do = load_tile(do + row[:, None] * V + o_v[None, :], m_t[:, None] & m_v[None, :], LOWP)
            G, E, g_tot = _gate_sums(b_g)
            b_qs = b_q * scale
            A = _scores(q, k, g, row, m_t, o_t, scale, K, BT, BKS)
            b_dv = tl.dot(tl.trans(A.to(b_do.dtype)), b_do)
            b_dv += tl.dot((b_k * tl.exp(E)).to(b_do.dtype), b_dh.to(b_do.dtype))
            tl.store(
                dv + row[:, None] * V + o_v[None, :],
                b_dv.to(dv.dtype.element_ty),
                mask=m_t[:, None] & m_v[None, :],
            )
            b_dh = b_dh * tl.exp(g_tot)[:, None] + tl.dot(tl.trans((b_qs * tl.exp(G)).to(b_do.dtype)), b_do)


def launch_configs(K: int, V: int, lowp: bool, arch: int | None) -> dict[str, dict]:
    """Per kernel, the tiles (BK, BV, BKS) and launch options the launchers pass: `gla_fwd`/`gla_bwd`
    and the resource check (`compile_check.py`) both call this. One choice of tiles for every dtype
    and arch (Triton's default 3 stages), until the check's table says otherwise; arch None: the
    interpreter."""
    BK, BV = state_tiles(K, V)  # forward and dv: [K, V-tile]
    BVf, BKt = state_tiles(V, K)  # dq and dk: [K-tile, V]
    key_tiled = dict(BK=BKt, BV=BVf, **launch_opts(BVf))
    value_tiled = dict(BK=BK, BV=BV, BKS=min(BK, BKS), **launch_opts(BK))
    # ptxas -O3 gives the fp32 dq kernel at V = 256 on sm_90 32 registers (3,228 B of spills; -O1:
    # 255 and 424 B, `PTXAS_O1`).
    dq = dict(key_tiled, **launch_opts(BVf, ptxas_o1=arch == 90 and not lowp and BVf >= 256))
    return {"fwd": value_tiled, "bwd_dq": dq, "bwd_dk": key_tiled, "bwd_dv": value_tiled}


def gla_fwd(q, k, v, g, scale, h0, cu, output_final_state):
    """q, k, g: [1, TT, H, K]; v: [1, TT, H, V] contiguous; h0: [N, H, K, V] fp32 or None; cu: [N+1]
    int32 on q's device. Returns (o like v, final state fp32 or None)."""
    _, _, H, K = q.shape
    V = v.shape[-1]
    N = cu.numel() - 1
    lowp = v.dtype != torch.float32 and not interpreting()
    o = torch.empty_like(v)
    ht = q.new_empty(N, H, K, V, dtype=torch.float32) if output_final_state else None
    cfg = launch_configs(K, V, lowp, device_arch(q))["fwd"]
    _fwd_kernel[(N * H, triton.cdiv(V, cfg["BV"]))](
        q, k, v, g, h0, o, ht, cu, scale, H=H, K=K, V=V, BT=BT,
        USE_H0=h0 is not None, STORE_HT=output_final_state, LOWP=lowp, **cfg,
    )  # fmt: skip
    return o, ht


def gla_bwd(q, k, v, g, scale, h0, ht, cu, do, dht, need_dh0):
    """Gradients (dq, dk, dv, dg, dh0 or None) for `gla_fwd`; dht is the final state's gradient
    (then ht, the final state, is needed for dg)."""
    _, _, H, K = q.shape
    V = v.shape[-1]
    N = cu.numel() - 1
    lowp = v.dtype != torch.float32 and not interpreting()
    do = do.contiguous()
    # dq stays fp32 until dg has been formed from it.
    dq = torch.empty_like(q, dtype=torch.float32)
    dk, dv, dg = torch.empty_like(k), torch.empty_like(v), torch.empty_like(g)
    dh0 = q.new_empty(N, H, K, V, dtype=torch.float32) if need_dh0 else None
    cfg = launch_configs(K, V, lowp, device_arch(q))
    _bwd_dq_kernel[(N * H, triton.cdiv(K, cfg["bwd_dq"]["BK"]))](
        k, v, g, h0, do, dq, cu, scale, H=H, K=K, V=V, BT=BT,
        USE_H0=h0 is not None, LOWP=lowp, **cfg["bwd_dq"],
    )  # fmt: skip
    _bwd_dk_kernel[(N * H, triton.cdiv(K, cfg["bwd_dk"]["BK"]))](
        q, k, v, g, ht, dht, do, dq, dk, dg, dh0, cu, scale, H=H, K=K, V=V, BT=BT,
        USE_DHT=dht is not None, STORE_DH0=need_dh0, LOWP=lowp, **cfg["bwd_dk"],
    )  # fmt: skip
    _bwd_dv_kernel[(N * H, triton.cdiv(V, cfg["bwd_dv"]["BV"]))](
        q, k, g, dht, do, dv, cu, scale, H=H, K=K, V=V, BT=BT,
        USE_DHT=dht is not None, LOWP=lowp, **cfg["bwd_dv"],
    )  # fmt: skip
    return dq.to(q.dtype), dk, dv, dg, dh0


class GLAFunction(torch.autograd.Function):
    """Autograd wiring of the Triton kernels (inputs already validated, flattened to B = 1 and made
    contiguous by `gla_attn`)."""

    @staticmethod
    def forward(ctx, q, k, v, g, scale, h0, cu, output_final_state):
        o, ht = gla_fwd(q, k, v, g, scale, h0, cu, output_final_state)
        ctx.save_for_backward(q, k, v, g, h0, ht, cu)
        ctx.scale = scale
        ctx.set_materialize_grads(False)  # an unused final state passes None, not a zero tensor
        return o, ht

    @staticmethod
    def backward(ctx, do, dht):
        q, k, v, g, h0, ht, cu = ctx.saved_tensors
        if do is None:
            do = torch.zeros_like(v)
        need_dh0 = h0 is not None and ctx.needs_input_grad[5]
        dq, dk, dv, dg, dh0 = gla_bwd(q, k, v, g, ctx.scale, h0, ht, cu, do, dht, need_dh0)
        return dq, dk, dv, dg, None, dh0, None, None
