"""The numerical tolerance helper of the test suite (relative RMSE), and a small-LM learning check."""

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


def assert_lm_learns(model: torch.nn.Module, vocab_size: int) -> None:
    """A small LM fits a repeated 12-token pattern on CPU: within 30 AdamW steps the loss falls below
    half its start."""
    seq = torch.tensor([3, 1, 4, 1, 5, 9, 2, 6, 5, 3, 5, 8] * 6)
    ids = seq[None].repeat(2, 1)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(30):
        logits = model(ids[:, :-1]).logits
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, vocab_size), ids[:, 1:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert math.isfinite(losses[-1])
    assert losses[-1] < 0.5 * losses[0], losses
