"""The ops the GPU suite checks and times: one `OPS` entry per op of `lmstack_kernels`.

An entry says how to make an op's inputs and how to call the op, its naive recurrence and its
flash-linear-attention counterpart, all on the same dict of inputs, so that `check_ops.py` (Triton
forward and backward against the references) and `bench_ops.py` (speed against fla and SDPA) need no
per-op code. Adding an op is one input maker and one `Op(...)` entry.

Calling conventions (x: the dict from `make_inputs`, all [B, T, H, *] but per-head constants; every
op is called as attn(q, k, v, x[own_input], ...)):
    run(x, backend, initial_state, cu_seqlens)   -> (o [B, T, H, V], final state [N, H, K, V] fp32)
    naive(x, initial_state, cu_seqlens)          -> the same from the token-by-token recurrence, in
                                                    x's dtype (the suite passes fp64)
    fla(x, initial_state, cu_seqlens)            -> the same from fla (imported when called)
`initial_state` is [N, H, K, V] (N = B, or the number of documents with `cu_seqlens`, then B = 1).
"""

from __future__ import annotations

import functools
import importlib
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from lmstack_kernels.deltanet import delta_rule_attn
from lmstack_kernels.deltanet.naive import naive_delta_rule
from lmstack_kernels.gla import gla_attn
from lmstack_kernels.gla.naive import naive_gla
from lmstack_kernels.lightning import lightning_attn
from lmstack_kernels.lightning.naive import naive_lightning_attn

Inputs = dict[str, torch.Tensor]

FLA_AUTOTUNE = (
    "bounded: every Triton Autotuner in the process keeps only the first config it lists (no H200 "
    "configs ship with fla 0.6.0, so unbounded it would compile and time every config per shape)"
)


@functools.cache
def import_fla() -> None:
    """Import fla's ops with its autotuning bounded (FLA_AUTOTUNE). fla builds its autotuners at
    import and at first call (modules imported lazily), through `triton.autotune` and its own
    `Autotuner` subclass: the bound goes on `Autotuner.__init__`, for the rest of the process (the
    lmstack kernels do not autotune). With one config Triton compiles it and times nothing."""
    from triton.runtime.autotuner import Autotuner

    init = Autotuner.__init__

    @functools.wraps(init)
    def first_config(self, fn, arg_names, configs, *args, **kwargs):
        init(self, fn, arg_names, configs[:1], *args, **kwargs)

    Autotuner.__init__ = first_config
    importlib.import_module("fla.ops")


@dataclass(frozen=True)
class Op:
    # (B, T, H, K, V, strong_decay, generator) -> fp32 CPU inputs; strong_decay: forget within a few tokens
    make_inputs: Callable[[int, int, int, int, int, bool, torch.Generator], Inputs]
    grad_inputs: tuple[str, ...]  # the inputs that receive gradients (the rest are constants)
    own_input: str  # the op's input after q, k, v (e.g. "g")
    attn: Callable[..., tuple[torch.Tensor, torch.Tensor]]  # the op: attn(q, k, v, own input, ...)
    naive_fn: Callable[..., tuple[torch.Tensor, torch.Tensor]]  # its naive recurrence, alike
    fla: Callable[..., tuple[torch.Tensor, torch.Tensor]]
    fla_name: str
    head_dims: tuple[int, ...] = (64, 128, 256)  # head dims checked on the GPU (K = V)
    # Relative RMSE allowed against the reference, per input dtype. fp32: Triton's tl.dot takes fp32
    # operands as tf32 by default (METHOD.md: near 3e-4 per product); bf16: 16-bit dot operands.
    tolerance: dict[str, float] = field(default_factory=lambda: {"fp32": 5e-3, "bf16": 2e-2})

    def run(self, x: Inputs, backend: str, initial_state=None, cu_seqlens=None):
        return self.attn(
            x["q"], x["k"], x["v"], x[self.own_input], initial_state=initial_state,
            output_final_state=True, cu_seqlens=cu_seqlens, backend=backend,
        )  # fmt: skip

    def naive(self, x: Inputs, initial_state=None, cu_seqlens=None):
        return self.naive_fn(
            x["q"], x["k"], x["v"], x[self.own_input], None, initial_state, True, cu_seqlens, x["q"].dtype
        )


def _qkv(B: int, T: int, H: int, K: int, V: int, gen: torch.Generator) -> Inputs:
    r = lambda *shape: torch.randn(*shape, generator=gen)
    return {"q": r(B, T, H, K), "k": r(B, T, H, K), "v": r(B, T, H, V)}


def _lightning_inputs(B, T, H, K, V, strong_decay, gen) -> Inputs:
    # log λ per head: strong decay reaches λ = e^-3 (state forgotten within a few tokens), weak stays
    # above e^-0.05 (memory of hundreds of tokens, where long-range accumulation errors show).
    top = 3.0 if strong_decay else 0.05
    return {**_qkv(B, T, H, K, V, gen), "decay": -torch.rand(H, generator=gen) * top}


def _fla_simple_gla(x: Inputs, initial_state=None, cu_seqlens=None):
    import_fla()
    from fla.ops.simple_gla import chunk_simple_gla

    B, T, H, _ = x["q"].shape
    g = x["decay"].float().view(1, 1, H).expand(B, T, H).contiguous()  # constant decay as a gate
    return chunk_simple_gla(
        x["q"], x["k"], x["v"], g=g, initial_state=initial_state, output_final_state=True,
        cu_seqlens=None if cu_seqlens is None else cu_seqlens.long(),
    )  # fmt: skip


def _gla_inputs(B, T, H, K, V, strong_decay, gen) -> Inputs:
    # Log gates per token and key channel: strong ones down to −5 per step (a 16-token chunk sums to
    # about −40); weak ones as the mixer makes them at initialisation, logsigmoid(N(0, 1)) / 16.
    u = torch.randn(B, T, H, K, generator=gen)
    g = -5 * torch.rand(B, T, H, K, generator=gen) if strong_decay else torch.nn.functional.logsigmoid(u) / 16
    return {**_qkv(B, T, H, K, V, gen), "g": g}


def _deltanet_inputs(B, T, H, K, V, strong_decay, gen) -> Inputs:
    # q, k L2-normalised (the op's precondition). β up to 2 ("strong": negative eigenvalues, each
    # token overwrites most of what its key held) or within (0, 1).
    x = _qkv(B, T, H, K, V, gen)
    beta = torch.rand(B, T, H, generator=gen) * (2.0 if strong_decay else 1.0)
    return {**x, "q": F.normalize(x["q"], dim=-1), "k": F.normalize(x["k"], dim=-1), "beta": beta}


def _fla_chunk(module: str, name: str, own_input: str) -> Callable:
    """fla's `module.name`, called (q, k, v, x[own_input], …) like `Op.run` (imported when called)."""

    def call(x: Inputs, initial_state=None, cu_seqlens=None):
        import_fla()
        return getattr(importlib.import_module(module), name)(
            x["q"], x["k"], x["v"], x[own_input], initial_state=initial_state, output_final_state=True,
            cu_seqlens=None if cu_seqlens is None else cu_seqlens.long(),
        )  # fmt: skip

    return call


OPS: dict[str, Op] = {
    "lightning": Op(
        make_inputs=_lightning_inputs,
        grad_inputs=("q", "k", "v"),
        own_input="decay",
        attn=lightning_attn,
        naive_fn=naive_lightning_attn,
        fla=_fla_simple_gla,
        fla_name="fla.ops.simple_gla.chunk_simple_gla (g = decay broadcast over B, T)",
    ),
    "gla": Op(
        make_inputs=_gla_inputs,
        grad_inputs=("q", "k", "v", "g"),
        own_input="g",
        attn=gla_attn,
        naive_fn=naive_gla,
        fla=_fla_chunk("fla.ops.gla", "chunk_gla", "g"),
        fla_name="fla.ops.gla.chunk_gla",
    ),
    "deltanet": Op(
        make_inputs=_deltanet_inputs,
        grad_inputs=("q", "k", "v", "beta"),
        own_input="beta",
        attn=delta_rule_attn,
        naive_fn=naive_delta_rule,
        fla=_fla_chunk("fla.ops.delta_rule", "chunk_delta_rule", "beta"),
        fla_name="fla.ops.delta_rule.chunk_delta_rule",
    ),
}
