"""Step `ops_correctness`: every op of `ops.OPS`, Triton forward and backward against a reference.

For each case and input dtype (fp32, bf16): o, the final state and the gradients of every input that
takes one and of the initial state, by relative RMSE against
- the naive token-by-token recurrence in fp64 for short sequences (T ≤ NAIVE_MAX_T), and
- the op's chunked PyTorch path in fp32 (TF32 off) for long ones, where the naive loop is too slow;
both fed the same (dtype-rounded) inputs. Cases cover T up to 8K, head dims 64/128/256 (where the op
takes them), packed documents (one empty), strong and weak decay, initial and final state.
Dry run: Triton's interpreter on CPU, tiny shapes, the same logic.
"""

from __future__ import annotations

import time
import zlib

import torch
from common import Report, step_args
from helpers import rel_rmse
from ops import OPS

NAIVE_MAX_T = 1024
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
# (name, B, T, H, D, document lengths or None, strong decay)
GPU_CASES = [
    ("dense", 2, 129, 4, 64, None, False),
    ("packed-strong", 1, 0, 4, 64, [17, 0, 466, 37, 1], True),
    ("dense-strong", 1, 1000, 4, 128, None, True),
    ("dense-d256", 1, 257, 2, 256, None, False),
    ("long-8k", 1, 8192, 4, 128, None, False),
    ("long-packed", 1, 0, 4, 64, [3001, 1, 2048, 1049], True),
    ("long-8k-d256", 1, 8192, 2, 256, None, True),
]
DRY_CASES = [
    ("dense", 2, 37, 2, 16, None, False),
    ("packed-strong", 1, 0, 2, 32, [9, 0, 20, 14], True),
]


def takes(op, case) -> bool:
    """Whether the op takes the case's head dim."""
    return case[4] <= max(op.head_dims)


def case_inputs(name: str, op, case, dtype_name: str, device: torch.device) -> dict:
    """The case's inputs on `device` (rounded to the checked dtype once; the references upcast them):
    x (the op's dict), h0, dht, do, cu (or None) and T."""
    label, B, T, H, D, docs, strong = case
    cu = None
    if docs is not None:
        T = sum(docs)
        cu = torch.tensor([0, *docs], device=device).cumsum(0).to(torch.int32)
    N = B if docs is None else len(docs)
    gen = torch.Generator().manual_seed(zlib.crc32(f"{name} {label}".encode()))
    x = op.make_inputs(B, T, H, D, D, strong, gen)
    h0, dht = torch.randn(N, H, D, D, generator=gen), torch.randn(N, H, D, D, generator=gen)
    do = torch.randn(B, T, H, D, generator=gen)
    dtype = DTYPES[dtype_name]
    x = {k: (v.to(dtype) if k in op.grad_inputs else v).to(device) for k, v in x.items()}
    return {"x": x, "h0": h0.to(device), "dht": dht.to(device), "do": do.to(device), "cu": cu, "T": T}


def grads(op, inputs: dict, fn, cast) -> dict:
    """o, the final state and every gradient of `fn` (an `Op.run`-like call) on the case's inputs,
    cast per tensor by `cast`; the loss is o·do + final state·dht, in fp64."""
    x, h0, do, dht = inputs["x"], inputs["h0"], inputs["do"], inputs["dht"]
    xs = {k: v.to(cast(v)).detach().requires_grad_(k in op.grad_inputs) for k, v in x.items()}
    s0 = h0.to(cast(h0)).detach().requires_grad_()
    o, ht = fn(xs, initial_state=s0, cu_seqlens=inputs["cu"])
    ((o.double() * do.double()).sum() + (ht.double() * dht.double()).sum()).backward()
    out = {"o": o, "final_state": ht, "d_initial_state": s0.grad}
    out.update({f"d{k}": xs[k].grad for k in op.grad_inputs})
    return out


def triton_grads(op, inputs: dict) -> dict:
    return grads(op, inputs, lambda xs, **kw: op.run(xs, backend="triton", **kw), lambda v: v.dtype)


def check_case(report: Report, name: str, op, case, dtype_name: str, device: torch.device, long_t: int):
    label, B, _, H, D, docs, strong = case
    if not takes(op, case):
        return report.skip(f"{name} {label}", f"head dim {D} is over the op's largest, {max(op.head_dims)}")
    inputs = case_inputs(name, op, case, dtype_name, device)
    T = inputs["T"]
    t0 = time.perf_counter()
    got = triton_grads(op, inputs)
    if long_t >= T:  # short enough for the naive loop
        reference = "naive fp64"
        ref = grads(op, inputs, op.naive, lambda v: torch.float64)
    else:
        reference = "chunked PyTorch fp32"
        torch_run = lambda xs, **kw: op.run(xs, backend="torch", **kw)
        ref = grads(op, inputs, torch_run, lambda v: torch.float32)
    errors = {k: rel_rmse(got[k], ref[k]) for k in ref}
    tol = op.tolerance[dtype_name]
    row = {
        "op": name, "case": label, "dtype": dtype_name, "B": B, "T": T, "H": H, "K": D, "V": D,
        "documents": docs, "strong_decay": strong, "reference": reference, "tolerance": tol,
        "rel_rmse": errors, "passed": all(e < tol for e in errors.values()),
        "seconds": round(time.perf_counter() - t0, 2),
    }  # fmt: skip
    report.add(row)
    worst = max(errors, key=errors.get)
    print(f"{name} {label} {dtype_name} T={T} D={D}: worst {worst} {errors[worst]:.2e} (tol {tol:.0e})")
    if not row["passed"]:
        bad = ", ".join(f"{k} {e:.2e}" for k, e in errors.items() if e >= tol)
        report.fail(f"{name} {label} {dtype_name} T={T} D={D} vs {reference}: {bad} (tol {tol:.0e})")


def by_cost(cases: list) -> list:
    """Cheapest first (B·T·H·D²)."""
    return sorted(cases, key=lambda c: c[1] * (c[2] or sum(c[5])) * c[3] * c[4] ** 2)


def main() -> None:
    args = step_args(__doc__.split("\n\n")[0])
    device = torch.device("cpu" if args.dry_run else "cuda")
    torch.backends.cuda.matmul.allow_tf32 = False  # the chunked reference in true fp32
    cases, long_t = (DRY_CASES, 40) if args.dry_run else (GPU_CASES, NAIVE_MAX_T)
    report = Report(
        "ops_correctness", args, ops=sorted(OPS), naive_max_T=long_t,
        tolerances={name: op.tolerance for name, op in OPS.items()},
        measure="relative RMSE ||got - ref|| / ||ref|| of o, final state and every gradient",
    )  # fmt: skip
    # Round-robin, cheapest case first: a step stopped at its cap has checked every op on the same
    # cases, and one failing case (an exception: a launch out of resources) does not end the step.
    for case in by_cost(cases):
        for name, op in OPS.items():
            for dtype_name in DTYPES:
                try:
                    check_case(report, name, op, case, dtype_name, device, long_t)
                except Exception as err:  # noqa: BLE001
                    report.fail(f"{name} {case[0]} {dtype_name}: {type(err).__name__}: {err}")


if __name__ == "__main__":
    main()
