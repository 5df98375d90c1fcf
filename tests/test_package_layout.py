"""The repository root is on sys.path whenever a command runs from it (`python -m pytest`, `python -m
lmstack.cli`, torchrun's workers): a top-level folder there named like an installed distribution's
package shadows that package in every such process. transformers >= 5.25 requires PyPI's `kernels`
and imports it with `modeling_utils`, so an ops folder called `kernels/` broke every export."""

from __future__ import annotations

import importlib.metadata
import subprocess
import sys
from pathlib import Path

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
