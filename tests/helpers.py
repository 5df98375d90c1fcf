"""The numerical tolerance helper of the test suite (relative RMSE), a small-LM learning check, and
cached generation in pieces."""

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


def generate_in_pieces(model, ids: torch.Tensor, prefill: int, steps_until: int):
    """Prefill `prefill` tokens, generate one token at a time up to `steps_until`, then the rest in one
    chunk (if any), the model's cache handed over each time. Returns (the logits joined, the cache)."""
    logits, cache, _ = model(ids[:, :prefill], use_cache=True)
    outs = [logits]
    for t in range(prefill, steps_until):
        logits, cache, _ = model(ids[:, t : t + 1], cache=cache, use_cache=True)
        outs.append(logits)
    if steps_until < ids.shape[1]:
        logits, cache, _ = model(ids[:, steps_until:], cache=cache, use_cache=True)
        outs.append(logits)
    return torch.cat(outs, 1), cache
