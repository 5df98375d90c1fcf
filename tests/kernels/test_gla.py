"""gla_attn: the Triton kernels (interpreter on CPU) and the chunked PyTorch path against the naive
recurrence in fp64 (o, final state and the gradients of q, k, v, g and the initial state), packed
documents, split sequences, input validation (the tests every op shares: `op_contract.py`); strong
and saturated gates, the decoding step, a slice's affine map (sequence parallelism), fla's reference."""

from __future__ import annotations

import pytest
import torch
from helpers import assert_rel_rmse
from op_contract import BACKENDS, TOL, OpContract, assert_all_close

from lmstack_kernels.gla import gla_attn, gla_slice_state
from lmstack_kernels.gla.naive import naive_gla


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


class TestGLA(OpContract):
    attn = staticmethod(gla_attn)
    naive_fn = staticmethod(naive_gla)
    inputs = ("q", "k", "v", "g", "h0")
    shapes = {63: (16, 32), 100: (32, 24), 129: (8, 32)}  # T -> (K, V); B = H = 2
    bad_dims = ((300, 32), (32, 512))
    gpu_dims = ((64, 64), (128, 128), (256, 48), (8, 24))
    packed_lengths = (17, 0, 46, 37, 1)

    def op_inputs(self, T, B, H, K, V, r, gen):
        return {"q": r(B, T, H, K), "k": r(B, T, H, K), "v": r(B, T, H, V), "g": _gates(B, T, H, K, gen)}

    def gpu_op_inputs(self, TT, H, K, V, r, gen):
        g = torch.nn.functional.logsigmoid(r(1, TT, H, K)) / 16
        g[..., : K // 4] *= 100  # strong gates on some channels
        return {"q": r(1, TT, H, K) * 0.5, "k": r(1, TT, H, K) * 0.5, "v": r(1, TT, H, V), "g": g}

    def own_input(self, q):
        return -torch.rand_like(q)

    def invalid_cases(self, q, v):
        g = self.own_input(q)
        bad_g = g.clone()
        bad_g[1, 3, 0, 5] = 0.5
        nan_g = g.clone()
        nan_g[0, 0, 0, 0] = float("nan")
        return [
            ({"g": bad_g}, "g holds log forget gates and must be ≤ 0"),
            ({"g": nan_g}, "g holds log forget gates"),
            ({"g": g[..., :8]}, "g must be a float tensor"),
            ({"g": g.double()}, "g must be a float tensor"),
        ]

    @pytest.mark.parametrize("backend", BACKENDS)
    def test_saturated_gates_reset_the_state(self, backend: str) -> None:
        """g = −1000 forgets everything at every step (exp underflows to 0): o_t = scale (q_t·k_t) v_t,
        with no inf/NaN in the output or any gradient. The true dg is then exactly 0, so it is checked
        against the size of the terms it is summed from (MATH.md, "Gradient of g": the Triton path's
        reverse running sum leaves an absolute error of a few ulp of those terms, times √T)."""
        x = self.make_inputs(40)
        x["g"] = torch.full_like(x["g"], -1000.0)
        got = self.run(self.op, x, backend=backend)
        ref = self.run(self.naive, x, dtype=torch.float64)
        q, k, v = x["q"], x["k"], x["v"]
        expected = (q * k).sum(-1, keepdim=True) * v * q.shape[-1] ** -0.5
        assert_all_close(got[:1], [expected], TOL, f"{backend} saturated", ["o"])
        dg, ref_dg = got.pop(5), ref.pop(5)
        names = [n for n in self.outputs if n != "dg"]
        assert_all_close(got, ref, TOL, f"{backend} saturated", names)
        assert torch.isfinite(dg).all()
        assert (dg - ref_dg).abs().max() < 1e-5 * (q * got[2]).pow(2).mean().sqrt(), "saturated dg"

    def test_decode_steps_equal_chunk_path(self) -> None:
        """T = 1 takes the recurrent step (whatever the backend); token-by-token decoding with the state
        handed over equals the chunked path, forward and gradients."""
        x = self.make_inputs(37)

        def decode(q, k, v, g, h0):
            outs, h = [], h0
            for t in range(q.shape[1]):
                o, h = self.op(
                    q[:, t : t + 1], k[:, t : t + 1], v[:, t : t + 1], g[:, t : t + 1], h, backend="triton"
                )
                outs.append(o)
            return torch.cat(outs, 1), h

        assert_all_close(
            self.run(decode, x), self.run(self.op, x, backend="torch"), TOL, "decode", self.outputs
        )

    @pytest.mark.parametrize("T", [63, 100])
    def test_slice_state_is_the_affine_map_of_the_slice(self, T: int) -> None:
        """(exp Σg, E) from `gla_slice_state` reproduce the naive final state from any initial state
        (strong gates included), and E restricted to trailing tokens is the final state of that last
        document alone; gradients of k, v and g match the naive recurrence's."""
        x = self.make_inputs(T)
        gates, E = gla_slice_state(x["k"], x["v"], x["g"])
        _, naive_final = self.naive(*(x[n] for n in self.inputs))
        assert_rel_rmse(gates[..., None] * x["h0"] + E, naive_final, TOL, "exp(Σg) S0 + E")
        lengths = torch.tensor([T, 17])
        k, v, g = (x[n].clone().requires_grad_() for n in ("k", "v", "g"))
        _, E = gla_slice_state(k, v, g, lengths)
        (E * x["dht"]).sum().backward()
        for b in range(2):
            tail = slice(T - int(lengths[b]), T)
            kb, vb, gb = (x[n][b : b + 1, tail].clone().requires_grad_() for n in ("k", "v", "g"))
            _, ref = self.naive(x["q"][b : b + 1, tail], kb, vb, gb, None)
            (ref * x["dht"][b : b + 1]).sum().backward()
            assert_rel_rmse(E[b : b + 1], ref, TOL, f"E row {b}")
            for name, got, want in (("dk", k, kb), ("dv", v, vb), ("dg", g, gb)):
                assert_rel_rmse(got.grad[b : b + 1, tail], want.grad, TOL, f"{name} row {b}")
                assert not got.grad[b, : tail.start].any()  # tokens of earlier documents do not count

    def test_matches_fla_reference(self) -> None:
        """The convention is flash-linear-attention's: its naive recurrence (fla 0.6.0, [B, T, H, D],
        scale K^-1/2) gives the same output and final state."""
        fla_naive = pytest.importorskip("fla.ops.gla.naive")
        x = self.make_inputs(63)
        q, k, v, g, h0 = (x[n] for n in self.inputs)
        ref_o, ref_h = fla_naive.naive_recurrent_gla(q, k, v, g, initial_state=h0, output_final_state=True)
        o, ht = gla_attn(q, k, v, g, initial_state=h0, output_final_state=True, backend="torch")
        assert_rel_rmse(o, ref_o, TOL, "o vs fla")
        assert_rel_rmse(ht, ref_h, TOL, "final state vs fla")
