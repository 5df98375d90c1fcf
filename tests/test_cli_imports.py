"""The CLI answers `--help`, `show-config` and argument errors without importing the heavy libraries
(their import is what made it slow; benchmarks/bench_cli.py measures the time). Checked on the
import graph of a fresh process, not on timings."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
HEAVY = ["deepspeed", "transformers", "datasets", "lm_eval", "matplotlib", "accelerate", "tensorboard"]
# torch._dynamo (and triton, which it imports): ~4-5 s; imported by `@torch.compiler.disable` used as a
# plain decorator at import time (lmstack_kernels.common.compiler.disable_compile is the lazy one).
COMPILER = ["torch._dynamo", "triton"]

PROBE = """
import json, sys
from lmstack.cli import main
try:
    main(sys.argv[1:])
except SystemExit as exit_:
    code = exit_.code
else:
    code = 0
heavy = sorted(name for name in json.loads(HEAVY) if name in sys.modules)
print(json.dumps({"code": code, "heavy": heavy}), file=sys.stderr)
"""


LIGHT_COMMANDS = [
    (["--help"], 0),
    (["show-config", "configs/tiny.yaml"], 0),
    (["show-config", "model.n_layer=3"], 2),  # a config error: one line, exit 2
    (["train", "--resume"], 2),  # an argument error
    (["eval", "mqar", "--help"], 0),
]


def _imported(argv, code, names):
    probe = PROBE.replace("json.loads(HEAVY)", repr(names))
    res = subprocess.run(
        [sys.executable, "-c", probe, *argv], capture_output=True, text=True, cwd=REPO, timeout=120
    )
    result = json.loads(res.stderr.strip().splitlines()[-1])
    assert result["code"] == code, res.stderr[-2000:]
    return result["heavy"]


@pytest.mark.parametrize("argv,code", LIGHT_COMMANDS)
def test_light_commands_import_no_heavy_library(argv, code):
    imported = _imported(argv, code, HEAVY)
    assert imported == [], f"lmstack {' '.join(argv)} imported {imported}"


def test_the_model_imports_without_the_compiler_stack():
    imported = _imported(["show-config", "configs/tiny.yaml"], 0, COMPILER)
    assert imported == [], f"lmstack show-config imported {imported}"


def test_import_lmstack_still_registers_the_auto_classes_with_transformers():
    code = (
        "import sys, lmstack; assert 'transformers' not in sys.modules; "
        "from transformers import AutoConfig; "
        "print(type(AutoConfig.for_model('lmstack', vocab_size=11, d_model=8, n_heads=2, n_layers=1)).__name__)"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout.strip().splitlines()[-1] == "LMStackConfig"
