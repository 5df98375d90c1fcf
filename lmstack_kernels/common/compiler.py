"""`disable_compile`: keep a function out of torch.compile's tracing without paying for it at import;
`eager_with_documents`: the same for a chunked PyTorch path only when it is given documents.

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


def eager_with_documents(fn):
    """`fn` (a chunked PyTorch path taking a keyword-only `cu_seqlens`), run outside torch.compile's
    tracing when `cu_seqlens` is given. Its per-document layout is built from the document lengths
    read on the host: traced, it would graph-break there and specialise on the lengths, recompiling at
    every new packing of a training batch (minutes per batch on a CPU). Rows without documents trace;
    eager calls go straight to `fn` (torch._dynamo stays unloaded)."""

    @functools.wraps(fn)
    def wrapper(*args, cu_seqlens=None, **kwargs):
        if cu_seqlens is None or not torch.compiler.is_compiling():
            return fn(*args, cu_seqlens=cu_seqlens, **kwargs)
        return _disabled(fn)(*args, cu_seqlens=cu_seqlens, **kwargs)

    return wrapper
