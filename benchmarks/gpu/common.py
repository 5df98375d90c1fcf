"""What every step of the GPU suite shares: its arguments, the environment record and the result file.

Each step (`warmup.py`, `check_ops.py`, `check_mixers.py`, `bench_ops.py`, `bench_mixers.py`,
`check_engine.py`) writes one `$OUT/<step>.json` through `Report`, rewritten (atomically) after every
case, so that a step stopped at its time cap still leaves what it measured. Every file holds the
environment (`device`, `versions`, `date_utc`, `dry_run`), the step's `results`, `failures` (checks
that did not pass: one line each), `skipped` (what could not run here, and why) and `compile_s` (wall
seconds this process spent in `triton.compile`, cache loads included; None where nothing compiled,
as under the interpreter).

The steps import from benchmarks/ (timing), tests/ (`helpers.rel_rmse`) and this folder: suite.sh puts
all three on PYTHONPATH, next to the repository root (which holds `lmstack` and `lmstack_kernels`).

Run as a script it keeps the suite's own record, `$OUT/suite.json` (used by suite.sh):
    python common.py start OUT DRY BUDGET_S        environment and an empty step list
    python common.py step OUT NAME STATUS SECONDS [REASON]
                                                   (the step's `compile_s` is copied; the files of
                                                   FOLDED steps move into suite.json: 8 files return)
    python common.py finish OUT                    versions again, a summary table; exit 1 if a step
                                                   failed or timed out, or a check failed
"""

from __future__ import annotations

import argparse
import functools
import importlib.metadata
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]

# Steps whose whole result file is kept in suite.json (the device returns at most 8 files).
FOLDED = ("warmup", "compile_probe")
PACKAGES = ("torch", "triton", "transformers", "deepspeed", "fla-core", "pydantic", "numpy")


def versions() -> dict[str, str | None]:
    """Installed versions of the packages the suite depends on (None: not installed), read from
    their metadata so that nothing heavy is imported."""
    out: dict[str, str | None] = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = None
    return out


def environment(dry_run: bool) -> dict[str, Any]:
    env: dict[str, Any] = {
        "dry_run": dry_run,
        "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "versions": versions(),
    }
    if "torch" in sys.modules:  # steps import torch; the suite's own record does not need it
        import torch

        cuda = torch.cuda.is_available()
        env["device"] = torch.cuda.get_device_name() if cuda else f"cpu ({os.cpu_count()} cores)"
        env["versions"]["torch"] = torch.__version__
        env["versions"]["cuda"] = torch.version.cuda
    return env


def step_args(description: str, **flags: str) -> argparse.Namespace:
    """The arguments every step takes: where results go and whether this is the CPU dry run; and
    the step's own on/off `flags` (name -> help)."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--out", type=Path, required=True, help="folder of the result files ($OUT)")
    p.add_argument(
        "--dry-run", action="store_true", help="CPU, Triton interpreter, tiny shapes; timings not meaningful"
    )
    for name, help_ in flags.items():
        p.add_argument(f"--{name.replace('_', '-')}", action="store_true", help=help_)
    return p.parse_args()


class CompileTimer:
    """Wall seconds spent in `triton.compile` in this process, per kernel: the JIT looks `compile` up
    in `triton.compiler` when it first builds a kernel's launcher, so wrapping it there (before any
    launch) sees every compilation, cache loads included. Without Triton, or under the interpreter
    (which compiles nothing), `seconds` stays None. One per process: `compile_timer()`."""

    def __init__(self) -> None:
        self.seconds: float | None = None
        self.kernels: dict[str, float] = {}  # kernel name -> seconds, summed over its variants
        try:
            import triton.compiler
        except ImportError:
            return
        compile_fn = triton.compiler.compile

        def timed(src, *args, **kwargs):
            t0 = time.perf_counter()
            try:
                return compile_fn(src, *args, **kwargs)
            finally:
                seconds = time.perf_counter() - t0
                name = getattr(src, "name", None) or getattr(getattr(src, "fn", None), "__name__", "?")
                self.seconds = (self.seconds or 0.0) + seconds
                self.kernels[name] = self.kernels.get(name, 0.0) + seconds

        triton.compiler.compile = timed


@functools.cache
def compile_timer() -> CompileTimer:
    return CompileTimer()


class Report:
    """One step's result file: `Report(name, args, **fields)`, then `add`, `fail`, `skip`."""

    def __init__(self, name: str, args: argparse.Namespace, **fields: Any) -> None:
        self.path = Path(args.out) / f"{name}.json"
        self.compile_timer = compile_timer()
        self.data = {"step": name, **environment(args.dry_run), **fields}
        self.data.update(results=[], failures=[], skipped={}, compile_s=None)
        self.save()

    def add(self, row: dict[str, Any]) -> None:
        self.data["results"].append(row)
        self.save()

    def fail(self, line: str) -> None:
        print(f"FAIL {line}", flush=True)
        self.data["failures"].append(line)
        self.save()

    def skip(self, what: str, why: str) -> None:
        print(f"skip {what}: {why}", flush=True)
        self.data["skipped"][what] = why
        self.save()

    def save(self) -> None:
        if self.compile_timer.seconds is not None:  # a step may set compile_s itself (children's)
            self.data["compile_s"] = round(self.compile_timer.seconds, 1)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.data, indent=2, default=str) + "\n")
        tmp.replace(self.path)


def _gpu_info() -> str | None:
    """nvidia-smi's name, driver and memory of each GPU (None without nvidia-smi)."""
    query = ["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"]
    try:
        return subprocess.run(query, capture_output=True, text=True, timeout=30).stdout.strip() or None
    except (OSError, subprocess.TimeoutExpired):
        return None


def _step_result(result: Path, fold: bool) -> dict[str, Any]:
    """What suite.json keeps of a step's result file: its failures (a count), `compile_s`, and for a
    folded step the whole file (then removed)."""
    if not result.exists():
        return {}
    try:
        data = json.loads(result.read_text())
    except json.JSONDecodeError:
        return {"failures": None}
    out = {"failures": len(data.get("failures", [])), "compile_s": data.get("compile_s")}
    if fold:
        out["result"] = data
        result.unlink()
    return out


def _suite_record(argv: list[str]) -> int:
    command, out = argv[0], Path(argv[1])
    path = out / "suite.json"
    if command == "start":
        dry, budget = argv[2] == "1", float(argv[3])
        data = {"suite": "benchmarks/gpu/suite.sh", **environment(dry), "budget_s": budget, "steps": []}
        data["gpu"] = _gpu_info()
    elif command == "step":
        data = json.loads(path.read_text())
        name, status, seconds = argv[2], argv[3], float(argv[4])
        entry = {"name": name, "status": status, "seconds": round(seconds, 1)}
        if len(argv) > 5 and argv[5]:
            entry["reason"] = argv[5]
        entry.update(_step_result(out / f"{name}.json", fold=name in FOLDED))
        data["steps"].append(entry)
    elif command == "finish":  # versions again, now that the carried wheels are installed
        import torch  # noqa: F401  (for the device name and CUDA version)

        data = json.loads(path.read_text())
        data.update(environment(data["dry_run"]), date_utc=data["date_utc"])
        data["seconds"] = round(sum(step["seconds"] for step in data["steps"]), 1)
        data["compile_s"] = round(sum(step.get("compile_s") or 0 for step in data["steps"]), 1)
    else:
        raise SystemExit(f"common.py: unknown command {command!r}; expected start, step or finish")
    path.write_text(json.dumps(data, indent=2) + "\n")
    if command != "finish":
        return 0
    print(f"\n{data['device']}  {data['gpu'] or ''}  {data['versions']}")
    bad = 0
    for step in data["steps"]:
        failures = step.get("failures")
        bad += step["status"] not in ("ok", "skipped") or bool(failures)
        print(
            f"{step['name']:18s} {step['status']:8s} {step['seconds']:6.1f}s  compile {step.get('compile_s')}s  "
            f"failures: {failures}  {step.get('reason', '')}"
        )
    print(f"files in {out}: {' '.join(sorted(p.name for p in out.iterdir()))}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(_suite_record(sys.argv[1:]))
