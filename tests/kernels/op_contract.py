"""The tests every linear-attention op of `lmstack_kernels` passes, written once (imported by the
kernel tests as `op_contract`).

An op's test file subclasses `OpContract` (`class TestGLA(OpContract)`), says how to make its inputs
and names its public function and naive recurrence; pytest then runs the tests below for that op,
next to the op's own tests in the subclass. Every op is called as

    attn(q, k, v, <its per-token or per-head input>, scale=…, initial_state=…, …)
    naive(q, k, v, <the same>, scale, initial_state, output_final_state, cu_seqlens, dtype=…)

All comparisons are by relative RMSE (`helpers.assert_rel_rmse`) of o, the final state and the
gradient of every input that takes one.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import pytest
import torch
from helpers import assert_rel_rmse

TOL = 1e-5  # fp32 against an fp64 reference
BACKENDS = ("triton", "torch")


def run_fwd_bwd(
    fn: Callable, x: dict[str, torch.Tensor], names, constants=(), dtype=torch.float32, **kw
) -> list[torch.Tensor]:
    """fn(*x[names], **kw) -> (o, final state), then backward of <o, do> + <final state, dht>.

    Every input is a fresh `dtype` leaf with a gradient, except `constants`, passed as they are.
    Returns o, the final state and the gradients of the leaves, in the order of `names`."""
    args = [x[n] if n in constants else x[n].detach().to(dtype, copy=True).requires_grad_() for n in names]
    o, ht = fn(*args, **kw)
    ((o.double() * x["do"].double()).sum() + (ht.double() * x["dht"].double()).sum()).backward()
    return [o.detach(), ht.detach(), *(a.grad for n, a in zip(names, args) if n not in constants)]


def assert_all_close(got: list[torch.Tensor], ref: list[torch.Tensor], tol: float, what: str, names) -> None:
    """Each of `got` finite and within `tol` relative RMSE of `ref`; one name per tensor."""
    assert len(got) == len(ref) == len(names), f"{what}: {len(got)} results, {len(ref)} references"
    for name, a, r in zip(names, got, ref):
        assert torch.isfinite(a).all(), f"{what} {name}: inf or NaN"
        assert_rel_rmse(a, r, tol, f"{what} {name}")


@functools.cache
def _reference(contract: type[OpContract], T: int) -> list[torch.Tensor]:
    """The fp64 naive recurrence on the inputs of length T (once per op and T in a session)."""
    c = contract()
    return c.run(c.naive, c.make_inputs(T), dtype=torch.float64)


class OpContract:
    """Subclasses set the class attributes below and `op_inputs` / `gpu_op_inputs`."""

    attn: Callable  # the public op, as staticmethod(...)
    naive_fn: Callable  # its naive recurrence, as staticmethod(...)
    inputs: tuple[str, ...]  # positional inputs: q, k, v, the op's own input, then h0 (the initial state)
    constants: tuple[str, ...] = ()  # inputs that take no gradient
    shapes: dict[int, tuple[int, int]]  # T -> (K, V) of the tests against the naive recurrence
    bad_dims: tuple[tuple[int, int], ...]  # (K, V) out of the op's range
    gpu_dims: tuple[tuple[int, int], ...] = ((64, 64), (128, 128), (256, 48))
    chunk_small: dict = {}  # chunk_size keyword of the chunked-path and packed tests (if the op has one)
    chunk_large: dict = {}  # of the Triton and split tests
    packed_lengths: tuple[int, ...] = (17, 0, 46, 37)  # documents of the packed test (0: empty)

    def op_inputs(self, T: int, B: int, H: int, K: int, V: int, r: Callable, gen: torch.Generator) -> dict:
        """The op's inputs but h0 (r(*shape): normal samples of `gen`)."""
        raise NotImplementedError

    def gpu_op_inputs(self, TT: int, H: int, K: int, V: int, r: Callable, gen: torch.Generator) -> dict:
        """The op's inputs but h0 for the GPU test: one row of TT tokens on CUDA."""
        raise NotImplementedError

    def own_input(self, q: torch.Tensor) -> torch.Tensor:
        """A valid value of the op's own input for q: [B, T, H, K]."""
        raise NotImplementedError

    def own_inputs(self, q: torch.Tensor) -> dict[str, torch.Tensor]:
        """Valid values of all the op's own inputs (between v and h0 in `inputs`) by name; one by
        default (`own_input`), an op with more (Gated DeltaNet's beta and g) overrides it."""
        return {self.inputs[3]: self.own_input(q)}

    def invalid_cases(self, q: torch.Tensor, v: torch.Tensor) -> list[tuple[dict, str]]:
        """(keyword overrides of a valid call, the error they must raise) of the op's own checks."""
        return []

    def pytest_generate_tests(self, metafunc: pytest.Metafunc) -> None:
        # The lengths and head dims differ per op: parametrize from the subclass's attributes (unless
        # the test parametrizes the argument itself).
        given = {m.args[0] for m in metafunc.definition.iter_markers("parametrize")}
        for arg, values in (
            ("T", sorted(self.shapes)),
            ("bad_dims", self.bad_dims),
            ("gpu_dims", self.gpu_dims),
        ):
            if arg in metafunc.fixturenames and arg not in given:
                metafunc.parametrize(arg, values, ids=str)

    # -- calling the op ------------------------------------------------------------------------

    @property
    def outputs(self) -> tuple[str, ...]:
        grads = [n for n in self.inputs if n not in self.constants]
        return ("o", "final_state", *("d_initial_state" if n == "h0" else f"d{n}" for n in grads))

    def make_inputs(self, T: int, B: int = 2, H: int = 2, seed: int = 0, N: int | None = None) -> dict:
        """The op's inputs, h0 ([N or B, H, K, V]) and the cotangents do, dht; (K, V) from `shapes`."""
        K, V = self.shapes.get(T, (16, 32))
        gen = torch.Generator().manual_seed(seed)
        r = lambda *s: torch.randn(*s, generator=gen)
        x = self.op_inputs(T, B, H, K, V, r, gen)
        n = B if N is None else N
        return x | {"h0": r(n, H, K, V), "do": r(B, T, H, V), "dht": r(n, H, K, V)}

    def run(self, fn: Callable, x: dict, dtype=torch.float32, **kw) -> list[torch.Tensor]:
        return run_fwd_bwd(fn, x, self.inputs, self.constants, dtype, **kw)

    def op(self, *args, backend: str, cu_seqlens=None, **kw):
        """The op on (q, k, v, own input, h0), returning the final state."""
        *args, h0 = args
        return self.attn(
            *args, initial_state=h0, output_final_state=True, cu_seqlens=cu_seqlens, backend=backend, **kw
        )

    def naive(self, *args, cu_seqlens=None):
        """The naive recurrence in fp64 on (q, k, v, own input, h0)."""
        *args, h0 = args
        return self.naive_fn(*args, None, h0, True, cu_seqlens, dtype=torch.float64)

    def reference(self, T: int) -> list[torch.Tensor]:
        return _reference(type(self), T)

    def tokens(self, args, start: int, end: int | None) -> list[torch.Tensor]:
        """Tokens start..end of each per-token input of (q, k, v, own input)."""
        return [a if n in self.constants else a[:, start:end] for n, a in zip(self.inputs, args)]

    # -- the tests -----------------------------------------------------------------------------

    def test_triton_matches_naive(self, T: int) -> None:
        # Several blocks per sequence; T that is not a multiple of the block ends in a masked one.
        got = self.run(self.op, self.make_inputs(T), backend="triton", **self.chunk_large)
        assert_all_close(got, self.reference(T), TOL, f"triton T={T}", self.outputs)

    def test_chunk_matches_naive(self, T: int) -> None:
        got = self.run(self.op, self.make_inputs(T), backend="torch", **self.chunk_small)
        assert_all_close(got, self.reference(T), TOL, f"torch T={T}", self.outputs)

    @pytest.mark.parametrize("backend", BACKENDS)
    def test_default_scale_and_no_state(self, backend: str) -> None:
        x = self.make_inputs(100)
        args = [x[n] for n in self.inputs[:-1]]
        o, ht = self.attn(*args, backend=backend)
        assert ht is None
        ref, _ = self.naive_fn(*args, dtype=torch.float64)
        assert_rel_rmse(o, ref, TOL, f"{backend} o")
        o2, _ = self.attn(*args, scale=1.0, backend=backend)
        assert_rel_rmse(o2, ref * args[0].shape[-1] ** 0.5, TOL, f"{backend} o, scale=1")

    @pytest.mark.parametrize("backend", BACKENDS)
    def test_low_precision_inputs(self, backend: str) -> None:
        """16-bit inputs (constants stay as given), an fp32 initial state: o in the input dtype, the
        final state in fp32, against the fp64 recurrence on the same rounded inputs."""
        x = self.make_inputs(63)
        for dtype in (torch.bfloat16, torch.float16):
            args = [x[n] if n in self.constants else x[n].to(dtype) for n in self.inputs[:-1]]
            o, ht = self.attn(*args, initial_state=x["h0"], output_final_state=True, backend=backend)
            ref_o, ref_h = self.naive_fn(*args, None, x["h0"], True, dtype=torch.float64)
            assert o.dtype == dtype and ht.dtype == torch.float32
            assert_rel_rmse(o, ref_o, 1e-2, f"{backend} {dtype} o")
            assert_rel_rmse(ht, ref_h, 1e-4, f"{backend} {dtype} final state")

    @pytest.mark.parametrize("backend", BACKENDS)
    def test_packed_documents_match_per_document_loop(self, backend: str) -> None:
        """Documents packed in one row (`packed_lengths`, an empty one included), each with its own
        initial state: the same as one call per document, and as the naive recurrence."""
        cu = torch.tensor([0, *self.packed_lengths]).cumsum(0).to(torch.int32)
        N = len(self.packed_lengths)
        x = self.make_inputs(sum(self.packed_lengths), B=1, N=N)
        got = self.run(self.op, x, backend=backend, cu_seqlens=cu, **self.chunk_small)

        def per_document(*args):
            *args, h0 = args
            outs, finals = [], []
            for n in range(N):
                s, e = cu[n].item(), cu[n + 1].item()
                if s == e:
                    finals.append(h0[n : n + 1])
                    continue
                o, ht = self.op(*self.tokens(args, s, e), h0[n : n + 1], backend=backend, **self.chunk_small)
                outs.append(o)
                finals.append(ht)
            return torch.cat(outs, 1), torch.cat(finals, 0)

        assert_all_close(got, self.run(per_document, x), TOL, f"{backend} packed", self.outputs)
        naive = self.run(functools.partial(self.naive, cu_seqlens=cu), x, dtype=torch.float64)
        assert_all_close(got, naive, TOL, f"{backend} packed vs naive", self.outputs)

    @pytest.mark.parametrize("backend", BACKENDS)
    def test_split_sequence_equals_whole(self, backend: str) -> None:
        """Run 0..t1 then t1..T from the first part's final state; gradients flow through the state."""
        x, t1 = self.make_inputs(100), 45

        def split(*args):
            *args, h0 = args
            o1, h1 = self.op(*self.tokens(args, 0, t1), h0, backend=backend, **self.chunk_large)
            o2, h2 = self.op(*self.tokens(args, t1, None), h1, backend=backend, **self.chunk_large)
            return torch.cat([o1, o2], 1), h2

        assert_all_close(self.run(split, x), self.reference(100), TOL, f"{backend} split", self.outputs)

    def test_head_dim_out_of_range_raises(self, bad_dims: tuple[int, int]) -> None:
        K, V = bad_dims
        q, v = torch.randn(1, 8, 2, K), torch.randn(1, 8, 2, V)
        with pytest.raises(ValueError, match="head dim"):
            self.attn(q, q, v, **self.own_inputs(q))

    def test_invalid_inputs_raise(self) -> None:
        """The checks every op shares (q, k, v, initial_state, cu_seqlens, backend) and its own."""
        q, v = torch.randn(2, 8, 2, 16), torch.randn(2, 8, 2, 16)
        valid = {"q": q, "k": q, "v": v, **self.own_inputs(q)}
        cases = [
            ({"q": q[0]}, "q must be a 4-D tensor"),
            ({"q": q.double(), "k": q.double(), "v": v.double()}, "dtype"),
            ({"k": q[:, :4]}, "k shape"),
            ({"v": v[:, :4]}, "v shape"),
            ({"v": v.half()}, "dtypes differ"),
            ({"initial_state": torch.zeros(1, 2, 16, 16)}, "initial_state"),
            ({"cu_seqlens": torch.tensor([0, 8])}, "B = 1"),
            ({"backend": "cuda"}, "backend"),
            *self.invalid_cases(q, v),
        ]
        for override, match in cases:
            with pytest.raises(ValueError, match=match):
                self.attn(**(valid | override))
        one_row = {n: a if n in self.constants else a[:1] for n, a in valid.items()}
        with pytest.raises(ValueError, match="cu_seqlens must rise from 0 to T"):
            self.attn(**one_row, cu_seqlens=torch.tensor([0, 5]))
        with pytest.raises(ValueError, match="cu_seqlens must be a 1-D integer tensor"):
            self.attn(**one_row, cu_seqlens=torch.tensor([0.0, 8.0]))

    @pytest.mark.gpu
    @pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
    def test_compiled_triton_on_gpu_matches_chunked_path(
        self, dtype: torch.dtype, gpu_dims: tuple[int, int]
    ) -> None:
        """Compiled kernels (tf32 / bf16 tensor-core dots, fp32 accumulation) against the fp32
        chunked path, with packed documents and a tail block; runs only where CUDA is available."""
        K, V = gpu_dims
        cu = torch.tensor([0, 700, 701, 2000, 2333], dtype=torch.int32, device="cuda")
        TT, N, H = 2333, 4, 4
        gen = torch.Generator(device="cuda").manual_seed(0)
        r = lambda *s: torch.randn(*s, device="cuda", generator=gen)
        x = self.gpu_op_inputs(TT, H, K, V, r, gen)
        x |= {"h0": r(N, H, K, V), "do": r(1, TT, H, V), "dht": r(N, H, K, V)}
        got = self.run(self.op, x, dtype=dtype, backend="triton", cu_seqlens=cu)
        ref = self.run(self.op, x, backend="torch", cu_seqlens=cu)
        tol = 2e-2 if dtype == torch.bfloat16 else 5e-3
        assert_all_close(got, ref, tol, f"gpu {dtype} {gpu_dims}", self.outputs)
