"""lightning_attn: the Triton kernels (interpreter on CPU) and the chunked PyTorch path against the
naive recurrence, packed documents, split sequences, input validation."""

from __future__ import annotations

import functools

import pytest
import torch
from helpers import assert_rel_rmse

from lmstack_kernels.lightning import lightning_attn, lightning_slice_state
from lmstack_kernels.lightning.naive import naive_lightning_attn

TOL = 1e-5  # fp32 against an fp64 reference
DECAY = torch.tensor([-0.02, -0.4])  # log λ per head: long and short memory
SHAPES = {63: (16, 32), 100: (32, 16), 128: (32, 32)}  # T -> (K, V); B = H = 2
NAMES = ("o", "final_state", "dq", "dk", "dv", "d_initial_state")


def _inputs(T: int, B: int = 2, H: int = 2, seed: int = 0) -> dict[str, torch.Tensor]:
    K, V = SHAPES.get(T, (16, 32))
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g)
    return {
        "q": r(B, T, H, K), "k": r(B, T, H, K), "v": r(B, T, H, V), "h0": r(B, H, K, V),
        "do": r(B, T, H, V), "dht": r(B, H, K, V),
    }  # fmt: skip


def _run(fn, x: dict[str, torch.Tensor], dtype=torch.float32, **kw) -> list[torch.Tensor]:
    """Forward, then backward of <o, do> + <final state, dht>; returns o, final state and grads."""
    q, k, v, h0 = (x[n].detach().to(dtype, copy=True).requires_grad_() for n in ("q", "k", "v", "h0"))
    o, ht = fn(q, k, v, h0, **kw)
    ((o.double() * x["do"].double()).sum() + (ht.double() * x["dht"].double()).sum()).backward()
    return [o.detach(), ht.detach(), q.grad, k.grad, v.grad, h0.grad]


def _op(q, k, v, h0, backend, chunk_size=None, cu_seqlens=None, scale=None):
    return lightning_attn(
        q, k, v, DECAY, scale=scale, initial_state=h0, output_final_state=True,
        cu_seqlens=cu_seqlens, backend=backend, chunk_size=chunk_size,
    )  # fmt: skip


def _naive(q, k, v, h0, cu_seqlens=None, scale=None):
    return naive_lightning_attn(q, k, v, DECAY, scale, h0, True, cu_seqlens, dtype=torch.float64)


@functools.cache
def _reference(T: int) -> list[torch.Tensor]:
    return _run(_naive, _inputs(T), dtype=torch.float64)


def _check(got: list[torch.Tensor], ref: list[torch.Tensor], tol: float, what: str) -> None:
    for name, a, r in zip(NAMES, got, ref):
        assert_rel_rmse(a, r, tol, f"{what} {name}")


@pytest.mark.parametrize("T", sorted(SHAPES))
def test_triton_matches_naive(T: int) -> None:
    # chunk_size 32: several blocks per sequence, and T = 63, 100 end in a masked partial block.
    got = _run(_op, _inputs(T), backend="triton", chunk_size=32)
    _check(got, _reference(T), TOL, f"triton T={T}")


@pytest.mark.parametrize("T", sorted(SHAPES))
def test_chunk_matches_naive(T: int) -> None:
    got = _run(_op, _inputs(T), backend="torch", chunk_size=16)
    _check(got, _reference(T), TOL, f"torch T={T}")


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_default_chunk_and_no_state(backend: str) -> None:
    x = _inputs(100)
    q, k, v = x["q"], x["k"], x["v"]
    o, ht = lightning_attn(q, k, v, DECAY, backend=backend)
    assert ht is None
    ref, _ = naive_lightning_attn(q, k, v, DECAY, dtype=torch.float64)
    assert_rel_rmse(o, ref, TOL, f"{backend} o")
    o2, _ = lightning_attn(q, k, v, DECAY, scale=1.0, backend=backend)
    assert_rel_rmse(o2, ref * q.shape[-1] ** 0.5, TOL, f"{backend} o, scale=1")


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_low_precision_inputs(backend: str) -> None:
    x = _inputs(63)
    for dtype in (torch.bfloat16, torch.float16):
        q, k, v = (x[n].to(dtype) for n in ("q", "k", "v"))
        o, ht = lightning_attn(
            q, k, v, DECAY, initial_state=x["h0"], output_final_state=True, backend=backend
        )
        ref_o, ref_h = naive_lightning_attn(q, k, v, DECAY, None, x["h0"], True, dtype=torch.float64)
        assert o.dtype == dtype and ht.dtype == torch.float32
        assert_rel_rmse(o, ref_o, 1e-2, f"{backend} {dtype} o")
        assert_rel_rmse(ht, ref_h, 1e-4, f"{backend} {dtype} final state")


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_packed_documents_match_per_document_loop(backend: str) -> None:
    # Documents of 17, 0 (empty), 46 and 37 tokens packed in one row; each has its own initial state.
    lengths = [17, 0, 46, 37]
    cu = torch.tensor([0] + lengths).cumsum(0).to(torch.int32)
    N, TT = len(lengths), sum(lengths)
    x = _inputs(TT, B=1)
    K, V = x["q"].shape[-1], x["v"].shape[-1]
    x["h0"], x["dht"] = torch.randn(N, 2, K, V), torch.randn(N, 2, K, V)
    got = _run(_op, x, backend=backend, chunk_size=16, cu_seqlens=cu)

    def per_document(q, k, v, h0):
        outs, finals = [], []
        for n in range(N):
            s, e = cu[n].item(), cu[n + 1].item()
            if s == e:
                finals.append(h0[n : n + 1])
                continue
            o, ht = _op(q[:, s:e], k[:, s:e], v[:, s:e], h0[n : n + 1], backend, 16)
            outs.append(o)
            finals.append(ht)
        return torch.cat(outs, 1), torch.cat(finals, 0)

    ref = _run(per_document, x)
    _check(got, ref, TOL, f"{backend} packed")
    # ... and the packed run agrees with the naive recurrence too.
    naive = _naive(*(x[n].double() for n in ("q", "k", "v", "h0")), cu_seqlens=cu)
    _check(got[:2], list(naive), TOL, f"{backend} packed vs naive")


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_split_sequence_equals_whole(backend: str) -> None:
    """Run 0..t1 then t1..T from the first part's final state; gradients flow through the state."""
    x, t1 = _inputs(100), 45

    def split(q, k, v, h0):
        o1, h1 = _op(q[:, :t1], k[:, :t1], v[:, :t1], h0, backend, 32)
        o2, h2 = _op(q[:, t1:], k[:, t1:], v[:, t1:], h1, backend, 32)
        return torch.cat([o1, o2], 1), h2

    _check(_run(split, x), _run(_op, x, backend=backend, chunk_size=32), TOL, f"{backend} split")


@pytest.mark.parametrize("dims", [(8, 32), (32, 8), (320, 32), (32, 512)])
def test_head_dim_out_of_range_raises(dims: tuple[int, int]) -> None:
    K, V = dims
    q, v = torch.randn(1, 8, 2, K), torch.randn(1, 8, 2, V)
    with pytest.raises(ValueError, match="head dim"):
        lightning_attn(q, q, v, DECAY)


def test_invalid_inputs_raise() -> None:
    q, v = torch.randn(2, 8, 2, 16), torch.randn(2, 8, 2, 16)
    with pytest.raises(ValueError, match="decay"):
        lightning_attn(q, q, v, torch.tensor([-0.1, 0.1]))
    with pytest.raises(ValueError, match="decay"):
        lightning_attn(q, q, v, torch.tensor([-0.1]))
    with pytest.raises(ValueError, match="initial_state"):
        lightning_attn(q, q, v, DECAY, initial_state=torch.zeros(1, 2, 16, 16))
    with pytest.raises(ValueError, match="B = 1"):
        lightning_attn(q, q, v, DECAY, cu_seqlens=torch.tensor([0, 8]))
    with pytest.raises(ValueError, match="cu_seqlens"):
        lightning_attn(q[:1], q[:1], v[:1], DECAY, cu_seqlens=torch.tensor([0, 5]))
    with pytest.raises(ValueError, match="dtype"):
        lightning_attn(q.double(), q.double(), v.double(), DECAY)
    with pytest.raises(ValueError, match="k shape"):
        lightning_attn(q, q[:, :4], v, DECAY)
    with pytest.raises(ValueError, match="backend"):
        lightning_attn(q, q, v, DECAY, backend="cuda")
    with pytest.raises(ValueError, match="chunk_size"):
        lightning_attn(q, q, v, DECAY, chunk_size=48)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("dims", [(64, 64), (128, 128), (256, 48)])
def test_compiled_triton_on_gpu_matches_chunked_path(dtype: torch.dtype, dims: tuple[int, int]) -> None:
    """Compiled kernels (tf32 / bf16 tensor-core dots, fp32 accumulation) against the fp32 chunked
    path, with packed documents and a tail block; runs only where CUDA is available."""
    K, V = dims
    cu = torch.tensor([0, 700, 701, 2000, 2333], dtype=torch.int32, device="cuda")
    TT, N, H = 2333, 4, 4
    g = torch.Generator(device="cuda").manual_seed(0)
    r = lambda *s: torch.randn(*s, device="cuda", generator=g)
    q, k, v = r(1, TT, H, K) * 0.5, r(1, TT, H, K) * 0.5, r(1, TT, H, V)
    x = {"q": q, "k": k, "v": v, "h0": r(N, H, K, V), "do": r(1, TT, H, V), "dht": r(N, H, K, V)}
    decay = torch.tensor([-0.5, -0.05, -0.005, 0.0], device="cuda")

    def op(q, k, v, h0, backend):
        return lightning_attn(
            q, k, v, decay, initial_state=h0, output_final_state=True, cu_seqlens=cu, backend=backend
        )

    got = _run(op, x, dtype=dtype, backend="triton")
    ref = _run(op, x, backend="torch")
    _check(got, ref, 2e-2 if dtype == torch.bfloat16 else 5e-3, f"gpu {dtype} {dims}")


@pytest.mark.parametrize("T", [63, 100])
def test_slice_state_is_the_affine_map_of_the_slice(T):
    """(λ^T, E) from `lightning_slice_state` reproduce the naive final state from any initial state,
    and E restricted to trailing tokens is the final state of that last document alone; gradients
    of E match the naive recurrence's."""
    x = _inputs(T)
    decay_T, E = lightning_slice_state(x["k"], x["v"], DECAY)
    _, naive_final = naive_lightning_attn(
        x["q"], x["k"], x["v"], DECAY, initial_state=x["h0"], output_final_state=True, dtype=torch.float64
    )
    assert_rel_rmse(decay_T[None, :, None, None] * x["h0"] + E, naive_final, TOL, "λ^T S0 + E")
    lengths = torch.tensor([T, 17])
    k, v = (x[n].clone().requires_grad_() for n in ("k", "v"))
    _, E = lightning_slice_state(k, v, DECAY, lengths)
    (E * x["dht"]).sum().backward()
    for b in range(2):
        kb, vb = (x[n][b : b + 1, T - lengths[b] :].clone().requires_grad_() for n in ("k", "v"))
        _, ref = naive_lightning_attn(
            x["q"][b : b + 1, T - lengths[b] :], kb, vb, DECAY, output_final_state=True, dtype=torch.float64
        )
        (ref * x["dht"][b : b + 1]).sum().backward()
        assert_rel_rmse(E[b : b + 1], ref, TOL, f"E row {b}")
        assert_rel_rmse(k.grad[b : b + 1, T - lengths[b] :], kb.grad, TOL, f"dk row {b}")
        assert_rel_rmse(v.grad[b : b + 1, T - lengths[b] :], vb.grad, TOL, f"dv row {b}")
        assert not k.grad[b, : T - lengths[b]].any()  # tokens of earlier documents do not count
