"""gla_attn: the Triton kernels (interpreter on CPU) and the chunked PyTorch path against the naive
recurrence in fp64 (o, final state and the gradients of q, k, v, g and the initial state), strong
gates, packed documents, split sequences, the decoding step, a slice's affine map (sequence
parallelism), fla's reference, input validation."""

from __future__ import annotations

import functools

import pytest
import torch
from helpers import assert_rel_rmse

from lmstack_kernels.gla import gla_attn, gla_slice_state
from lmstack_kernels.gla.naive import naive_gla

TOL = 1e-5  # fp32 against an fp64 reference
SHAPES = {63: (16, 32), 100: (32, 24), 129: (8, 32)}  # T -> (K, V); B = H = 2
NAMES = ("o", "final_state", "dq", "dk", "dv", "dg", "d_initial_state")
INPUTS = ("q", "k", "v", "g", "h0")


def _gates(B: int, T: int, H: int, K: int, gen: torch.Generator) -> torch.Tensor:
    """Log gates ≤ 0 of three kinds along K: strong (down to −20 per step: a 64-token chunk sums to
    about −640), near 0 (long memory), and in between; one strong channel alternates −20 and ~0 in
    time, so that small gate sums sit next to large ones."""
    u = torch.rand(B, T, H, K, generator=gen)
    g = -3 * u
    q = max(1, K // 4)
    g[..., :q] = -20 * u[..., :q]
    g[..., q : 2 * q] = -1e-3 * u[..., q : 2 * q]
    g[:, 1::2, :, 0] = -1e-3 * u[:, 1::2, :, 0]
    return g


def _inputs(T: int, B: int = 2, H: int = 2, seed: int = 0, N: int | None = None) -> dict[str, torch.Tensor]:
    K, V = SHAPES.get(T, (16, 32))
    gen = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=gen)
    n = B if N is None else N
    return {
        "q": r(B, T, H, K), "k": r(B, T, H, K), "v": r(B, T, H, V), "g": _gates(B, T, H, K, gen),
        "h0": r(n, H, K, V), "do": r(B, T, H, V), "dht": r(n, H, K, V),
    }  # fmt: skip


def _run(fn, x: dict[str, torch.Tensor], dtype=torch.float32, **kw) -> list[torch.Tensor]:
    """Forward, then backward of <o, do> + <final state, dht>; returns o, final state and grads."""
    args = [x[n].detach().to(dtype, copy=True).requires_grad_() for n in INPUTS]
    o, ht = fn(*args, **kw)
    ((o.double() * x["do"].double()).sum() + (ht.double() * x["dht"].double()).sum()).backward()
    return [o.detach(), ht.detach(), *(a.grad for a in args)]


def _op(q, k, v, g, h0, backend, cu_seqlens=None, scale=None):
    return gla_attn(
        q, k, v, g, scale=scale, initial_state=h0, output_final_state=True, cu_seqlens=cu_seqlens,
        backend=backend,
    )  # fmt: skip


def _naive(q, k, v, g, h0, cu_seqlens=None):
    return naive_gla(q, k, v, g, None, h0, True, cu_seqlens, dtype=torch.float64)


@functools.cache
def _reference(T: int) -> list[torch.Tensor]:
    return _run(_naive, _inputs(T), dtype=torch.float64)


def _check(got: list[torch.Tensor], ref: list[torch.Tensor], tol: float, what: str, names=NAMES) -> None:
    for name, a, r in zip(names, got, ref):
        assert torch.isfinite(a).all(), f"{what} {name}: inf or NaN"
        assert_rel_rmse(a, r, tol, f"{what} {name}")


@pytest.mark.parametrize("T", sorted(SHAPES))
def test_triton_matches_naive(T: int) -> None:
    _check(_run(_op, _inputs(T), backend="triton"), _reference(T), TOL, f"triton T={T}")


@pytest.mark.parametrize("T", sorted(SHAPES))
def test_chunk_matches_naive(T: int) -> None:
    _check(_run(_op, _inputs(T), backend="torch"), _reference(T), TOL, f"torch T={T}")


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_saturated_gates_reset_the_state(backend: str) -> None:
    """g = −1000 forgets everything at every step (exp underflows to 0): o_t = scale (q_t·k_t) v_t,
    with no inf/NaN in the output or any gradient. The true dg is then exactly 0, so it is checked
    against the size of the terms it is summed from (MATH.md, "Gradient of g": the Triton path's
    reverse running sum leaves an absolute error of a few ulp of those terms, times √T)."""
    x = _inputs(40)
    x["g"] = torch.full_like(x["g"], -1000.0)
    got = _run(_op, x, backend=backend)
    ref = _run(_naive, x, dtype=torch.float64)
    q, k, v = x["q"], x["k"], x["v"]
    expected = (q * k).sum(-1, keepdim=True) * v * q.shape[-1] ** -0.5
    _check(got[:1], [expected], TOL, f"{backend} saturated o")
    dg, ref_dg = got.pop(5), ref.pop(5)
    _check(got, ref, TOL, f"{backend} saturated", names=NAMES[:5] + NAMES[6:])
    assert torch.isfinite(dg).all()
    assert (dg - ref_dg).abs().max() < 1e-5 * (q * got[2]).pow(2).mean().sqrt(), "saturated dg"


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_default_scale_and_no_state(backend: str) -> None:
    x = _inputs(100)
    q, k, v, g = x["q"], x["k"], x["v"], x["g"]
    o, ht = gla_attn(q, k, v, g, backend=backend)
    assert ht is None
    ref, _ = naive_gla(q, k, v, g, dtype=torch.float64)
    assert_rel_rmse(o, ref, TOL, f"{backend} o")
    o2, _ = gla_attn(q, k, v, g, scale=1.0, backend=backend)
    assert_rel_rmse(o2, ref * q.shape[-1] ** 0.5, TOL, f"{backend} o, scale=1")


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_low_precision_inputs(backend: str) -> None:
    x = _inputs(63)
    for dtype in (torch.bfloat16, torch.float16):
        q, k, v, g = (x[n].to(dtype) for n in ("q", "k", "v", "g"))
        o, ht = gla_attn(q, k, v, g, initial_state=x["h0"], output_final_state=True, backend=backend)
        ref_o, ref_h = naive_gla(q, k, v, g, None, x["h0"], True, dtype=torch.float64)
        assert o.dtype == dtype and ht.dtype == torch.float32
        assert_rel_rmse(o, ref_o, 1e-2, f"{backend} {dtype} o")
        assert_rel_rmse(ht, ref_h, 1e-4, f"{backend} {dtype} final state")


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_packed_documents_match_per_document_loop(backend: str) -> None:
    # Documents of 17, 0 (empty), 46, 37 and 1 tokens packed in one row; each has its own initial state.
    lengths = [17, 0, 46, 37, 1]
    cu = torch.tensor([0] + lengths).cumsum(0).to(torch.int32)
    N = len(lengths)
    x = _inputs(sum(lengths), B=1, N=N)
    got = _run(_op, x, backend=backend, cu_seqlens=cu)

    def per_document(q, k, v, g, h0):
        outs, finals = [], []
        for n in range(N):
            s, e = cu[n].item(), cu[n + 1].item()
            if s == e:
                finals.append(h0[n : n + 1])
                continue
            o, ht = _op(q[:, s:e], k[:, s:e], v[:, s:e], g[:, s:e], h0[n : n + 1], backend)
            outs.append(o)
            finals.append(ht)
        return torch.cat(outs, 1), torch.cat(finals, 0)

    _check(got, _run(per_document, x), TOL, f"{backend} packed")
    # ... and the packed run agrees with the naive recurrence too.
    naive = _run(functools.partial(_naive, cu_seqlens=cu), x, dtype=torch.float64)
    _check(got, naive, TOL, f"{backend} packed vs naive")


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_split_sequence_equals_whole(backend: str) -> None:
    """Run 0..t1 then t1..T from the first part's final state; gradients flow through the state."""
    x, t1 = _inputs(100), 45

    def split(q, k, v, g, h0):
        o1, h1 = _op(q[:, :t1], k[:, :t1], v[:, :t1], g[:, :t1], h0, backend)
        o2, h2 = _op(q[:, t1:], k[:, t1:], v[:, t1:], g[:, t1:], h1, backend)
        return torch.cat([o1, o2], 1), h2

    _check(_run(split, x), _reference(100), TOL, f"{backend} split")


def test_decode_steps_equal_chunk_path() -> None:
    """T = 1 takes the recurrent step (whatever the backend); token-by-token decoding with the state
    handed over equals the chunked path, forward and gradients."""
    x = _inputs(37)

    def decode(q, k, v, g, h0):
        outs, h = [], h0
        for t in range(q.shape[1]):
            o, h = _op(q[:, t : t + 1], k[:, t : t + 1], v[:, t : t + 1], g[:, t : t + 1], h, "triton")
            outs.append(o)
        return torch.cat(outs, 1), h

    _check(_run(decode, x), _run(_op, x, backend="torch"), TOL, "decode")


@pytest.mark.parametrize("T", [63, 100])
def test_slice_state_is_the_affine_map_of_the_slice(T: int) -> None:
    """(exp Σg, E) from `gla_slice_state` reproduce the naive final state from any initial state
    (strong gates included), and E restricted to trailing tokens is the final state of that last
    document alone; gradients of k, v and g match the naive recurrence's."""
    x = _inputs(T)
    gates, E = gla_slice_state(x["k"], x["v"], x["g"])
    _, naive_final = _naive(*(x[n] for n in INPUTS))
    assert_rel_rmse(gates[..., None] * x["h0"] + E, naive_final, TOL, "exp(Σg) S0 + E")
    lengths = torch.tensor([T, 17])
    k, v, g = (x[n].clone().requires_grad_() for n in ("k", "v", "g"))
    _, E = gla_slice_state(k, v, g, lengths)
    (E * x["dht"]).sum().backward()
    for b in range(2):
        tail = slice(T - int(lengths[b]), T)
        kb, vb, gb = (x[n][b : b + 1, tail].clone().requires_grad_() for n in ("k", "v", "g"))
        _, ref = _naive(x["q"][b : b + 1, tail], kb, vb, gb, None)
        (ref * x["dht"][b : b + 1]).sum().backward()
        assert_rel_rmse(E[b : b + 1], ref, TOL, f"E row {b}")
        for name, got, want in (("dk", k, kb), ("dv", v, vb), ("dg", g, gb)):
            assert_rel_rmse(got.grad[b : b + 1, tail], want.grad, TOL, f"{name} row {b}")
            assert not got.grad[b, : tail.start].any()  # tokens of earlier documents do not count


def test_matches_fla_reference() -> None:
    """The convention is flash-linear-attention's: its naive recurrence (fla 0.6.0, [B, T, H, D],
    scale K^-1/2) gives the same output and final state."""
    fla_naive = pytest.importorskip("fla.ops.gla.naive")
    x = _inputs(63)
    q, k, v, g, h0 = (x[n] for n in INPUTS)
    ref_o, ref_h = fla_naive.naive_recurrent_gla(q, k, v, g, initial_state=h0, output_final_state=True)
    o, ht = gla_attn(q, k, v, g, initial_state=h0, output_final_state=True, backend="torch")
    assert_rel_rmse(o, ref_o, TOL, "o vs fla")
    assert_rel_rmse(ht, ref_h, TOL, "final state vs fla")


@pytest.mark.parametrize("dims", [(300, 32), (32, 512)])
def test_head_dim_out_of_range_raises(dims: tuple[int, int]) -> None:
    K, V = dims
    q, v = torch.randn(1, 8, 2, K), torch.randn(1, 8, 2, V)
    with pytest.raises(ValueError, match="head dim"):
        gla_attn(q, q, v, -torch.rand_like(q))


def test_invalid_inputs_raise() -> None:
    q, v = torch.randn(2, 8, 2, 16), torch.randn(2, 8, 2, 16)
    g = -torch.rand_like(q)
    bad_g = g.clone()
    bad_g[1, 3, 0, 5] = 0.5
    nan_g = g.clone()
    nan_g[0, 0, 0, 0] = float("nan")
    cases = [
        ({"g": bad_g}, "g holds log forget gates and must be ≤ 0"),
        ({"g": nan_g}, "g holds log forget gates"),
        ({"g": g[..., :8]}, "g must be a float tensor"),
        ({"g": g.double()}, "g must be a float tensor"),
        ({"q": q[0]}, "q must be a 4-D tensor"),
        ({"q": q.double(), "k": q.double(), "v": v.double()}, "dtype"),
        ({"k": q[:, :4]}, "k shape"),
        ({"v": v[:, :4]}, "v shape"),
        ({"v": v.half()}, "dtypes differ"),
        ({"initial_state": torch.zeros(1, 2, 16, 16)}, "initial_state"),
        ({"cu_seqlens": torch.tensor([0, 8])}, "B = 1"),
        ({"backend": "cuda"}, "backend"),
    ]
    for override, match in cases:
        args = {"q": q, "k": q, "v": v, "g": g} | override
        with pytest.raises(ValueError, match=match):
            gla_attn(**args)
    one = {"q": q[:1], "k": q[:1], "v": v[:1], "g": g[:1]}
    with pytest.raises(ValueError, match="cu_seqlens must rise from 0 to T"):
        gla_attn(**one, cu_seqlens=torch.tensor([0, 5]))
    with pytest.raises(ValueError, match="cu_seqlens must be a 1-D integer tensor"):
        gla_attn(**one, cu_seqlens=torch.tensor([0.0, 8.0]))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("dims", [(64, 64), (128, 128), (256, 48), (8, 24)])
def test_compiled_triton_on_gpu_matches_chunked_path(dtype: torch.dtype, dims: tuple[int, int]) -> None:
    """Compiled kernels (tf32 / bf16 tensor-core dots, fp32 accumulation) against the fp32 chunked
    path, with packed documents, strong gates and a tail chunk; runs only where CUDA is available."""
    K, V = dims
    cu = torch.tensor([0, 700, 701, 2000, 2333], dtype=torch.int32, device="cuda")
    TT, N, H = 2333, 4, 4
    gen = torch.Generator(device="cuda").manual_seed(0)
    r = lambda *s: torch.randn(*s, device="cuda", generator=gen)
    g = torch.nn.functional.logsigmoid(r(1, TT, H, K)) / 16
    g[..., : K // 4] *= 100  # strong gates on some channels
    x = {
        "q": r(1, TT, H, K) * 0.5, "k": r(1, TT, H, K) * 0.5, "v": r(1, TT, H, V), "g": g,
        "h0": r(N, H, K, V), "do": r(1, TT, H, V), "dht": r(N, H, K, V),
    }  # fmt: skip
    got = _run(_op, x, dtype=dtype, backend="triton", cu_seqlens=cu)
    ref = _run(_op, x, backend="torch", cu_seqlens=cu)
    _check(got, ref, 2e-2 if dtype == torch.bfloat16 else 5e-3, f"gpu {dtype} {dims}")
