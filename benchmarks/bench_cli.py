"""Start-up time of the `lmstack` command against a bare `python -c "import torch"`.

    python benchmarks/bench_cli.py [--repeats 5] [--out benchmarks/results/cli_cpu.json]

Each command runs in a fresh process, the commands interleaved over the repeats so that background
load on a shared machine hits them alike; best and median wall times are reported, and each
command's median over the `import torch` median. The commands answer without importing deepspeed,
transformers, datasets, lm_eval or matplotlib (tests/test_cli_imports.py checks the import graph).
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench_data import write_report  # noqa: E402 (benchmarks/ is the script's folder)

LMSTACK = [sys.executable, "-m", "lmstack.cli"]
COMMANDS = {
    "import_torch": [sys.executable, "-c", "import torch"],
    "lmstack_help": [*LMSTACK, "--help"],
    "show_config": [*LMSTACK, "show-config", str(ROOT / "configs" / "tiny.yaml")],
    "argument_error": [*LMSTACK, "train", "--resume"],
    "config_error": [*LMSTACK, "show-config", "model.n_layer=3"],
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "cli_cpu.json"))
    args = ap.parse_args()
    times: dict[str, list[float]] = {name: [] for name in COMMANDS}
    for _ in range(args.repeats):
        for name, cmd in COMMANDS.items():
            t0 = time.perf_counter()
            subprocess.run(cmd, capture_output=True, cwd=ROOT)
            times[name].append(time.perf_counter() - t0)
    base = statistics.median(times["import_torch"])
    results = {
        name: {
            "best_s": round(min(t), 3),
            "median_s": round(statistics.median(t), 3),
            "median_over_import_torch": round(statistics.median(t) / base, 2),
        }
        for name, t in times.items()
    }
    commands = {name: " ".join(cmd[1:]) for name, cmd in COMMANDS.items()}
    write_report(args.out, "lmstack CLI start-up", results, repeats=args.repeats, commands=commands)


if __name__ == "__main__":
    main()
