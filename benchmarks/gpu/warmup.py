"""Step `warmup`, first: compile every Triton kernel variant the ops steps launch, in parallel, and
record what each compiled kernel needs on this device.

Triton compiles a kernel at its first launch for each specialization (dtypes, constexprs, which
integer arguments are 1 or divisible by 16), one after another within a process: cold, the
correctness matrix alone took ~246 s of serial compile on a CPU (issue 21). Here every job launches
one case of `check_ops.py` (its exact inputs, Triton forward and backward), one shape of
`bench_ops.py` (the op and its fla counterpart, fla's autotuning bounded as there) or one training
step of a model that a later step trains (each mixer of `mixers_throughput` at its 350M shape, with
B = 2: the same kernel specializations as B = 8, a quarter of the memory; the `engine` step's hybrid
tiny model in bf16), in a pool of processes (one per CPU core, at most 16), all writing the same on-disk Triton cache
(TRITON_CACHE_DIR, which suite.sh sets for every step): the steps after it load what they launch.
A launch, not `compile_check`'s compile of the same kernels, because only the JIT's own
specialization of the real arguments makes the cache key that a later launch looks up.

Per job: wall seconds, seconds inside `triton.compile`, or its error (recorded as a failure; the
other jobs go on). Per compiled lmstack kernel, as loaded on the device (`CompiledKernel`): registers
and spilled bytes per thread (the driver's figures), shared memory per block, warps and stages; a
kernel over the device's shared-memory limit or the resource check's spill budget is a failure. The
file is folded into suite.json. Dry run: the interpreter on CPU (nothing compiles, so no resources),
the first dry job of each kind, 2 processes.
"""

from __future__ import annotations

import argparse
import importlib.util
import multiprocessing
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from concurrent.futures.process import BrokenProcessPool

import bench_mixers
import bench_ops
import bench_train
import check_engine
import check_ops
import torch
from check_mixers import training_step
from common import Report, compile_timer, step_args
from ops import OPS, import_fla

from lmstack.config import load_config
from lmstack.model import LM
from lmstack.model.mixers import MIXERS
from lmstack_kernels.common.compile_check import SPILL_BUDGET

MAX_WORKERS = 16


def jobs(dry_run: bool, fla: bool) -> list[tuple]:
    """The models' training steps (the costliest: whole models' kernels), ("ops_correctness", op,
    case label, dtype) for every case check_ops runs, costliest first, and ("ops_speed", op, T,
    backend) for every shape bench_ops times: long jobs first shorten the pool's critical path."""
    mixers = [m for m in bench_mixers.THROUGHPUT_MIXERS if m in MIXERS][: 1 if dry_run else None]
    out = [("mixers_throughput", name, "350m B=2", "bf16 autocast") for name in mixers]
    out.append(("engine", "hybrid", "tiny.yaml", "bf16"))
    cases = check_ops.DRY_CASES if dry_run else check_ops.GPU_CASES
    out += [
        ("ops_correctness", name, case[0], dtype)
        for case in reversed(check_ops.by_cost(cases))
        for name, op in OPS.items()
        if check_ops.takes(op, case)
        for dtype in check_ops.DTYPES
    ]
    shape = bench_ops.SHAPES["dry" if dry_run else "gpu"]
    backends = ("triton", "fla") if fla else ("triton",)
    out += [("ops_speed", name, T, b) for T in reversed(shape["Ts"]) for name in OPS for b in backends]
    return out


def model_step(job: tuple, dry_run: bool, device: torch.device) -> None:
    """One training step (forward, fp32 loss, backward) of the model a later step trains."""
    step, name = job[:2]
    if step == "mixers_throughput":
        shape = bench_mixers.SHAPES["dry" if dry_run else "gpu"]
        batch = shape["batch"] if dry_run else 2
        config = bench_train._model_config(argparse.Namespace(**{**shape, "batch": batch}, mixer=name))
        model, ids_shape = LM(config).to(device), (batch, shape["seq"] + 1)
    else:  # engine: tiny.yaml with the step's overrides; DeepSpeed's bf16 is a bf16 model
        overrides = check_engine.MODEL + check_engine.TRAIN["dry" if dry_run else "gpu"]
        config = load_config(check_engine.REPO / "configs/tiny.yaml", overrides)
        dtype = torch.float32 if dry_run else torch.bfloat16
        model = LM(config.model).to(device, dtype)
        ids_shape = (config.train.micro_batch_size, config.data.seq_len + 1)
    ids = torch.randint(0, model.config.vocab_size, ids_shape, device=device)
    training_step(model, ids, None, device.type == "cuda")


def launch(job: tuple, dry_run: bool) -> None:
    """One forward and backward of the job's op at its inputs, or of the job's model."""
    step, name, what, how = job
    device = torch.device("cpu" if dry_run else "cuda")
    if step in ("mixers_throughput", "engine"):
        return model_step(job, dry_run, device)
    op = OPS[name]
    if step == "ops_correctness":
        (case,) = [c for c in (check_ops.DRY_CASES if dry_run else check_ops.GPU_CASES) if c[0] == what]
        check_ops.triton_grads(op, check_ops.case_inputs(name, op, case, how, device))
        return
    shape = bench_ops.SHAPES["dry" if dry_run else "gpu"]
    x = bench_ops.op_inputs(op, shape["tokens"] // what, what, shape, device)
    if how == "fla":
        import_fla()
        o = op.fla(x)[0]
    else:
        o = op.run(x, backend="triton")[0]
    o.backward(torch.randn_like(o))


def compiled_kernels() -> dict[str, dict]:
    """Every compiled variant of the lmstack kernels in this process, as loaded on the device."""
    from triton.runtime.jit import JITFunction

    functions = {
        id(fn): fn
        for module_name, module in list(sys.modules.items())
        if module_name.startswith("lmstack_kernels")
        for fn in vars(module).values()
        if isinstance(fn, JITFunction)  # once each, whichever modules import it
    }
    out = {}
    for fn in functions.values():
        name = f"{fn.module.removeprefix('lmstack_kernels.')}.{fn.__name__}"
        for caches in fn.device_caches.values():
            for key, kernel in caches[0].items():  # the first entry: specialization key -> kernel
                out[f"{name} {key}"] = {"kernel": name, "key": str(key), **resources(kernel)}
    return out


def resources(kernel) -> dict:
    """A compiled kernel's launch resources (n_regs and n_spills are set at its first launch)."""
    try:
        meta = kernel.metadata
        return {
            "num_warps": meta.num_warps, "num_stages": meta.num_stages, "shared_B": meta.shared,
            "registers": getattr(kernel, "n_regs", None), "spills_B": getattr(kernel, "n_spills", None),
        }  # fmt: skip
    except AttributeError as err:  # another Triton's CompiledKernel: recorded, not fatal
        return {"error": f"unreadable: {err}"}


def run_job(job: tuple, dry_run: bool) -> dict:
    """Launch one job in a pool process: its row, and the kernels it compiled there."""
    timer = compile_timer()
    before, compiled_before = set(compiled_kernels()), timer.seconds or 0.0
    row: dict = {"kind": "job", "step": job[0], "op": job[1], "case": job[2], "variant": job[3]}
    t0 = time.perf_counter()
    try:
        launch(job, dry_run)
        if not dry_run:
            torch.cuda.synchronize()
    except Exception as err:  # noqa: BLE001  (recorded by the parent)
        row["error"] = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
    row["seconds"] = round(time.perf_counter() - t0, 2)
    row["compile_s"] = None if timer.seconds is None else round(timer.seconds - compiled_before, 2)
    kernels = {k: v for k, v in compiled_kernels().items() if k not in before}
    return {"row": row, "kernels": kernels, "pid": os.getpid()}


def kernel_problems(kernel: dict, smem_limit: int | None) -> list[str]:
    if "error" in kernel:
        return [kernel["error"]]
    out = []
    if smem_limit is not None and kernel["shared_B"] > smem_limit:
        out.append(f"shared memory {kernel['shared_B']} B > the device's {smem_limit} B")
    if kernel["spills_B"] is not None and kernel["spills_B"] > SPILL_BUDGET:
        out.append(f"spills {kernel['spills_B']} B > budget {SPILL_BUDGET} B")
    return out


def main() -> None:
    args = step_args(__doc__.split("\n\n")[0])
    cuda = not args.dry_run
    workers = 2 if args.dry_run else min(MAX_WORKERS, os.cpu_count() or 1)
    # Not bench_ops.fla_unavailable: importing fla here would delay every job (a fla job that cannot
    # import it records the error).
    no_fla = None if cuda else "fla's Triton kernels need a CUDA device"
    if cuda and importlib.util.find_spec("fla") is None:
        no_fla = "fla is not installed"
    todo = jobs(args.dry_run, fla=not no_fla)
    if args.dry_run:  # the interpreter warms nothing: one job of each kind shows the path works
        kinds = {job[0]: job for job in reversed(todo)}
        skipped = [job for job in todo if job not in kinds.values()]
        todo = [job for job in todo if job in kinds.values()]
    # The opt-in limit a launch is checked against (None: not reported, no check).
    props = torch.cuda.get_device_properties(0) if cuda else None
    smem_limit = getattr(props, "shared_memory_per_block_optin", None)
    report = Report(
        "warmup", args, workers=workers, jobs=len(todo), triton_cache=os.environ.get("TRITON_CACHE_DIR"),
        smem_limit_B=smem_limit, spill_budget_B=SPILL_BUDGET, kernels=[],
        measure="jobs: wall s and s in triton.compile per job; kernels: as loaded (CompiledKernel: "
        "n_regs, n_spills from the driver, metadata.shared)",
    )  # fmt: skip
    if no_fla:
        report.skip("fla", no_fla)
    if args.dry_run:
        report.skip("kernels", "Triton's interpreter compiles nothing: no resources to read")
        report.skip(f"{len(skipped)} jobs", "dry run: only the first job of each kind runs")
    seen: set[str] = set()
    compile_s = 0.0
    # spawn: the workers must not inherit this process's CUDA context.
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(workers, mp_context=context) as pool:
        futures = [pool.submit(run_job, job, args.dry_run) for job in todo]
        for future in as_completed(futures):
            try:
                done = future.result()
            except BrokenProcessPool as err:  # a worker died (killed, out of memory): no job can finish
                report.fail(f"warm-up pool: {type(err).__name__}: {err}")
                break
            except Exception as err:  # noqa: BLE001  (this job's record only)
                report.fail(f"warm-up job: {type(err).__name__}: {err}")
                continue
            row = done["row"]
            report.add(row)
            compile_s += row["compile_s"] or 0.0
            report.data["compile_s"] = round(compile_s, 1)  # summed over the workers (CPU seconds)
            if "error" in row:
                report.fail(f"{row['step']} {row['op']} {row['case']} {row['variant']}: {row['error']}")
            for key, kernel in done["kernels"].items():
                if key in seen:  # compiled by two workers at once: the same kernel
                    continue
                seen.add(key)
                kernel["problems"] = kernel_problems(kernel, smem_limit)
                report.data["kernels"].append(kernel)
                for problem in kernel["problems"]:
                    report.fail(f"{kernel['kernel']} ({kernel['key'][:80]}): {problem}")
            print(f"{row} +{len(done['kernels'])} kernels", flush=True)
    report.save()


if __name__ == "__main__":
    main()
