"""Lightning Attention-2 in Triton: tiled forward and backward, fp32 accumulation.

Every program owns one (sequence, head) pair and one tile of the state's K or V dimension, and walks
its sequence in blocks of BT tokens (Lightning Attention-2, Qin et al. 2024):
- intra-block: conventional masked attention with the decay matrix M_ij = λ^(i-j) (i ≥ j);
- inter-block: through the running state S ([K, V], fp32, in registers), decayed by λ per token.

Kernels (math in MATH.md):
- `_fwd_kernel`   grid (N*H, V tiles): o and the final state; forward in time.
- `_bwd_dq_kernel` grid (N*H, K tiles): dq; forward in time, recomputing S from k, v.
- `_bwd_dk_kernel` grid (N*H, K tiles): dk and d(initial state); backward in time with the carry dS.
- `_bwd_dv_kernel` grid (N*H, V tiles): dv; backward in time.
Sequences are always addressed through `cu_seqlens` over flattened tokens (a dense batch is B equal
documents), so packed documents cost nothing extra. Tails are masked (rows past the end load 0).

Inputs are loaded in their own dtype; on a GPU with 16-bit inputs the tl.dot operands stay 16-bit
(fp32 accumulate); otherwise (fp32 inputs, or the CPU interpreter, whose bf16 arithmetic is wrong)
everything is computed in fp32. Triton is imported under a guard: without it, `HAS_TRITON` is
False and only the PyTorch paths of the package are usable.
"""

from __future__ import annotations

import torch

from lmstack_kernels.common.triton_utils import HAS_TRITON, interpreting, launch_opts, state_tiles

if HAS_TRITON:
    import triton
    import triton.language as tl

    from lmstack_kernels.common.triton_utils import load_tile as _load

    @triton.jit
    def _decays(b_g, o_t, n, BT: tl.constexpr):
        """Per block: M [BT, BT] = λ^(i-j) (i ≥ j), q_dec [BT] = λ^(i+1) (the state entering the
        block, seen by row i), k_dec [BT] = λ^(n-1-j) for rows j < n (key j to the block end)."""
        causal = o_t[:, None] >= o_t[None, :]
        diff = (o_t[:, None] - o_t[None, :]).to(tl.float32)
        M = tl.where(causal, tl.exp(b_g * tl.where(causal, diff, 0.0)), 0.0)
        q_dec = tl.exp(b_g * (o_t + 1).to(tl.float32))
        live = o_t < n
        k_dec = tl.where(live, tl.exp(b_g * tl.where(live, (n - 1 - o_t).to(tl.float32), 0.0)), 0.0)
        return M, q_dec, k_dec

    @triton.jit
    def _fwd_kernel(
        q, k, v, g, h0, o, ht, cu, scale,
        H: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
        BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
        USE_H0: tl.constexpr, STORE_HT: tl.constexpr, LOWP: tl.constexpr,
    ):  # fmt: skip
        i_nh, i_v = tl.program_id(0), tl.program_id(1)
        i_n, i_h = i_nh // H, i_nh % H
        bos = tl.load(cu + i_n).to(tl.int64)
        L = tl.load(cu + i_n + 1).to(tl.int64) - bos
        b_g = tl.load(g + i_h).to(tl.float32)
        o_t = tl.arange(0, BT)
        o_k = tl.arange(0, BK)
        o_v = i_v * BV + tl.arange(0, BV)
        m_k, m_v = o_k < K, o_v < V
        m_kv = m_k[:, None] & m_v[None, :]
        p_h = i_nh.to(tl.int64) * K * V + o_k[:, None] * V + o_v[None, :]
        b_h = tl.zeros([BK, BV], dtype=tl.float32)
        if USE_H0:
            b_h += tl.load(h0 + p_h, mask=m_kv, other=0.0).to(tl.float32)
        for start in range(0, L, BT):
            n = tl.minimum(L - start, BT)
            m_t = o_t < n
            row = (bos + start + o_t) * H + i_h
            b_q = _load(q + row[:, None] * K + o_k[None, :], m_t[:, None] & m_k[None, :], LOWP)
            b_k = _load(k + row[:, None] * K + o_k[None, :], m_t[:, None] & m_k[None, :], LOWP)
            b_v = _load(v + row[:, None] * V + o_v[None, :], m_t[:, None] & m_v[None, :], LOWP)
            M, q_dec, k_dec = _decays(b_g, o_t, n, BT)
            b_s = tl.dot(b_q, tl.trans(b_k)) * (M * scale)
            b_o = tl.dot(b_s.to(b_v.dtype), b_v)
            b_o += tl.dot((b_q * (q_dec * scale)[:, None]).to(b_v.dtype), b_h.to(b_v.dtype))
            tl.store(
                o + row[:, None] * V + o_v[None, :],
                b_o.to(o.dtype.element_ty),
                mask=m_t[:, None] & m_v[None, :],
            )
            b_h = b_h * tl.exp(b_g * n.to(tl.float32)) + tl.dot(
                tl.trans((b_k * k_dec[:, None]).to(b_v.dtype)), b_v
            )
        if STORE_HT:
            tl.store(ht + p_h, b_h, mask=m_kv)

    @triton.jit
    def _bwd_dq_kernel(
        k, v, g, h0, do, dq, cu, scale,
        H: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
        BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
        USE_H0: tl.constexpr, LOWP: tl.constexpr,
    ):  # fmt: skip
        # dq_i = scale * [ Σ_{j≤i in block} λ^(i-j) (do_i·v_j) k_j + λ^(i+1) S_prev do_i ]
        i_nh, i_k = tl.program_id(0), tl.program_id(1)
        i_n, i_h = i_nh // H, i_nh % H
        bos = tl.load(cu + i_n).to(tl.int64)
        L = tl.load(cu + i_n + 1).to(tl.int64) - bos
        b_g = tl.load(g + i_h).to(tl.float32)
        o_t = tl.arange(0, BT)
        o_k = i_k * BK + tl.arange(0, BK)
        o_v = tl.arange(0, BV)
        m_k, m_v = o_k < K, o_v < V
        b_h = tl.zeros([BK, BV], dtype=tl.float32)
        if USE_H0:
            p_h = i_nh.to(tl.int64) * K * V + o_k[:, None] * V + o_v[None, :]
            b_h += tl.load(h0 + p_h, mask=m_k[:, None] & m_v[None, :], other=0.0).to(tl.float32)
        for start in range(0, L, BT):
            n = tl.minimum(L - start, BT)
            m_t = o_t < n
            row = (bos + start + o_t) * H + i_h
            b_k = _load(k + row[:, None] * K + o_k[None, :], m_t[:, None] & m_k[None, :], LOWP)
            b_v = _load(v + row[:, None] * V + o_v[None, :], m_t[:, None] & m_v[None, :], LOWP)
            b_do = _load(do + row[:, None] * V + o_v[None, :], m_t[:, None] & m_v[None, :], LOWP)
            M, q_dec, k_dec = _decays(b_g, o_t, n, BT)
            b_dp = tl.dot(b_do, tl.trans(b_v)) * (M * scale)
            b_dq = tl.dot(b_dp.to(b_k.dtype), b_k)
            b_dq += tl.dot((b_do * (q_dec * scale)[:, None]).to(b_k.dtype), tl.trans(b_h.to(b_k.dtype)))
            tl.store(
                dq + row[:, None] * K + o_k[None, :],
                b_dq.to(dq.dtype.element_ty),
                mask=m_t[:, None] & m_k[None, :],
            )
            b_h = b_h * tl.exp(b_g * n.to(tl.float32)) + tl.dot(
                tl.trans((b_k * k_dec[:, None]).to(b_v.dtype)), b_v
            )

    @triton.jit
    def _bwd_dk_kernel(
        q, v, g, dht, do, dk, dh0, cu, scale,
        H: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
        BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
        USE_DHT: tl.constexpr, STORE_DH0: tl.constexpr, LOWP: tl.constexpr,
    ):  # fmt: skip
        # dk_j = scale * Σ_{i≥j in block} λ^(i-j) (do_i·v_j) q_i + λ^(n-1-j) dS v_j, where the carry
        # dS is the gradient of the state at the block end; it moves back as
        # dS <- λ^n dS + scale * Σ_i λ^(i+1) q_i do_iᵀ.
        i_nh, i_k = tl.program_id(0), tl.program_id(1)
        i_n, i_h = i_nh // H, i_nh % H
        bos = tl.load(cu + i_n).to(tl.int64)
        L = tl.load(cu + i_n + 1).to(tl.int64) - bos
        b_g = tl.load(g + i_h).to(tl.float32)
        o_t = tl.arange(0, BT)
        o_k = i_k * BK + tl.arange(0, BK)
        o_v = tl.arange(0, BV)
        m_k, m_v = o_k < K, o_v < V
        m_kv = m_k[:, None] & m_v[None, :]
        p_h = i_nh.to(tl.int64) * K * V + o_k[:, None] * V + o_v[None, :]
        b_dh = tl.zeros([BK, BV], dtype=tl.float32)
        if USE_DHT:
            b_dh += tl.load(dht + p_h, mask=m_kv, other=0.0).to(tl.float32)
        nb = tl.cdiv(L, BT)
        for ib in range(0, nb):
            start = (nb - 1 - ib) * BT
            n = tl.minimum(L - start, BT)
            m_t = o_t < n
            row = (bos + start + o_t) * H + i_h
            b_q = _load(q + row[:, None] * K + o_k[None, :], m_t[:, None] & m_k[None, :], LOWP)
            b_v = _load(v + row[:, None] * V + o_v[None, :], m_t[:, None] & m_v[None, :], LOWP)
            b_do = _load(do + row[:, None] * V + o_v[None, :], m_t[:, None] & m_v[None, :], LOWP)
            M, q_dec, k_dec = _decays(b_g, o_t, n, BT)
            b_dp = tl.dot(b_do, tl.trans(b_v)) * (M * scale)  # [i, j]
            b_dk = tl.dot(tl.trans(b_dp.to(b_q.dtype)), b_q)
            b_dk += tl.dot(b_v, tl.trans(b_dh.to(b_v.dtype))) * k_dec[:, None]
            tl.store(
                dk + row[:, None] * K + o_k[None, :],
                b_dk.to(dk.dtype.element_ty),
                mask=m_t[:, None] & m_k[None, :],
            )
            b_dh = b_dh * tl.exp(b_g * n.to(tl.float32)) + tl.dot(
                tl.trans((b_q * (q_dec * scale)[:, None]).to(b_do.dtype)), b_do
            )
        if STORE_DH0:
            tl.store(dh0 + p_h, b_dh, mask=m_kv)

    @triton.jit
    def _bwd_dv_kernel(
        q, k, g, dht, do, dv, cu, scale,
        H: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
        BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
        USE_DHT: tl.constexpr, LOWP: tl.constexpr,
    ):  # fmt: skip
        # dv_j = scale * Σ_{i≥j in block} λ^(i-j) (q_i·k_j) do_i + λ^(n-1-j) dSᵀ k_j
        i_nh, i_v = tl.program_id(0), tl.program_id(1)
        i_n, i_h = i_nh // H, i_nh % H
        bos = tl.load(cu + i_n).to(tl.int64)
        L = tl.load(cu + i_n + 1).to(tl.int64) - bos
        b_g = tl.load(g + i_h).to(tl.float32)
        o_t = tl.arange(0, BT)
        o_k = tl.arange(0, BK)
        o_v = i_v * BV + tl.arange(0, BV)
        m_k, m_v = o_k < K, o_v < V
        b_dh = tl.zeros([BK, BV], dtype=tl.float32)
        if USE_DHT:
            p_h = i_nh.to(tl.int64) * K * V + o_k[:, None] * V + o_v[None, :]
            b_dh += tl.load(dht + p_h, mask=m_k[:, None] & m_v[None, :], other=0.0).to(tl.float32)
        nb = tl.cdiv(L, BT)
        for ib in range(0, nb):
            start = (nb - 1 - ib) * BT
            n = tl.minimum(L - start, BT)
            m_t = o_t < n
            row = (bos + start + o_t) * H + i_h
            b_q = _load(q + row[:, None] * K + o_k[None, :], m_t[:, None] & m_k[None, :], LOWP)
            b_k = _load(k + row[:, None] * K + o_k[None, :], m_t[:, None] & m_k[None, :], LOWP)
            b_do = _load(do + row[:, None] * V + o_v[None, :], m_t[:, None] & m_v[None, :], LOWP)
            M, q_dec, k_dec = _decays(b_g, o_t, n, BT)
            b_s = tl.dot(b_q, tl.trans(b_k)) * (M * scale)  # [i, j]
            b_dv = tl.dot(tl.trans(b_s.to(b_do.dtype)), b_do)
            b_dv += tl.dot((b_k * k_dec[:, None]).to(b_do.dtype), b_dh.to(b_do.dtype))
            tl.store(
                dv + row[:, None] * V + o_v[None, :],
                b_dv.to(dv.dtype.element_ty),
                mask=m_t[:, None] & m_v[None, :],
            )
            b_dh = b_dh * tl.exp(b_g * n.to(tl.float32)) + tl.dot(
                tl.trans((b_q * (q_dec * scale)[:, None]).to(b_do.dtype)), b_do
            )


def lightning_fwd(q, k, v, g, scale, h0, cu, output_final_state, BT):
    """q, k: [1, TT, H, K]; v: [1, TT, H, V] contiguous; g: [H] fp32; h0: [N, H, K, V] fp32 or None;
    cu: [N+1] int32 on q's device. Returns (o like v, final state fp32 or None)."""
    _, _, H, K = q.shape
    V = v.shape[-1]
    N = cu.numel() - 1
    lowp = q.dtype != torch.float32 and not interpreting()
    o = torch.empty_like(v)
    ht = q.new_empty(N, H, K, V, dtype=torch.float32) if output_final_state else None
    BK, BV = state_tiles(K, V)
    _fwd_kernel[(N * H, triton.cdiv(V, BV))](
        q, k, v, g, h0, o, ht, cu, scale, H=H, K=K, V=V, BT=BT, BK=BK, BV=BV,
        USE_H0=h0 is not None, STORE_HT=output_final_state, LOWP=lowp, **launch_opts(BK),
    )  # fmt: skip
    return o, ht


def lightning_bwd(q, k, v, g, scale, h0, cu, do, dht, need_dh0, BT):
    """Gradients (dq, dk, dv, dh0 or None) for `lightning_fwd`; dht is the final state's gradient."""
    _, _, H, K = q.shape
    V = v.shape[-1]
    N = cu.numel() - 1
    lowp = q.dtype != torch.float32 and not interpreting()
    do = do.contiguous()
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    dh0 = q.new_empty(N, H, K, V, dtype=torch.float32) if need_dh0 else None
    BVf, BKt = state_tiles(V, K)
    _bwd_dq_kernel[(N * H, triton.cdiv(K, BKt))](
        k, v, g, h0, do, dq, cu, scale, H=H, K=K, V=V, BT=BT, BK=BKt, BV=BVf,
        USE_H0=h0 is not None, LOWP=lowp, **launch_opts(BVf),
    )  # fmt: skip
    _bwd_dk_kernel[(N * H, triton.cdiv(K, BKt))](
        q, v, g, dht, do, dk, dh0, cu, scale, H=H, K=K, V=V, BT=BT, BK=BKt, BV=BVf,
        USE_DHT=dht is not None, STORE_DH0=need_dh0, LOWP=lowp, **launch_opts(BVf),
    )  # fmt: skip
    BKf, BVt = state_tiles(K, V)
    _bwd_dv_kernel[(N * H, triton.cdiv(V, BVt))](
        q, k, g, dht, do, dv, cu, scale, H=H, K=K, V=V, BT=BT, BK=BKf, BV=BVt,
        USE_DHT=dht is not None, LOWP=lowp, **launch_opts(BKf),
    )  # fmt: skip
    return dq, dk, dv, dh0


class LightningAttnFunction(torch.autograd.Function):
    """Autograd wiring of the Triton kernels (inputs already validated, flattened to B = 1 and made
    contiguous by `lightning_attn`). The decay is a constant: it receives no gradient."""

    @staticmethod
    def forward(ctx, q, k, v, g, scale, h0, cu, output_final_state, BT):
        o, ht = lightning_fwd(q, k, v, g, scale, h0, cu, output_final_state, BT)
        ctx.save_for_backward(q, k, v, g, h0, cu)
        ctx.scale, ctx.BT = scale, BT
        ctx.set_materialize_grads(False)  # an unused final state passes None, not a zero tensor
        return o, ht

    @staticmethod
    def backward(ctx, do, dht):
        q, k, v, g, h0, cu = ctx.saved_tensors
        if do is None:
            do = torch.zeros_like(v)
        need_dh0 = h0 is not None and ctx.needs_input_grad[5]
        dq, dk, dv, dh0 = lightning_bwd(q, k, v, g, ctx.scale, h0, cu, do, dht, need_dh0, ctx.BT)
        return dq, dk, dv, None, None, dh0, None, None, None
