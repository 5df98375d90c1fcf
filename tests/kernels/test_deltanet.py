"""delta_rule_attn: the Triton kernels (interpreter on CPU) and the chunked PyTorch path against the
naive recurrence (and once against fla's), packed documents, split sequences, input validation (the
tests every op shares: `op_contract.py`), 16-bit inputs, the decoding step, the affine map of a
segment."""

from __future__ import annotations

import functools

import pytest
import torch
import torch.nn.functional as F
from helpers import assert_rel_rmse
from op_contract import BACKENDS, TOL, OpContract, assert_all_close

import lmstack_kernels.deltanet as deltanet
from lmstack_kernels.deltanet import delta_rule_affine_map, delta_rule_attn
from lmstack_kernels.deltanet.naive import naive_delta_rule


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


class TestDeltaNet(OpContract):
    attn = staticmethod(delta_rule_attn)
    naive_fn = staticmethod(naive_delta_rule)
    inputs = ("q", "k", "v", "beta", "h0")
    shapes = {63: (16, 32), 100: (32, 16), 129: (24, 32)}  # T -> (K, V); K = 24 pads the key tile
    bad_dims = ((8, 32), (32, 8), (320, 32), (32, 512))
    chunk_small, chunk_large = {"chunk_size": 16}, {"chunk_size": 32}

    def op_inputs(self, T, B, H, K, V, r, gen):
        """L2-normalised q, k (the op's precondition); β in (0, 1) for head 0 and (0, 2) (negative
        eigenvalues of the transition) for head 1."""
        beta = torch.rand(B, T, H, generator=gen) * torch.tensor([1.0, 2.0])[:H]
        q, k = F.normalize(r(B, T, H, K), dim=-1), F.normalize(r(B, T, H, K), dim=-1)
        return {"q": q, "k": k, "v": r(B, T, H, V), "beta": beta}

    def gpu_op_inputs(self, TT, H, K, V, r, gen):
        q, k = F.normalize(r(1, TT, H, K), dim=-1), F.normalize(r(1, TT, H, K), dim=-1)
        return {
            "q": q,
            "k": k,
            "v": r(1, TT, H, V),
            "beta": torch.rand(1, TT, H, device="cuda", generator=gen),
        }

    def own_input(self, q):
        return torch.rand(q.shape[:3])

    def invalid_cases(self, q, v):
        beta = self.own_input(q)
        return [
            ({"beta": beta[..., :1]}, r"beta must be a float tensor \[B, T, H\]"),
            ({"beta": beta + 2.5}, r"beta must lie in \[0, 2\]"),
            ({"chunk_size": 48}, "chunk_size"),
        ]

    def test_affine_map_refuses_bad_beta(self) -> None:
        q, v = torch.randn(2, 8, 2, 16), torch.randn(2, 8, 2, 16)
        with pytest.raises(ValueError, match="beta must lie"):
            delta_rule_affine_map(q, v, -self.own_input(q))

    def test_naive_matches_fla_reference(self) -> None:
        """Our convention is fla's: its naive recurrence is head-first [B, H, T, D], scale K^-1/2."""
        fla_naive = pytest.importorskip("fla.ops.delta_rule.naive")
        x = self.make_inputs(63)
        q, k, v, beta, h0 = (x[n].double() for n in self.inputs)
        head_first = lambda t: t.transpose(1, 2).contiguous()
        o_fla, ht_fla = fla_naive.delta_rule_recurrence(
            head_first(q), head_first(k), head_first(v), head_first(beta), initial_state=h0
        )
        o, ht = delta_rule_attn(
            *(t.float() for t in (q, k, v, beta)), initial_state=h0, output_final_state=True
        )
        assert_rel_rmse(o, o_fla.transpose(1, 2), TOL, "o vs fla")
        assert_rel_rmse(ht, ht_fla, TOL, "final state vs fla")

    @pytest.mark.parametrize("backend", BACKENDS)
    def test_low_precision_inputs(self, backend: str) -> None:
        """16-bit inputs run (fla refuses fp32, we refuse nothing): computed in fp32 inside, so o and the
        gradients carry only their own 16-bit rounding (~4e-3 relative for bf16) and the fp32 final state
        almost none. The reference is the fp64 recurrence on the same rounded inputs."""
        x = self.make_inputs(63)
        cases = ((torch.bfloat16, 1e-2), (torch.float16, 2e-3))
        for dtype, tol in cases[: 1 if backend == "triton" else 2]:  # the interpreter is slow: bf16 only
            rounded = {n: t.to(dtype) for n, t in x.items()}
            got = self.run(self.op, rounded, dtype=dtype, backend=backend, chunk_size=32)
            ref = self.run(self.naive, rounded, dtype=torch.float64)
            assert got[0].dtype == dtype and got[1].dtype == torch.float32 and got[5].dtype == dtype
            assert_all_close(got, ref, tol, f"{backend} {dtype}", self.outputs)
            assert_rel_rmse(got[1], ref[1], 1e-5, f"{backend} {dtype} final state")

    @pytest.mark.parametrize("backend", BACKENDS)
    def test_decode_steps_equal_the_chunk_path(self, backend: str, monkeypatch: pytest.MonkeyPatch) -> None:
        """Prefill 40 tokens, then decode one token at a time from the state: the same o, final state and
        gradients as one chunked pass, and no single-token call reaches a chunk kernel."""
        x, t0 = self.make_inputs(63), 40
        whole = self.run(self.op, x, backend="torch", chunk_size=16)
        chunked = deltanet.chunk_delta_rule

        def prefill_then_steps(q, k, v, beta, h0):
            o, h = self.op(q[:, :t0], k[:, :t0], v[:, :t0], beta[:, :t0], h0, backend=backend, chunk_size=16)
            outs = [o]
            with monkeypatch.context() as m:
                m.setattr(deltanet, "chunk_delta_rule", None)  # a call would raise TypeError
                m.setattr(deltanet, "_triton_path", None)
                for t in range(t0, q.shape[1]):
                    o, h = self.op(*(a[:, t : t + 1] for a in (q, k, v, beta)), h, backend=backend)
                    outs.append(o)
            assert deltanet.chunk_delta_rule is chunked
            return torch.cat(outs, 1), h

        assert_all_close(self.run(prefill_then_steps, x), whole, TOL, f"{backend} decode", self.outputs)

    def test_affine_map_matches_explicit_product(self) -> None:
        x = self.make_inputs(63)
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

    def test_affine_maps_of_slices_compose_to_the_whole(self) -> None:
        """Three slices (the middle one inside a single block) compose to the whole sequence's map, in
        values and in gradients for k, v and beta."""
        x, cuts = self.make_inputs(100), (0, 37, 45, 100)
        whole = _affine_grads(lambda k, v, b: delta_rule_affine_map(k, v, b, chunk_size=16), x)

        def composed(k, v, beta):
            maps = [
                delta_rule_affine_map(k[:, s:e], v[:, s:e], beta[:, s:e], chunk_size=16)
                for s, e in zip(cuts, cuts[1:])
            ]
            return functools.reduce(_compose, maps)

        assert_all_close(_affine_grads(composed, x), whole, TOL, "composed", AFFINE)

    def test_affine_map_applied_to_a_state_equals_running_from_it(self) -> None:
        """P · S_in + E is the op's final state from S_in, with the same gradients for k, v, beta, S_in."""
        x = self.make_inputs(129)
        x["do"] = torch.zeros_like(x["do"])  # the map carries no output: compare state gradients only

        def through_map(q, k, v, beta, h0):
            P, E = delta_rule_affine_map(k, v, beta, chunk_size=32)
            return q.new_zeros(x["do"].shape), P @ h0 + E  # o is not part of the map

        keep = [1, 3, 4, 5, 6]  # final state, dk, dv, dbeta, d_initial_state
        pick = lambda xs: [xs[i] for i in keep]
        got, ref = self.run(through_map, x), self.run(self.op, x, backend="torch", chunk_size=32)
        assert_all_close(pick(got), pick(ref), TOL, "P S_in + E", pick(self.outputs))

    def test_affine_map_of_packed_documents(self) -> None:
        lengths = [17, 0, 46]
        cu = torch.tensor([0] + lengths).cumsum(0).to(torch.int32)
        x = self.make_inputs(sum(lengths), B=1)
        k, v, beta = x["k"], x["v"], x["beta"]
        P, E = delta_rule_affine_map(k, v, beta, cu_seqlens=cu, chunk_size=16)
        for n, (s, e) in enumerate(zip(cu.tolist(), cu.tolist()[1:])):
            Pn, En = delta_rule_affine_map(k[:, s:e], v[:, s:e], beta[:, s:e], chunk_size=16)
            assert_rel_rmse(P[n : n + 1], Pn, TOL, f"P of document {n}")
            assert_rel_rmse(E[n : n + 1], En, TOL, f"E of document {n}")
        K = k.shape[-1]
        assert torch.equal(P[1], torch.eye(K).expand(2, K, K)) and not E[1].any()  # the empty document
