"""benchmarks/gpu/suite.sh --cpu-dry-run: the GPU suite's own logic on CPU (interpreter, tiny shapes),
so that a broken suite cannot land; its time budget, which skips what no longer fits, and caps that
fit the device's; results that survive a step stopped midway; failures recorded, not fatal."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
STEPS = [
    "install",
    "warmup",  # folded into suite.json
    "ops_correctness",
    "mixer_checks",
    "engine",
    "ops_speed",
    "train_vs_hf",
    "mixers_throughput",
    "compile_probe",  # folded into suite.json
    "decode",  # bench_decode.py, into mixers_throughput.json
]
FOLDED = ("warmup", "compile_probe")
DEVICE_BUDGET_S = 900  # device time per session, start-up included
STEP_KEYS = {"step", "dry_run", "date_utc", "versions", "device", "results", "failures", "skipped"}


def run_suite(out: Path, budget_s: int | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ, OUT=str(out), PYTHON=sys.executable)
    if budget_s is not None:
        env["SUITE_BUDGET_S"] = str(budget_s)
    cmd = ["bash", str(REPO / "benchmarks/gpu/suite.sh"), "--cpu-dry-run"]
    # Longer than the dry run's own budget (540 s x 6), so that its time caps, not this, end a slow run.
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=540 * 6 + 120)


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[subprocess.CompletedProcess, Path]:
    out = tmp_path_factory.mktemp("gpu-suite")
    return run_suite(out), out


def test_dry_run_passes_and_reports_every_step(dry_run) -> None:
    proc, out = dry_run
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    suite = json.loads((out / "suite.json").read_text())
    assert suite["dry_run"] is True and suite["versions"]["torch"]
    steps = {s["name"]: s for s in suite["steps"]}
    assert list(steps) == STEPS
    for step in steps.values():
        assert step["status"] in ("ok", "skipped"), step
        if step["status"] == "skipped":
            assert step["reason"], step
    assert steps["install"]["status"] == "skipped"  # nothing is installed here
    for name, step in steps.items():  # wall seconds for all; compile seconds for those that ran
        assert step["seconds"] >= 0 and (
            step["status"] == "skipped" or "compile_s" in step or name == "decode"
        )


def test_dry_run_files_fit_what_the_device_returns(dry_run) -> None:
    _, out = dry_run
    files = sorted(p.name for p in out.iterdir())
    assert len(files) <= 8 and all(p.is_file() for p in out.iterdir()), files
    assert all(re.fullmatch(r"[A-Za-z0-9._-]+", f) for f in files), files
    assert "suite.log" in files and "=== ops_correctness" in (out / "suite.log").read_text()


@pytest.mark.parametrize("step", [s for s in STEPS if s not in ("install", "train_vs_hf", "decode", *FOLDED)])
def test_step_json_has_results_or_skips_and_no_failures(dry_run, step: str) -> None:
    _, out = dry_run
    data = json.loads((out / f"{step}.json").read_text())
    assert set(data) >= STEP_KEYS, sorted(STEP_KEYS - set(data))
    assert data["step"] == step and data["dry_run"] is True
    assert data["failures"] == []
    assert data["results"], f"{step}: no results"


def test_step_contents(dry_run) -> None:
    _, out = dry_run
    load = lambda name: json.loads((out / f"{name}.json").read_text())
    ops = load("ops_correctness")["results"]
    assert {r["reference"] for r in ops} == {"naive fp64", "chunked PyTorch fp32"}
    assert {r["dtype"] for r in ops} == {"fp32", "bf16"} and all(r["passed"] for r in ops)
    assert all({"o", "final_state", "dq", "dk", "dv", "d_initial_state"} <= set(r["rel_rmse"]) for r in ops)
    mixers = load("mixer_checks")
    assert {r["mixer"] for r in mixers["results"]} == set(mixers["mixers"])
    assert all(f"{m} sync check" in mixers["skipped"] for m in mixers["mixers"])  # CUDA only
    speed = load("ops_speed")
    assert {"sdpa", "lightning_triton"} <= {r["method"] for r in speed["results"]} and "fla" in speed[
        "skipped"
    ]
    engine = {r["what"]: r for r in load("engine")["results"]}
    assert engine["train"]["steps"] == 2 and engine["generate"]["cached_equals_uncached"] is True
    train = load("train_vs_hf")
    assert {r["variant"] for r in train["results"]} == {"hf_llama", "lmstack"} and "vs_hf_llama" in train
    assert load("mixers_throughput")["results"][0]["tokens_per_s"] > 0
    decode = load("mixers_throughput")["decode"]
    assert decode["failures"] == [] and decode["quick"] is True
    assert (
        {r["mixer"] for r in decode["results"]}
        == set(decode["mixers"])
        == set(mixers["mixers"]) - {"shortconv"}
    )
    assert all(r["cache_equals_full"] for r in decode["results"])


def test_folded_steps_are_kept_in_suite_json(dry_run) -> None:
    _, out = dry_run
    steps = {s["name"]: s for s in json.loads((out / "suite.json").read_text())["steps"]}
    for name in FOLDED:
        assert not (out / f"{name}.json").exists()
        result = steps[name]["result"]
        assert result["step"] == name and result["failures"] == [] and result["results"], result
    warmup = steps["warmup"]["result"]
    # One job of each kind in the dry run; no errors; the interpreter compiles nothing.
    assert {r["step"] for r in warmup["results"]} == {
        "mixers_throughput",
        "engine",
        "ops_correctness",
        "ops_speed",
    }
    assert all("error" not in r and r["seconds"] > 0 for r in warmup["results"])
    assert warmup["kernels"] == [] and "kernels" in warmup["skipped"]
    (probe,) = steps["compile_probe"]["result"]["results"]
    assert probe["what"] == "train.compile=true" and len(probe["step_times_s"]) == 3
    # The first steps compile (inductor): the estimate is their time beyond the steady step.
    assert probe["compile_s"] == steps["compile_probe"]["compile_s"] > 0


def test_budget_skips_what_does_not_fit(tmp_path: Path) -> None:
    proc = run_suite(tmp_path, budget_s=30)
    assert proc.returncode == 0, proc.stdout[-3000:]
    steps = json.loads((tmp_path / "suite.json").read_text())["steps"]
    assert [s["name"] for s in steps] == STEPS
    assert all(s["status"] == "skipped" and s["reason"] for s in steps)


def suite_caps() -> tuple[dict[str, int], dict[str, int]]:
    """suite.sh's steps and caps on the GPU (install's from its GPU branch), and its constants."""
    text = (REPO / "benchmarks/gpu/suite.sh").read_text()
    caps = {m[1]: int(m[2]) for m in re.finditer(r"^\s*run_step (\w+) (\d+) ", text, re.M)}
    consts = {k: int(v) for k, v in re.findall(r"^(KILL_AFTER|FINISH)=(\d+)", text, re.M)}
    consts["BUDGET"] = int(re.search(r"SUITE_BUDGET_S:-\$\(\((\d+) \* SCALE", text)[1])
    return caps, consts


def test_caps_fit_the_budget_and_match_the_readme() -> None:
    caps, consts = suite_caps()
    assert list(caps) == STEPS
    # Every step at its cap, the last one killed, and the summary: still within the suite's budget.
    assert sum(caps.values()) + consts["KILL_AFTER"] + consts["FINISH"] <= consts["BUDGET"], (caps, consts)
    readme = (REPO / "benchmarks/README.md").read_text()
    table = {m[1]: int(m[2]) for m in re.finditer(r"^\| (\w+) \((\d+) s", readme, re.M)}
    assert table == caps  # the README's table of steps says what suite.sh does
    # The call's timeout and the device's start-up within the 15 minutes of device time.
    timeout_s = int(re.search(r"timeout_s: (\d+)", readme)[1])
    startup_s = int(re.search(r"start-up allowance: (\d+) s", readme)[1])
    assert consts["BUDGET"] < timeout_s and timeout_s + startup_s <= DEVICE_BUDGET_S


BENCH_TRAIN = """
import sys, time
sys.argv = ["bench_train.py", "--preset", "cpu", "--variants", "lmstack,hf_llama", "--rounds", "1", "--out", {out!r}]
import bench_train

def fake_spawn(a, variant):  # a finished lmstack row; hf_llama fails or never finishes
    if variant == "hf_llama":
        if {hang}:
            time.sleep(3600)
        raise SystemExit(f"variant {{variant}} failed")
    return dict(variant=variant, params=10, tokens_per_s=100.0, step_time_s_median=1.0, step_cpu_s_median=1.0,
                peak_rss_gib=1.0, peak_rss_over_baseline_gib=0.1, compile_s=2.5)

bench_train._spawn = fake_spawn
bench_train.main()
"""


def start_bench_train(out: Path, hang: bool) -> subprocess.Popen:
    env = dict(
        os.environ, PYTHONPATH=os.pathsep.join([str(REPO / "benchmarks"), os.environ.get("PYTHONPATH", "")])
    )
    code = textwrap.dedent(BENCH_TRAIN.format(out=str(out), hang=hang))
    return subprocess.Popen(
        [sys.executable, "-c", code], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def test_bench_train_stopped_midway_keeps_the_finished_variants(tmp_path: Path) -> None:
    out = tmp_path / "train_vs_hf.json"
    proc = start_bench_train(out, hang=True)
    deadline = time.monotonic() + 300  # a bound on waiting, not a timing assertion
    while not out.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.5)
    assert proc.poll() is None, proc.communicate()[1][-2000:]  # still in the second variant
    proc.send_signal(signal.SIGTERM)  # as `timeout` stops a step at its cap
    proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGTERM
    data = json.loads(out.read_text())
    assert [r["variant"] for r in data["results"]] == ["lmstack"] and data["compile_s"] == 2.5
    assert not list(tmp_path.glob("*.tmp"))


def test_bench_train_records_a_failing_variant_and_goes_on(tmp_path: Path) -> None:
    out = tmp_path / "train_vs_hf.json"
    proc = start_bench_train(out, hang=False)
    _, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 1, stderr[-2000:]
    data = json.loads(out.read_text())
    assert [r["variant"] for r in data["results"]] == ["lmstack"]
    assert data["failures"] == ["round 0 hf_llama: variant hf_llama failed"]
    assert "vs_hf_llama" not in data


def test_step_record_folds_and_counts(tmp_path: Path) -> None:
    common = [sys.executable, str(REPO / "benchmarks/gpu/common.py")]
    subprocess.run([*common, "start", str(tmp_path), "1", "100"], check=True)
    (tmp_path / "warmup.json").write_text(
        json.dumps({"results": [{"x": 1}], "failures": ["a", "b"], "compile_s": 7.5})
    )
    (tmp_path / "engine.json").write_text(json.dumps({"results": [], "failures": [], "compile_s": None}))
    subprocess.run([*common, "step", str(tmp_path), "warmup", "timeout", "12", "stopped"], check=True)
    subprocess.run([*common, "step", str(tmp_path), "engine", "ok", "3"], check=True)
    warmup, engine = json.loads((tmp_path / "suite.json").read_text())["steps"]
    assert warmup == {
        "name": "warmup", "status": "timeout", "seconds": 12.0, "reason": "stopped", "failures": 2,
        "compile_s": 7.5, "result": {"results": [{"x": 1}], "failures": ["a", "b"], "compile_s": 7.5},
    }  # fmt: skip
    assert not (tmp_path / "warmup.json").exists() and (tmp_path / "engine.json").exists()
    assert engine["failures"] == 0 and engine["compile_s"] is None and "result" not in engine


def test_warmup_covers_every_case_the_ops_steps_launch(monkeypatch: pytest.MonkeyPatch) -> None:
    for folder in ("tests", "benchmarks", "benchmarks/gpu"):  # as suite.sh's PYTHONPATH
        monkeypatch.syspath_prepend(str(REPO / folder))
    import bench_ops
    import check_ops
    import warmup
    from ops import OPS

    todo = warmup.jobs(dry_run=False, fla=True)
    checked = {
        (n, c[0], d)
        for c in check_ops.GPU_CASES
        for n, op in OPS.items()
        if check_ops.takes(op, c)
        for d in check_ops.DTYPES
    }
    assert {(n, c, d) for s, n, c, d in todo if s == "ops_correctness"} == checked
    timed = {(n, T, b) for T in bench_ops.SHAPES["gpu"]["Ts"] for n in OPS for b in ("triton", "fla")}
    assert {(n, T, b) for s, n, T, b in todo if s == "ops_speed"} == timed
    assert [n for s, n, *_ in todo if s == "mixers_throughput"] == [
        "attention",
        "lightning",
        "gla",
        "deltanet",
        "gated_deltanet",
    ]
    assert todo.index(("ops_correctness", "deltanet", "long-8k-d256", "fp32")) < todo.index(
        ("ops_correctness", "deltanet", "dense", "fp32")
    )


def test_fla_autotuning_is_bounded_to_one_config(tmp_path: Path) -> None:
    pytest.importorskip("fla")
    code = textwrap.dedent("""
        import sys
        import ops
        ops.import_fla()
        import triton, triton.language as tl
        from triton.runtime.autotuner import Autotuner
        import fla.ops.gla, fla.ops.delta_rule, fla.ops.simple_gla  # noqa: F401

        @triton.autotune(configs=[triton.Config({}, num_warps=w) for w in (1, 2, 4)], key=[])
        @triton.jit
        def kernel(x):
            pass

        tuners = [v for n, m in list(sys.modules.items()) if n.startswith("fla.") for v in vars(m).values() if isinstance(v, Autotuner)]
        print(len(kernel.configs), len(tuners), max(len(t.configs) for t in tuners))
    """)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO / "benchmarks/gpu"), os.environ.get("PYTHONPATH", "")])
    script = tmp_path / "bounded.py"  # a file: @triton.jit reads its source
    script.write_text(code)
    proc = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ours, fla_tuners, most = map(int, proc.stdout.split()[-3:])
    assert ours == 1 and fla_tuners > 50 and most == 1


def test_warmup_reads_compiled_kernels_resources(tmp_path: Path) -> None:
    # A real JITFunction (no interpreter) with a compiled kernel put in its device cache as the JIT
    # would after a launch; the resources as Triton's CompiledKernel holds them.
    (tmp_path / "probe_kernels.py").write_text(
        "import triton\n\n\n@triton.jit\ndef probe_kernel(x):\n    pass\n"
    )
    (tmp_path / "run_probe.py").write_text(
        textwrap.dedent("""
        import sys
        from types import SimpleNamespace
        import probe_kernels

        sys.modules["lmstack_kernels.probe"] = probe_kernels  # found as a module of lmstack_kernels
        meta = SimpleNamespace(num_warps=4, num_stages=2, shared=300 * 1024)
        kernel = SimpleNamespace(metadata=meta, n_regs=128, n_spills=20000)
        probe_kernels.probe_kernel.device_caches[0] = ({"spec-a": kernel}, None, None, None, None)
        import warmup
        (row,) = warmup.compiled_kernels().values()
        print(row)
        print(warmup.kernel_problems(row, 227 * 1024))
    """)
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    folders = [tmp_path, REPO / "benchmarks/gpu", REPO / "benchmarks", REPO / "tests"]
    env["PYTHONPATH"] = os.pathsep.join([*map(str, folders), os.environ.get("PYTHONPATH", "")])
    cmd = [sys.executable, str(tmp_path / "run_probe.py")]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    row, problems = proc.stdout.strip().splitlines()[-2:]
    assert eval(row) == {
        "kernel": "probe_kernels.probe_kernel", "key": "spec-a", "num_warps": 4, "num_stages": 2,
        "shared_B": 300 * 1024, "registers": 128, "spills_B": 20000,
    }  # fmt: skip
    assert eval(problems) == [
        f"shared memory {300 * 1024} B > the device's {227 * 1024} B",
        "spills 20000 B > budget 16384 B",
    ]
