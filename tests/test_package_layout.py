"""What a fresh clone imports and installs.

The repository root is on sys.path whenever a command runs from it (`python -m pytest`, `python -m
lmstack.cli`, torchrun's workers): a top-level folder there named like an installed distribution's
package shadows that package in every such process. transformers >= 5.25 requires PyPI's `kernels`
and imports it with `modeling_utils`, so an ops folder called `kernels/` broke every export. The
install pins (constraints.txt) keep such an upstream release from changing a fresh clone's result."""

from __future__ import annotations

import importlib.metadata
import subprocess
import sys
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

REPO = Path(__file__).resolve().parents[1]


def top_level_modules() -> set[str]:
    """What `import NAME` finds in the repository root: packages and single-file modules."""
    packages = {p.name for p in REPO.iterdir() if (p / "__init__.py").is_file()}
    return packages | {p.stem for p in REPO.glob("*.py")}


def test_the_repository_root_holds_only_lmstack_packages() -> None:
    assert top_level_modules() == {"lmstack", "lmstack_kernels"}


def test_no_installed_distribution_is_shadowed_by_the_repository_root() -> None:
    owners = importlib.metadata.packages_distributions()
    shadowed = {name: owners[name] for name in top_level_modules() if set(owners.get(name, ())) - {"lmstack"}}
    assert not shadowed


def test_transformers_models_import_from_the_repository_root() -> None:
    # The failure this guards against: `from kernels import ...` inside transformers resolving to a
    # folder of this repository because the working directory comes first on sys.path.
    probe = "import transformers.modeling_utils, lmstack.export.hf"
    run = subprocess.run([sys.executable, "-c", probe], cwd=REPO, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-2000:]


def test_the_constraints_pin_every_dependency_within_its_range() -> None:
    """constraints.txt (the versions the suite passed with, used by the README and .ci/run) pins each
    direct dependency but torch and triton, each inside pyproject's range."""
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    required = [Requirement(r) for r in project["dependencies"] + project["optional-dependencies"]["dev"]]
    pins = {}
    for line in (REPO / "constraints.txt").read_text().splitlines():
        if line and not line.startswith("#"):
            name, version = line.split("==")
            pins[canonicalize_name(name)] = version
    for req in required:
        name = canonicalize_name(req.name)
        if name in ("torch", "triton"):
            assert name not in pins, f"{name} is pinned by the README's first install, not constraints.txt"
        else:
            assert name in pins and req.specifier.contains(pins[name]), (req, pins.get(name))


def test_ci_runs_the_readme_test_command() -> None:
    command = (REPO / ".ci/run").read_text().strip().splitlines()[-1]
    assert f"```bash\n{command}\n```" in (REPO / "README.md").read_text()
