"""Step `ops_speed`: every op of `ops.OPS` (Triton) against its fla counterpart and torch SDPA.

bf16, B·T = 32K tokens per call (B = 32K / T), H = 16, K = V = 128, T = 2K, 8K, 32K: forward,
backward and forward+backward times (median of CUDA-event timings after warm-up, as
benchmarks/op_bench.py measures them) and peak memory above the inputs. SDPA (causal softmax
attention, flash on the GPU) is the same for every op and timed once per T. Before timing, each fla
counterpart's output is compared with the op's (relative RMSE, both bf16): a speed comparison is only
meaningful between paths that compute the same function. A shape that runs out of memory is recorded
as such; any other error is recorded as a failure and the step goes on. fla's autotuning is bounded
to the first config each kernel lists (`ops.import_fla`): its times are fla untuned, an upper bound
on what tuned fla takes. Dry run: the interpreter on CPU, tiny shapes, one run each; its times are
not measurements.
"""

from __future__ import annotations

import torch
from common import Report, step_args
from helpers import rel_rmse
from op_bench import measure, sdpa
from ops import FLA_AUTOTUNE, OPS, import_fla

SHAPES = {
    "gpu": dict(tokens=32768, H=16, D=128, Ts=[2048, 8192, 32768], warmup=3, reps=10),
    "dry": dict(tokens=64, H=2, D=16, Ts=[64], warmup=0, reps=1),
}


def fla_unavailable(device: torch.device) -> str | None:
    if device.type != "cuda":
        return "fla's Triton kernels need a CUDA device"
    try:
        import_fla()
    except Exception as err:  # noqa: BLE001
        return f"fla not importable ({type(err).__name__}: {err})"
    return None


def time_method(report: Report, row: dict, fn, params, do, tokens, device, shape) -> None:
    try:
        row.update(measure(fn, params, do, tokens, device, shape["warmup"], shape["reps"], "median"))
    except torch.OutOfMemoryError:
        row["error"] = "out of memory"
        torch.cuda.empty_cache()
    except Exception as err:  # noqa: BLE001  (one method's failure must not end the step)
        row["error"] = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
        report.fail(f"{row['method']} T={row['T']}: {row['error']}")
    report.add(row)
    print({k: round(v, 3) if isinstance(v, float) else v for k, v in row.items()}, flush=True)


def op_inputs(op, B: int, T: int, shape: dict, device: torch.device) -> dict:
    """The op's bf16 inputs at one shape, those that take gradients requiring them."""
    H, D = shape["H"], shape["D"]
    x = op.make_inputs(B, T, H, D, D, False, torch.Generator().manual_seed(T))
    grad = lambda k: k in op.grad_inputs
    return {
        k: v.to(device, torch.bfloat16 if grad(k) else v.dtype).requires_grad_(grad(k)) for k, v in x.items()
    }


def bench_op(report: Report, name: str, op, B: int, T: int, do, device, shape, fla: bool) -> None:
    """The op's Triton path and (when `fla`) its fla counterpart at one shape."""
    x = op_inputs(op, B, T, shape, device)
    params = [x[k] for k in op.grad_inputs]
    ours = lambda: op.run(x, backend="triton", initial_state=None, cu_seqlens=None)[0]
    time_method(report, {"method": f"{name}_triton", "B": B, "T": T}, ours, params, do, B * T, device, shape)
    if not fla:
        return
    theirs = lambda: op.fla(x)[0]
    row = {"method": f"{name}_fla", "B": B, "T": T}
    try:
        with torch.no_grad():
            row["rel_rmse_vs_triton"] = rel_rmse(theirs(), ours())
    except Exception as err:  # noqa: BLE001
        return report.fail(f"{name}_fla T={T}: {type(err).__name__}: {err}")
    if not row["rel_rmse_vs_triton"] < 2 * op.tolerance["bf16"]:
        report.fail(f"{name}: fla counterpart differs at T={T}: rel RMSE {row['rel_rmse_vs_triton']:.2e}")
    time_method(report, row, theirs, params, do, B * T, device, shape)


def main() -> None:
    args = step_args(__doc__.split("\n\n")[0])
    device = torch.device("cpu" if args.dry_run else "cuda")
    shape = SHAPES["dry" if args.dry_run else "gpu"]
    H, D, dtype = shape["H"], shape["D"], torch.bfloat16
    timing = f"median of {shape['reps']} after {shape['warmup']} warm-up; ms (CUDA events)"
    report = Report(
        "ops_speed", args, shape={**shape, "dtype": "bf16"},
        timing="dry run: one CPU run each, not a measurement" if args.dry_run else timing,
        baselines={name: op.fla_name for name, op in OPS.items()} | {"sdpa": "torch SDPA, causal"},
        fla_autotune=FLA_AUTOTUNE,
    )  # fmt: skip
    no_fla = fla_unavailable(device)
    if no_fla:
        report.skip("fla", no_fla)
    gen = torch.Generator().manual_seed(0)
    for T in shape["Ts"]:
        B = shape["tokens"] // T
        do = torch.randn(B, T, H, D, generator=gen).to(device, dtype)
        qkv = [torch.randn(B, T, H, D, generator=gen).to(device, dtype).requires_grad_() for _ in range(3)]
        fn = lambda qkv=qkv: sdpa(*qkv)
        time_method(report, {"method": "sdpa", "B": B, "T": T}, fn, qkv, do, B * T, device, shape)
        for name, op in OPS.items():
            try:  # making the inputs can fail too (out of memory at 32K): the next op still runs
                bench_op(report, name, op, B, T, do, device, shape, fla=not no_fla)
            except Exception as err:  # noqa: BLE001
                report.fail(
                    f"{name} T={T}: {type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
                )
                torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
