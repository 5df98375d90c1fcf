"""delta_rule_attn: the Triton kernels (interpreter on CPU) and the chunked PyTorch path against the
naive recurrence (and once against fla's), packed documents, split sequences, the decoding step, the
affine map of a segment, input validation."""

from __future__ import annotations

import functools

import pytest
import torch
import torch.nn.functional as F
from helpers import assert_rel_rmse

import lmstack_kernels.deltanet as deltanet
from lmstack_kernels.deltanet import delta_rule_affine_map, delta_rule_attn
from lmstack_kernels.deltanet.naive import naive_delta_rule

TOL = 1e-5  # fp32 against an fp64 reference
SHAPES = {63: (16, 32), 100: (32, 16), 129: (24, 32)}  # T -> (K, V); K = 24 pads the key tile
NAMES = ("o", "final_state", "dq", "dk", "dv", "dbeta", "d_initial_state")
INPUTS = ("q", "k", "v", "beta", "h0")


def _inputs(T: int, B: int = 2, H: int = 2, seed: int = 0) -> dict[str, torch.Tensor]:
    """L2-normalised q, k (the op's precondition); β in (0, 1) for head 0 and (0, 2) (negative
    eigenvalues of the transition) for head 1."""
    K, V = SHAPES.get(T, (16, 32))
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g)
    beta = torch.rand(B, T, H, generator=g) * torch.tensor([1.0, 2.0])[:H]
    return {
        "q": F.normalize(r(B, T, H, K), dim=-1), "k": F.normalize(r(B, T, H, K), dim=-1),
        "v": r(B, T, H, V), "beta": beta, "h0": r(B, H, K, V), "do": r(B, T, H, V), "dht": r(B, H, K, V),
    }  # fmt: skip


def _run(fn, x: dict[str, torch.Tensor], dtype=torch.float32, **kw) -> list[torch.Tensor]:
    """Forward, then backward of <o, do> + <final state, dht>; returns o, final state and grads."""
    leaves = [x[n].detach().to(dtype, copy=True).requires_grad_() for n in INPUTS]
    o, ht = fn(*leaves, **kw)
    ((o.double() * x["do"].double()).sum() + (ht.double() * x["dht"].double()).sum()).backward()
    return [o.detach(), ht.detach()] + [t.grad for t in leaves]


def _op(q, k, v, beta, h0, backend, chunk_size=None, cu_seqlens=None, scale=None):
    return delta_rule_attn(
        q, k, v, beta, scale=scale, initial_state=h0, output_final_state=True,
        cu_seqlens=cu_seqlens, backend=backend, chunk_size=chunk_size,
    )  # fmt: skip


def _naive(q, k, v, beta, h0, cu_seqlens=None):
    return naive_delta_rule(q, k, v, beta, None, h0, True, cu_seqlens, dtype=torch.float64)


@functools.cache
def _reference(T: int) -> list[torch.Tensor]:
    return _run(_naive, _inputs(T), dtype=torch.float64)


def _check(got: list[torch.Tensor], ref: list[torch.Tensor], tol: float, what: str, names=NAMES) -> None:
    for name, a, r in zip(names, got, ref):
        assert_rel_rmse(a, r, tol, f"{what} {name}")


@pytest.mark.parametrize("T", sorted(SHAPES))
def test_triton_matches_naive(T: int) -> None:
    # chunk_size 32: several blocks per sequence; T = 63, 100, 129 end in a masked partial block.
    got = _run(_op, _inputs(T), backend="triton", chunk_size=32)
    _check(got, _reference(T), TOL, f"triton T={T}")


@pytest.mark.parametrize("T", sorted(SHAPES))
def test_chunk_matches_naive(T: int) -> None:
    got = _run(_op, _inputs(T), backend="torch", chunk_size=16)
    _check(got, _reference(T), TOL, f"torch T={T}")


def test_naive_matches_fla_reference() -> None:
    """Our convention is fla's: its naive recurrence is head-first [B, H, T, D], scale K^-1/2."""
    fla_naive = pytest.importorskip("fla.ops.delta_rule.naive")
    x = _inputs(63)
    q, k, v, beta, h0 = (x[n].double() for n in INPUTS)
    head_first = lambda t: t.transpose(1, 2).contiguous()
    o_fla, ht_fla = fla_naive.delta_rule_recurrence(
        head_first(q), head_first(k), head_first(v), head_first(beta), initial_state=h0
    )
    o, ht = delta_rule_attn(*(t.float() for t in (q, k, v, beta)), initial_state=h0, output_final_state=True)
    assert_rel_rmse(o, o_fla.transpose(1, 2), TOL, "o vs fla")
    assert_rel_rmse(ht, ht_fla, TOL, "final state vs fla")


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_default_chunk_scale_and_no_state(backend: str) -> None:
    x = _inputs(100)
    q, k, v, beta = (x[n] for n in INPUTS[:4])
    o, ht = delta_rule_attn(q, k, v, beta, backend=backend)
    assert ht is None
    ref, _ = naive_delta_rule(q, k, v, beta, dtype=torch.float64)
    assert_rel_rmse(o, ref, TOL, f"{backend} o")
    o2, _ = delta_rule_attn(q, k, v, beta, scale=1.0, backend=backend)
    assert_rel_rmse(o2, ref * q.shape[-1] ** 0.5, TOL, f"{backend} o, scale=1")


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_low_precision_inputs(backend: str) -> None:
    """16-bit inputs run (fla refuses fp32, we refuse nothing): computed in fp32 inside, so o and the
    gradients carry only their own 16-bit rounding (~4e-3 relative for bf16) and the fp32 final state
    almost none. The reference is the fp64 recurrence on the same rounded inputs."""
    x = _inputs(63)
    cases = ((torch.bfloat16, 1e-2), (torch.float16, 2e-3))
    for dtype, tol in cases[: 1 if backend == "triton" else 2]:  # the interpreter is slow: bf16 only
        rounded = {n: t.to(dtype) for n, t in x.items()}
        got = _run(_op, rounded, dtype=dtype, backend=backend, chunk_size=32)
        ref = _run(_naive, rounded, dtype=torch.float64)
        assert got[0].dtype == dtype and got[1].dtype == torch.float32 and got[5].dtype == dtype
        _check(got, ref, tol, f"{backend} {dtype}")
        assert_rel_rmse(got[1], ref[1], 1e-5, f"{backend} {dtype} final state")


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

    def per_document(q, k, v, beta, h0):
        outs, finals = [], []
        for n in range(N):
            s, e = cu[n].item(), cu[n + 1].item()
            if s == e:
                finals.append(h0[n : n + 1])
                continue
            o, ht = _op(q[:, s:e], k[:, s:e], v[:, s:e], beta[:, s:e], h0[n : n + 1], backend, 16)
            outs.append(o)
            finals.append(ht)
        return torch.cat(outs, 1), torch.cat(finals, 0)

    _check(got, _run(per_document, x), TOL, f"{backend} packed")
    # ... and the packed run agrees with the naive recurrence too.
    naive = _naive(*(x[n].double() for n in INPUTS), cu_seqlens=cu)
    _check(got[:2], list(naive), TOL, f"{backend} packed vs naive")


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_split_sequence_equals_whole(backend: str) -> None:
    """Run 0..t1 then t1..T from the first part's final state; gradients flow through the state."""
    x, t1 = _inputs(100), 45

    def split(q, k, v, beta, h0):
        o1, h1 = _op(q[:, :t1], k[:, :t1], v[:, :t1], beta[:, :t1], h0, backend, 32)
        o2, h2 = _op(q[:, t1:], k[:, t1:], v[:, t1:], beta[:, t1:], h1, backend, 32)
        return torch.cat([o1, o2], 1), h2

    _check(_run(split, x), _run(_op, x, backend=backend, chunk_size=32), TOL, f"{backend} split")


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_decode_steps_equal_the_chunk_path(backend: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Prefill 40 tokens, then decode one token at a time from the state: the same o, final state and
    gradients as one chunked pass, and no single-token call reaches a chunk kernel."""
    x, t0 = _inputs(63), 40
    whole = _run(_op, x, backend="torch", chunk_size=16)
    chunked = deltanet.chunk_delta_rule

    def prefill_then_steps(q, k, v, beta, h0):
        o, h = _op(q[:, :t0], k[:, :t0], v[:, :t0], beta[:, :t0], h0, backend, 16)
        outs = [o]
        with monkeypatch.context() as m:
            m.setattr(deltanet, "chunk_delta_rule", None)  # a call would raise TypeError
            m.setattr(deltanet, "_triton_path", None)
            for t in range(t0, q.shape[1]):
                o, h = _op(q[:, t : t + 1], k[:, t : t + 1], v[:, t : t + 1], beta[:, t : t + 1], h, backend)
                outs.append(o)
        assert deltanet.chunk_delta_rule is chunked
        return torch.cat(outs, 1), h

    _check(_run(prefill_then_steps, x), whole, TOL, f"{backend} decode")


def _compose(first: tuple[torch.Tensor, torch.Tensor], then: tuple[torch.Tensor, torch.Tensor]):
    """The affine map of two consecutive slices: S ↦ P2 (P1 S + E1) + E2."""
    (P1, E1), (P2, E2) = first, then
    return P2 @ P1, P2 @ E1 + E2


def _affine_grads(fn, x: dict[str, torch.Tensor]) -> list[torch.Tensor]:
    """(P, E) of fn(k, v, beta) and the gradients of <P, gP> + <E, gE> for k, v, beta."""
    k, v, beta = (x[n].detach().clone().requires_grad_() for n in ("k", "v", "beta"))
    P, E = fn(k, v, beta)
    gen = torch.Generator().manual_seed(1)
    (
        (P * torch.randn(P.shape, generator=gen)).sum() + (E * torch.randn(E.shape, generator=gen)).sum()
    ).backward()
    return [P.detach(), E.detach(), k.grad, v.grad, beta.grad]


AFFINE = ("P", "E", "dk", "dv", "dbeta")


def test_affine_map_matches_explicit_product() -> None:
    x = _inputs(63)
    k, v, beta = (x[n].double() for n in ("k", "v", "beta"))
    P, E = delta_rule_affine_map(*(t.float() for t in (k, v, beta)), chunk_size=16)
    K = k.shape[-1]
    ref = torch.eye(K, dtype=torch.float64).expand(*k.shape[::2], K, K)  # [B, H, K, K]
    for t in range(k.shape[1]):
        kt = k[:, t, :, :, None]
        ref = (
            torch.eye(K, dtype=torch.float64) - beta[:, t, :, None, None] * kt * kt.transpose(-1, -2)
        ) @ ref
    assert_rel_rmse(P, ref, TOL, "P vs the product of transitions")
    _, E_ref = naive_delta_rule(x["q"], k, v, beta, None, None, True, dtype=torch.float64)
    assert_rel_rmse(E, E_ref, TOL, "E vs the final state from zero")


def test_affine_maps_of_slices_compose_to_the_whole() -> None:
    """Three slices (the middle one inside a single block) compose to the whole sequence's map, in
    values and in gradients for k, v and beta."""
    x, cuts = _inputs(100), (0, 37, 45, 100)
    whole = _affine_grads(lambda k, v, b: delta_rule_affine_map(k, v, b, chunk_size=16), x)

    def composed(k, v, beta):
        maps = [
            delta_rule_affine_map(k[:, s:e], v[:, s:e], beta[:, s:e], chunk_size=16)
            for s, e in zip(cuts, cuts[1:])
        ]
        return functools.reduce(_compose, maps)

    _check(_affine_grads(composed, x), whole, TOL, "composed", AFFINE)


def test_affine_map_applied_to_a_state_equals_running_from_it() -> None:
    """P · S_in + E is the op's final state from S_in, with the same gradients for k, v, beta, S_in."""
    x = _inputs(129)
    x["do"] = torch.zeros_like(x["do"])  # the map carries no output: compare state gradients only

    def through_map(q, k, v, beta, h0):
        P, E = delta_rule_affine_map(k, v, beta, chunk_size=32)
        return q.new_zeros(x["do"].shape), P @ h0 + E  # o is not part of the map

    keep = [1, 3, 4, 5, 6]  # final state, dk, dv, dbeta, d_initial_state
    pick = lambda xs: [xs[i] for i in keep]
    got, ref = _run(through_map, x), _run(_op, x, backend="torch", chunk_size=32)
    _check(pick(got), pick(ref), TOL, "P S_in + E", pick(NAMES))


def test_affine_map_of_packed_documents() -> None:
    lengths = [17, 0, 46]
    cu = torch.tensor([0] + lengths).cumsum(0).to(torch.int32)
    x = _inputs(sum(lengths), B=1)
    k, v, beta = x["k"], x["v"], x["beta"]
    P, E = delta_rule_affine_map(k, v, beta, cu_seqlens=cu, chunk_size=16)
    for n, (s, e) in enumerate(zip(cu.tolist(), cu.tolist()[1:])):
        Pn, En = delta_rule_affine_map(k[:, s:e], v[:, s:e], beta[:, s:e], chunk_size=16)
        assert_rel_rmse(P[n : n + 1], Pn, TOL, f"P of document {n}")
        assert_rel_rmse(E[n : n + 1], En, TOL, f"E of document {n}")
    K = k.shape[-1]
    assert torch.equal(P[1], torch.eye(K).expand(2, K, K)) and not E[1].any()  # the empty document


@pytest.mark.parametrize("dims", [(8, 32), (32, 8), (320, 32), (32, 512)])
def test_head_dim_out_of_range_raises(dims: tuple[int, int]) -> None:
    K, V = dims
    q, v, beta = torch.randn(1, 8, 2, K), torch.randn(1, 8, 2, V), torch.rand(1, 8, 2)
    with pytest.raises(ValueError, match="head dim"):
        delta_rule_attn(q, q, v, beta)


def test_invalid_inputs_raise() -> None:
    q, v, beta = torch.randn(2, 8, 2, 16), torch.randn(2, 8, 2, 16), torch.rand(2, 8, 2)
    with pytest.raises(ValueError, match=r"beta must be a float tensor \[B, T, H\]"):
        delta_rule_attn(q, q, v, beta[..., :1])
    with pytest.raises(ValueError, match=r"beta must lie in \[0, 2\]"):
        delta_rule_attn(q, q, v, beta + 2.5)
    with pytest.raises(ValueError, match="beta must lie"):
        delta_rule_affine_map(q, v, -beta)
    with pytest.raises(ValueError, match="initial_state"):
        delta_rule_attn(q, q, v, beta, initial_state=torch.zeros(1, 2, 16, 16))
    with pytest.raises(ValueError, match="B = 1"):
        delta_rule_attn(q, q, v, beta, cu_seqlens=torch.tensor([0, 8]))
    with pytest.raises(ValueError, match="cu_seqlens"):
        delta_rule_attn(q[:1], q[:1], v[:1], beta[:1], cu_seqlens=torch.tensor([0, 5]))
    with pytest.raises(ValueError, match="dtype"):
        delta_rule_attn(q.double(), q.double(), v.double(), beta)
    with pytest.raises(ValueError, match="q shape"):
        delta_rule_attn(q, q[:, :4], v, beta)
    with pytest.raises(ValueError, match="backend"):
        delta_rule_attn(q, q, v, beta, backend="cuda")
    with pytest.raises(ValueError, match="chunk_size"):
        delta_rule_attn(q, q, v, beta, chunk_size=48)


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
    x = {
        "q": F.normalize(r(1, TT, H, K), dim=-1), "k": F.normalize(r(1, TT, H, K), dim=-1),
        "v": r(1, TT, H, V), "beta": torch.rand(1, TT, H, device="cuda", generator=g),
        "h0": r(N, H, K, V), "do": r(1, TT, H, V), "dht": r(N, H, K, V),
    }  # fmt: skip

    def op(q, k, v, beta, h0, backend):
        return _op(q, k, v, beta, h0, backend, cu_seqlens=cu)

    got = _run(op, x, dtype=dtype, backend="triton")
    ref = _run(op, x, backend="torch")
    _check(got, ref, 2e-2 if dtype == torch.bfloat16 else 5e-3, f"gpu {dtype} {dims}")
