"""gated_delta_rule_attn: the Triton kernels (interpreter on CPU) and the chunked PyTorch path against
the fp64 naive recurrence and fla's, packed documents, split sequences, strong decay, input validation
(the tests every op shares: `op_contract.py`), the decoding step, the affine map of a slice."""

from __future__ import annotations

import functools

import pytest
import torch
import torch.nn.functional as F
from helpers import assert_rel_rmse
from op_contract import BACKENDS, TOL, OpContract, assert_all_close

import lmstack_kernels.deltanet as deltanet  # the dispatch both delta rules share
from lmstack_kernels.gated_deltanet import (
    gated_delta_rule_affine_map,
    gated_delta_rule_attn,
    gated_delta_rule_step,
)
from lmstack_kernels.gated_deltanet.naive import naive_gated_delta_rule


def _compose(first: tuple[torch.Tensor, torch.Tensor], then: tuple[torch.Tensor, torch.Tensor]):
    """The affine map of two consecutive slices: S ↦ P2 (P1 S + E1) + E2."""
    (P1, E1), (P2, E2) = first, then
    return P2 @ P1, P2 @ E1 + E2


AFFINE_INPUTS = ("k", "v", "beta", "g")
AFFINE = ("P", "E", "dk", "dv", "dbeta", "dg")


def _affine_grads(fn, x: dict[str, torch.Tensor]) -> list[torch.Tensor]:
    """(P, E) of fn(k, v, beta, g) and the gradients of <P, gP> + <E, gE> for k, v, beta, g."""
    args = [x[n].detach().clone().requires_grad_() for n in AFFINE_INPUTS]
    P, E = fn(*args)
    gen = torch.Generator().manual_seed(1)
    (
        (P * torch.randn(P.shape, generator=gen)).sum() + (E * torch.randn(E.shape, generator=gen)).sum()
    ).backward()
    return [P.detach(), E.detach(), *(a.grad for a in args)]


class TestGatedDeltaNet(OpContract):
    attn = staticmethod(gated_delta_rule_attn)
    naive_fn = staticmethod(naive_gated_delta_rule)
    inputs = ("q", "k", "v", "beta", "g", "h0")
    shapes = {63: (16, 32), 100: (32, 16), 129: (24, 32)}  # T -> (K, V); K = 24 pads the key tile
    bad_dims = ((8, 32), (32, 8), (320, 32), (32, 512))
    chunk_small, chunk_large = {"chunk_size": 16}, {"chunk_size": 32}

    def op_inputs(self, T, B, H, K, V, r, gen):
        """L2-normalised q, k (the op's precondition); head 0: β in (0, 1), mild decay g in (−0.3, 0];
        head 1: β in (0, 2) (negative eigenvalues), decay g in (−3, 0] with every fifth token at −20
        (a near reset inside a block)."""
        beta = torch.rand(B, T, H, generator=gen) * torch.tensor([1.0, 2.0])[:H]
        g = -torch.rand(B, T, H, generator=gen) * torch.tensor([0.3, 3.0])[:H]
        g[:, ::5, 1:] = -20.0
        q, k = F.normalize(r(B, T, H, K), dim=-1), F.normalize(r(B, T, H, K), dim=-1)
        return {"q": q, "k": k, "v": r(B, T, H, V), "beta": beta, "g": g}

    def gpu_op_inputs(self, TT, H, K, V, r, gen):
        q, k = F.normalize(r(1, TT, H, K), dim=-1), F.normalize(r(1, TT, H, K), dim=-1)
        rand = lambda: torch.rand(1, TT, H, device="cuda", generator=gen)
        return {"q": q, "k": k, "v": r(1, TT, H, V), "beta": rand(), "g": -rand()}

    def own_input(self, q):
        return torch.rand(q.shape[:3])

    def own_inputs(self, q):
        return {"beta": torch.rand(q.shape[:3]), "g": -torch.rand(q.shape[:3])}

    def invalid_cases(self, q, v):
        beta, g = self.own_inputs(q).values()
        return [
            ({"beta": beta[..., :1]}, r"beta must be a float tensor \[B, T, H\]"),
            ({"beta": beta + 2.5}, r"beta must lie in \[0, 2\]"),
            ({"g": g[..., :1]}, r"g must be a float tensor \[B, T, H\]"),
            ({"g": g.long()}, r"g must be a float tensor"),
            ({"g": g + 1.5}, r"g must be a log decay, g <= 0"),
            ({"g": torch.full_like(g, float("nan"))}, r"g must be a log decay"),
            ({"chunk_size": 48}, "chunk_size"),
        ]

    def test_affine_map_and_step_refuse_bad_inputs(self) -> None:
        q, v = torch.randn(2, 8, 2, 16), torch.randn(2, 8, 2, 16)
        beta, g = self.own_inputs(q).values()
        with pytest.raises(ValueError, match="gated_delta_rule_affine_map: beta must lie"):
            gated_delta_rule_affine_map(q, v, -beta, g)
        with pytest.raises(ValueError, match="gated_delta_rule_affine_map: g must be a log decay"):
            gated_delta_rule_affine_map(q, v, beta, -g)
        with pytest.raises(ValueError, match="gated_delta_rule_step: q must hold one token"):
            gated_delta_rule_step(q, q, v, beta, g)

    def test_triton_with_sm80_blocks_matches_naive(self, monkeypatch: pytest.MonkeyPatch) -> None:
        # sm_80's fp32 backward at K = 256 runs at BT = 16 (shared memory; `launch_configs`) and
        # recomputes the states at those boundaries, while the forward runs at the op's 32: the
        # interpreter with sm_80's choices (its tiles; launch options do not apply there).
        import lmstack_kernels.deltanet.triton_kernels as tk

        cfg = tk.launch_configs(256, 32, False, 80, 32, gated=True)
        assert [cfg[n]["BT"] for n in ("fwd", "states", "bwd")] == [32, 16, 16] and cfg["bwd"]["BV"] == 16
        monkeypatch.setattr(tk, "device_arch", lambda x: 80)
        monkeypatch.setattr(self, "shapes", {63: (256, 32)})
        x = self.make_inputs(63, B=1, H=2)
        got = self.run(self.op, x, backend="triton", chunk_size=32)
        assert_all_close(got, self.run(self.naive, x, dtype=torch.float64), TOL, "triton sm_80", self.outputs)

    def test_naive_matches_fla_reference(self) -> None:
        """Our convention is fla's: `naive_recurrent_gated_delta_rule` ([B, T, H, D], g the log
        decay, scale K^-1/2 by default), which computes in fp32."""
        fla_naive = pytest.importorskip("fla.ops.gated_delta_rule.naive")
        x = self.make_inputs(63)
        q, k, v, beta, g, h0 = (x[n] for n in self.inputs)
        o_fla, ht_fla = fla_naive.naive_recurrent_gated_delta_rule(
            q, k, v, beta, g, initial_state=h0, output_final_state=True
        )
        for backend in BACKENDS:
            o, ht = gated_delta_rule_attn(
                q, k, v, beta, g, initial_state=h0, output_final_state=True, backend=backend
            )
            assert_rel_rmse(o, o_fla, TOL, f"{backend} o vs fla")
            assert_rel_rmse(ht, ht_fla, TOL, f"{backend} final state vs fla")
        o_naive, ht_naive = naive_gated_delta_rule(q, k, v, beta, g, 0.3, h0, True, dtype=torch.float64)
        o_fla, ht_fla = fla_naive.naive_recurrent_gated_delta_rule(q, k, v, beta, g, 0.3, h0, True)
        assert_rel_rmse(o_naive, o_fla, TOL, "naive o vs fla, scale 0.3")
        assert_rel_rmse(ht_naive, ht_fla, TOL, "naive final state vs fla, scale 0.3")

    @pytest.mark.parametrize("backend", BACKENDS)
    def test_strong_decay_stays_finite_and_exact(self, backend: str) -> None:
        """g = −20 on every token of head 1 and a block of tokens at −20 amid mild decay on head 0:
        products of up to a block of such decays (e^-640) underflow to 0, never overflow (no positive
        exponent), and o, the state and every gradient match the fp64 recurrence per head."""
        x = self.make_inputs(63)
        x["g"][:, :, 1] = -20.0
        x["g"][:, 20:36, 0] = -20.0
        got = self.run(self.op, x, backend=backend, chunk_size=32)
        ref = self.run(self.naive, x, dtype=torch.float64)
        assert_all_close(got, ref, TOL, f"{backend} g = -20", self.outputs)
        # Head 1 on its own: with a near reset at each token its final state is about the last write.
        # (Its dg is not compared alone: the exact values are ~e^-20, below fp32 rounding of O(1) terms.)
        assert_rel_rmse(got[1][:, 1], ref[1][:, 1], TOL, f"{backend} g = -20 head 1 final state")

    @pytest.mark.parametrize("backend", BACKENDS)
    def test_decode_steps_equal_the_chunk_path(self, backend: str, monkeypatch: pytest.MonkeyPatch) -> None:
        """Prefill 40 tokens, then decode one token at a time from the state (through the op with
        T = 1 and through `gated_delta_rule_step`): the same o, final state and gradients as one
        chunked pass, and no single-token call reaches a chunk kernel."""
        x, t0 = self.make_inputs(63), 40
        whole = self.run(self.op, x, backend="torch", chunk_size=16)
        chunked = deltanet.chunk_delta_rule

        def prefill_then_steps(q, k, v, beta, g, h0, step):
            o, h = self.op(*(a[:, :t0] for a in (q, k, v, beta, g)), h0, backend=backend, chunk_size=16)
            outs = [o]
            with monkeypatch.context() as m:
                m.setattr(deltanet, "chunk_delta_rule", None)  # a call would raise TypeError
                m.setattr(deltanet, "_triton_path", None)
                for t in range(t0, q.shape[1]):
                    o, h = step(*(a[:, t : t + 1] for a in (q, k, v, beta, g)), h)
                    outs.append(o)
            assert deltanet.chunk_delta_rule is chunked
            return torch.cat(outs, 1), h

        through_op = lambda *a: self.op(*a, backend=backend)
        for name, step in (("op", through_op), ("step", gated_delta_rule_step)):
            got = self.run(functools.partial(prefill_then_steps, step=step), x)
            assert_all_close(got, whole, TOL, f"{backend} decode through {name}", self.outputs)

    def test_affine_map_matches_explicit_product(self) -> None:
        x = self.make_inputs(63)
        k, beta, g = (x[n].double() for n in ("k", "beta", "g"))
        P, E = gated_delta_rule_affine_map(*(x[n] for n in AFFINE_INPUTS), chunk_size=16)
        K = k.shape[-1]
        eye = torch.eye(K, dtype=torch.float64)
        ref = eye.expand(*k.shape[::2], K, K)  # [B, H, K, K]
        for t in range(k.shape[1]):
            kt = k[:, t, :, :, None]
            decay = g[:, t, :, None, None].exp()
            ref = decay * (eye - beta[:, t, :, None, None] * kt * kt.transpose(-1, -2)) @ ref
        assert_rel_rmse(P, ref, TOL, "P vs the product of transitions")
        _, E_ref = naive_gated_delta_rule(
            x["q"], *(x[n] for n in AFFINE_INPUTS), None, None, True, dtype=torch.float64
        )
        assert_rel_rmse(E, E_ref, TOL, "E vs the final state from zero")

    def test_affine_maps_of_slices_compose_to_the_whole(self) -> None:
        """Three slices (the middle one inside a single block) compose to the whole sequence's map, in
        values and in gradients for k, v, beta and g."""
        x, cuts = self.make_inputs(100), (0, 37, 45, 100)
        whole = _affine_grads(lambda *a: gated_delta_rule_affine_map(*a, chunk_size=16), x)

        def composed(*args):
            maps = [
                gated_delta_rule_affine_map(*(a[:, s:e] for a in args), chunk_size=16)
                for s, e in zip(cuts, cuts[1:])
            ]
            return functools.reduce(_compose, maps)

        assert_all_close(_affine_grads(composed, x), whole, TOL, "composed", AFFINE)

    def test_affine_map_applied_to_a_state_equals_running_from_it(self) -> None:
        """P · S_in + E is the op's final state from S_in, with the same gradients for k, v, beta, g, S_in."""
        x = self.make_inputs(129)
        x["do"] = torch.zeros_like(x["do"])  # the map carries no output: compare state gradients only

        def through_map(q, k, v, beta, g, h0):
            P, E = gated_delta_rule_affine_map(k, v, beta, g, chunk_size=32)
            return q.new_zeros(x["do"].shape), P @ h0 + E  # o is not part of the map

        keep = [1, 3, 4, 5, 6, 7]  # final state, dk, dv, dbeta, dg, d_initial_state
        pick = lambda xs: [xs[i] for i in keep]
        got, ref = self.run(through_map, x), self.run(self.op, x, backend="torch", chunk_size=32)
        assert_all_close(pick(got), pick(ref), TOL, "P S_in + E", pick(self.outputs))

    def test_affine_map_of_packed_documents(self) -> None:
        lengths = [17, 0, 46]
        cu = torch.tensor([0] + lengths).cumsum(0).to(torch.int32)
        x = self.make_inputs(sum(lengths), B=1)
        args = [x[n] for n in AFFINE_INPUTS]
        P, E = gated_delta_rule_affine_map(*args, cu_seqlens=cu, chunk_size=16)
        for n, (s, e) in enumerate(zip(cu.tolist(), cu.tolist()[1:])):
            Pn, En = gated_delta_rule_affine_map(*(a[:, s:e] for a in args), chunk_size=16)
            assert_rel_rmse(P[n : n + 1], Pn, TOL, f"P of document {n}")
            assert_rel_rmse(E[n : n + 1], En, TOL, f"E of document {n}")
        K = args[0].shape[-1]
        assert torch.equal(P[1], torch.eye(K).expand(2, K, K)) and not E[1].any()  # the empty document

    def test_identity_tokens_give_the_last_documents_map(self) -> None:
        """β = 0 and g = 0 before a row's last document: the row's map is that document's alone
        (how a mixer gets a slice's summary under sequence parallelism)."""
        x, start = self.make_inputs(63), 30
        args = [x[n].clone() for n in AFFINE_INPUTS]
        tail = gated_delta_rule_affine_map(*(a[:, start:] for a in args), chunk_size=16)
        args[2][:, :start] = 0.0
        args[3][:, :start] = 0.0
        assert_all_close(
            list(gated_delta_rule_affine_map(*args, chunk_size=16)), list(tail), TOL, "masked row", ("P", "E")
        )
