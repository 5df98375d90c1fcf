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

from lmstack_kernels.common.triton_utils import (
    HAS_TRITON,
    device_arch,
    interpreting,
    launch_opts,
    state_tiles,
)

if HAS_TRITON:
    import triton
    import triton.language as tl

    from lmstack_kernels.common.triton_utils import load_state, program_sequence, state_tile
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
        i_nh, i_h, bos, L = program_sequence(cu, H)
        i_v = tl.program_id(1)
        b_g = tl.load(g + i_h).to(tl.float32)
        o_t = tl.arange(0, BT)
        o_k = tl.arange(0, BK)
        o_v = i_v * BV + tl.arange(0, BV)
        m_k, m_v = o_k < K, o_v < V
        p_h, m_kv = state_tile(i_nh, o_k, o_v, K, V)
        b_h = load_state(h0, p_h, m_kv, USE_H0, BK, BV)
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
        i_nh, i_h, bos, L = program_sequence(cu, H)
        i_k = tl.program_id(1)
        b_g = tl.load(g + i_h).to(tl.float32)
        o_t = tl.arange(0, BT)
        o_k = i_k * BK + tl.arange(0, BK)
        o_v = tl.arange(0, BV)
        m_k, m_v = o_k < K, o_v < V
        p_h, m_kv = state_tile(i_nh, o_k, o_v, K, V)
        b_h = load_state(h0, p_h, m_kv, USE_H0, BK, BV)
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
        i_nh, i_h, bos, L = program_sequence(cu, H)
        i_k = tl.program_id(1)
        b_g = tl.load(g + i_h).to(tl.float32)
        o_t = tl.arange(0, BT)
        o_k = i_k * BK + tl.arange(0, BK)
        o_v = tl.arange(0, BV)
        m_k, m_v = o_k < K, o_v < V
        p_h, m_kv = state_tile(i_nh, o_k, o_v, K, V)
        b_dh = load_state(dht, p_h, m_kv, USE_DHT, BK, BV)
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
        i_nh, i_h, bos, L = program_sequence(cu, H)
        i_v = tl.program_id(1)
        b_g = tl.load(g + i_h).to(tl.float32)
        o_t = tl.arange(0, BT)
        o_k = tl.arange(0, BK)
        o_v = i_v * BV + tl.arange(0, BV)
        m_k, m_v = o_k < K, o_v < V
        p_h, m_kv = state_tile(i_nh, o_k, o_v, K, V)
        b_dh = load_state(dht, p_h, m_kv, USE_DHT, BK, BV)
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


def block_and_stages(BK: int, lowp: bool, arch: int | None, chunk_size: int | None) -> dict:
    """Block length BT (chunk_size, or this choice when None) and software-pipelining depth for a
    state block with padded full dim BK. Each stage buffers a block's [BT, BK] tiles in shared memory,
    so fp32 and large head dims need shorter blocks or fewer stages to fit the per-block limit (sm_90
    227 KB, sm_80 163 KB). Measured with `python -m lmstack_kernels.common.compile_check` (triton 3.9,
    worst of the four kernels; spills are ptxas' spill stores per thread):
    - fp32, BK = 256, sm_90: BT 64 needs 380 KB at 3 stages, 244 KB at 2, 168 KB at 1 (1.2 KB
      spills); BT 32 at 2 stages 100 KB, ≤ 168 B spills: the default.
    - fp32, BK = 256, sm_80: BT 32 spills 9-11 KB in dq/dk (ptxas caps them at 32 registers); BT 16 at
      2 stages 66 KB, ≤ 76 B spills: the default.
    - fp32, BK = 128, sm_80: BT 64 needs 176 KB at 3 stages; BT 32 at 3 stages 88 KB, ≤ 72 B spills.
    - bf16, BK = 256, sm_80: BT 64 needs 184 KB at 3 stages (8 KB spills in dk at 2); BT 32 at 3
      stages 100 KB, ≤ 212 B spills.
    Everything else keeps BT 64 and Triton's 3 stages (e.g. bf16 BK = 256 on sm_90: 192 KB). An
    explicit chunk_size longer than the default gets fewer stages (fp32 BK = 256 at BT 64: 1 stage,
    72-168 KB; sm_80 at BT 64: 2 stages, 104-116 KB). arch None (the interpreter): no launch options."""
    if arch is None:
        return {"BT": chunk_size or 64}
    if not lowp and BK >= 256:
        short, stages, longer_stages = (32 if arch >= 90 else 16), 2, 1
    elif arch < 90 and (BK >= 256 or (not lowp and BK >= 128)):
        short, stages, longer_stages = 32, 3, 2
    else:
        return {"BT": chunk_size or 64}
    block = chunk_size or short
    return {"BT": block, "num_stages": stages if block <= short else longer_stages}


def launch_configs(K: int, V: int, lowp: bool, arch: int | None, chunk_size: int | None) -> dict[str, dict]:
    """Per kernel, the block length BT, tiles (BK, BV) and launch options (num_warps, num_stages) the
    launchers pass: `lightning_fwd`/`lightning_bwd` and the resource check (`compile_check.py`) both
    call this, so the checked variants are the launched ones. arch None: Triton's interpreter."""
    BK, BV = state_tiles(K, V)  # forward and dv: [K, V-tile]
    BVf, BKt = state_tiles(V, K)  # dq and dk: [K-tile, V]
    bt = block_and_stages(max(BK, BVf), lowp, arch, chunk_size)
    stages = {n: v for n, v in bt.items() if n == "num_stages"}
    key_tiled = dict(BT=bt["BT"], BK=BKt, BV=BVf, **launch_opts(BVf), **stages)
    value_tiled = dict(BT=bt["BT"], BK=BK, BV=BV, **launch_opts(BK), **stages)
    # ptxas -O3 gives the fp32 dk kernel at V = 256 on sm_90 128 registers (1,904 B of spills; -O1:
    # 255 and 928 B, `PTXAS_O1`).
    dk = dict(key_tiled, **launch_opts(BVf, ptxas_o1=arch == 90 and not lowp and BVf >= 256))
    return {"fwd": value_tiled, "bwd_dq": key_tiled, "bwd_dk": dk, "bwd_dv": value_tiled}


def lightning_fwd(q, k, v, g, scale, h0, cu, output_final_state, BT):
    """q, k: [1, TT, H, K]; v: [1, TT, H, V] contiguous; g: [H] fp32; h0: [N, H, K, V] fp32 or None;
    cu: [N+1] int32 on q's device. Returns (o like v, final state fp32 or None)."""
    _, _, H, K = q.shape
    V = v.shape[-1]
    N = cu.numel() - 1
    lowp = q.dtype != torch.float32 and not interpreting()
    o = torch.empty_like(v)
    ht = q.new_empty(N, H, K, V, dtype=torch.float32) if output_final_state else None
    cfg = launch_configs(K, V, lowp, device_arch(q), BT)["fwd"]
    _fwd_kernel[(N * H, triton.cdiv(V, cfg["BV"]))](
        q, k, v, g, h0, o, ht, cu, scale, H=H, K=K, V=V,
        USE_H0=h0 is not None, STORE_HT=output_final_state, LOWP=lowp, **cfg,
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
    cfg = launch_configs(K, V, lowp, device_arch(q), BT)
    _bwd_dq_kernel[(N * H, triton.cdiv(K, cfg["bwd_dq"]["BK"]))](
        k, v, g, h0, do, dq, cu, scale, H=H, K=K, V=V,
        USE_H0=h0 is not None, LOWP=lowp, **cfg["bwd_dq"],
    )  # fmt: skip
    _bwd_dk_kernel[(N * H, triton.cdiv(K, cfg["bwd_dk"]["BK"]))](
        q, v, g, dht, do, dk, dh0, cu, scale, H=H, K=K, V=V,
        USE_DHT=dht is not None, STORE_DH0=need_dh0, LOWP=lowp, **cfg["bwd_dk"],
    )  # fmt: skip
    _bwd_dv_kernel[(N * H, triton.cdiv(V, cfg["bwd_dv"]["BV"]))](
        q, k, g, dht, do, dv, cu, scale, H=H, K=K, V=V,
        USE_DHT=dht is not None, LOWP=lowp, **cfg["bwd_dv"],
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
