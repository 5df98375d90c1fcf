"""The one numerical tolerance helper of the test suite."""

import torch


def rel_rmse(actual: torch.Tensor, reference: torch.Tensor) -> float:
    """Root-mean-square error of `actual` relative to the RMS of `reference` (both taken in fp64)."""
    a, r = actual.detach().double(), reference.detach().double()
    return ((a - r).pow(2).mean().sqrt() / r.pow(2).mean().sqrt().clamp_min(1e-30)).item()


def assert_rel_rmse(actual: torch.Tensor, reference: torch.Tensor, tol: float, what: str = "") -> None:
    assert actual.shape == reference.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(reference.shape)}"
    err = rel_rmse(actual, reference)
    assert err < tol, f"{what}: relative RMSE {err:.3e} >= {tol:.1e}"
