"""lightning_attn: the Triton kernels (interpreter on CPU) and the chunked PyTorch path against the
naive recurrence, packed documents, split sequences, input validation (the tests every op shares:
`op_contract.py`), and a slice's affine map."""

from __future__ import annotations

import pytest
import torch
from helpers import assert_rel_rmse
from op_contract import TOL, OpContract

from lmstack_kernels.lightning import lightning_attn, lightning_slice_state
from lmstack_kernels.lightning.naive import naive_lightning_attn

DECAY = torch.tensor([-0.02, -0.4])  # log λ per head: long and short memory


class TestLightning(OpContract):
    attn = staticmethod(lightning_attn)
    naive_fn = staticmethod(naive_lightning_attn)
    inputs = ("q", "k", "v", "decay", "h0")
    constants = ("decay",)  # a constant of the op: no gradient
    shapes = {63: (16, 32), 100: (32, 16), 128: (32, 32)}  # T -> (K, V); B = H = 2
    bad_dims = ((8, 32), (32, 8), (320, 32), (32, 512))
    chunk_small, chunk_large = {"chunk_size": 16}, {"chunk_size": 32}

    def op_inputs(self, T, B, H, K, V, r, gen):
        return {"q": r(B, T, H, K), "k": r(B, T, H, K), "v": r(B, T, H, V), "decay": DECAY[:H]}

    def gpu_op_inputs(self, TT, H, K, V, r, gen):
        q, k, v = r(1, TT, H, K) * 0.5, r(1, TT, H, K) * 0.5, r(1, TT, H, V)
        return {"q": q, "k": k, "v": v, "decay": torch.tensor([-0.5, -0.05, -0.005, 0.0], device="cuda")}

    def own_input(self, q):
        return DECAY

    def invalid_cases(self, q, v):
        return [
            ({"decay": torch.tensor([-0.1, 0.1])}, "decay"),
            ({"decay": torch.tensor([-0.1])}, "decay"),
            ({"chunk_size": 48}, "chunk_size"),
        ]

    @pytest.mark.parametrize("T", [63, 100])
    def test_slice_state_is_the_affine_map_of_the_slice(self, T):
        """(λ^T, E) from `lightning_slice_state` reproduce the naive final state from any initial state,
        and E restricted to trailing tokens is the final state of that last document alone; gradients
        of E match the naive recurrence's."""
        x = self.make_inputs(T)
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
                x["q"][b : b + 1, T - lengths[b] :],
                kb,
                vb,
                DECAY,
                output_final_state=True,
                dtype=torch.float64,
            )
            (ref * x["dht"][b : b + 1]).sum().backward()
            assert_rel_rmse(E[b : b + 1], ref, TOL, f"E row {b}")
            assert_rel_rmse(k.grad[b : b + 1, T - lengths[b] :], kb.grad, TOL, f"dk row {b}")
            assert_rel_rmse(v.grad[b : b + 1, T - lengths[b] :], vb.grad, TOL, f"dv row {b}")
            assert not k.grad[b, : T - lengths[b]].any()  # tokens of earlier documents do not count
