"""Package discovery only (metadata lives in pyproject.toml).

The Triton kernels live in ./kernels but import as `lmstack_kernels`: PyPI already has a `kernels`
package, so that import name would collide.
"""

from setuptools import find_packages, setup

kernel_packages = ["lmstack_kernels"] + [f"lmstack_kernels.{p}" for p in find_packages("kernels")]
setup(
    packages=find_packages(include=["lmstack", "lmstack.*"]) + kernel_packages,
    package_dir={"lmstack_kernels": "kernels"},
)
