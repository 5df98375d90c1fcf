"""The one numerical tolerance helper of the test suite, and a check that a tiny LM learns."""

import math

import torch


def rel_rmse(actual: torch.Tensor, reference: torch.Tensor) -> float:
    """Root-mean-square error of `actual` relative to the RMS of `reference` (both taken in fp64)."""
    a, r = actual.detach().double(), reference.detach().double()
    return ((a - r).pow(2).mean().sqrt() / r.pow(2).mean().sqrt().clamp_min(1e-30)).item()


def assert_rel_rmse(actual: torch.Tensor, reference: torch.Tensor, tol: float, what: str = "") -> None:
    assert actual.shape == reference.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(reference.shape)}"
    err = rel_rmse(actual, reference)
    assert err < tol, f"{what}: relative RMSE {err:.3e} >= {tol:.1e}"


def assert_lm_learns(model: torch.nn.Module, ids: torch.Tensor, steps: int = 30, lr: float = 1e-2) -> None:
    """AdamW on one fixed batch `ids` [B, T+1] (next-token loss): the loss must at least halve."""
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    losses = []
    for _ in range(steps):
        logits = model(ids[:, :-1]).logits
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert math.isfinite(losses[-1])
    assert losses[-1] < 0.5 * losses[0], losses
