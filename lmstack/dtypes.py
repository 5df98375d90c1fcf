"""The one parser of dtype names: `--dtype` of `lmstack export`, `eval harness` and `eval ppl`."""

from __future__ import annotations

from lmstack.errors import LMStackError

#: Accepted names -> the torch dtype's name (short aliases as in the configs' `precision`).
DTYPE_NAMES = {
    "float32": "float32",
    "fp32": "float32",
    "bfloat16": "bfloat16",
    "bf16": "bfloat16",
    "float16": "float16",
    "fp16": "float16",
}


def parse_dtype(name: str, flag: str = "--dtype", allow_auto: bool = False):
    """A dtype name -> torch.dtype ("auto" passes through where the caller allows it, for
    `from_pretrained`'s own choice); anything else is a one-line error naming `flag`."""
    if allow_auto and name == "auto":
        return "auto"
    if name not in DTYPE_NAMES:
        known = (["auto"] if allow_auto else []) + list(DTYPE_NAMES)
        raise LMStackError(f"{flag}: expected one of {', '.join(known)}, got {name!r}")
    import torch

    return getattr(torch, DTYPE_NAMES[name])
