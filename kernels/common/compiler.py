"""`disable_compile`: keep a function out of torch.compile's tracing without paying for it at import.

`@torch.compiler.disable` as a plain decorator imports torch._dynamo (and with it triton) when the
module is imported: about 4-5 s on a 2-core CPU, paid by every `lmstack` command that imports the model
(`--help`, `show-config`). This decorator applies `torch.compiler.disable` on the first call instead;
under torch.compile the call still graph-breaks there (checked with an interpreted Triton launch,
which fails when traced).
"""

from __future__ import annotations

import functools

import torch


def disable_compile(fn):
    """`fn`, run outside torch.compile's tracing (a graph break); torch._dynamo loads on first call."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        return _disabled(fn)(*args, **kwargs)

    return wrapper


@functools.cache
def _disabled(fn):
    return torch.compiler.disable(fn)
