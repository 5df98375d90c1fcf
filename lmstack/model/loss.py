"""The next-token loss, written once for every consumer of the LM: the trainer, held-out perplexity,
MQAR and the Hugging Face export.

Labels hold the next token of each input position, or `IGNORE_INDEX` where there is nothing to
predict (the padding of the last validation rows, MQAR's non-query positions). -100 is also the
default `ignore_index` of PyTorch's and Hugging Face's cross-entropy, so labels built here mean the
same there.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100


def next_token_loss_sum(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """logits: [B, T, V] (any float dtype), labels: [B, T] int64 ->
    (sum of the labelled tokens' cross-entropy, computed in fp32: scalar; their number: int64 scalar).

    A sum, not a mean, so that callers can weight micro-batches and ranks by their token counts."""
    loss_sum = F.cross_entropy(
        logits.float().flatten(0, 1), labels.flatten(), ignore_index=IGNORE_INDEX, reduction="sum"
    )
    return loss_sum, (labels != IGNORE_INDEX).sum()


# Tokens per chunk of the fused loss: a [chunk, V] fp32 logits block (200 MB at V = 50K) instead of
# the whole micro-batch's [B * T, V].
FUSED_LOSS_CHUNK = 1024


class _FusedLinearCrossEntropy(torch.autograd.Function):
    """sum of cross-entropy(hidden @ weight.T, labels) without the [N, V] logits: per chunk of tokens,
    the logits, their fp32 log-softmax and the gradients of hidden and weight (softmax - onehot, fp32)
    are computed in the forward; the backward only scales them by the incoming gradient."""

    @staticmethod
    def forward(ctx, hidden, weight, labels, chunk_size, compute_dtype, grad_enabled):  # noqa: ANN001
        # needs_input_grad stays True under torch.no_grad (evaluation): the caller's grad mode decides.
        needs_grad = grad_enabled and (ctx.needs_input_grad[0] or ctx.needs_input_grad[1])
        weight_c = weight.to(compute_dtype)
        weight_f = weight.float() if needs_grad else None
        loss_sum = torch.zeros((), dtype=torch.float32, device=hidden.device)
        grad_hidden = torch.empty_like(hidden, dtype=torch.float32) if needs_grad else None
        grad_weight = torch.zeros_like(weight, dtype=torch.float32) if needs_grad else None
        for start in range(0, hidden.shape[0], chunk_size):
            h = hidden[start : start + chunk_size]
            y = labels[start : start + chunk_size]
            logits = (h.to(compute_dtype) @ weight_c.t()).float()
            labelled = y != IGNORE_INDEX
            target = torch.where(labelled, y, 0)
            logsumexp = torch.logsumexp(logits, dim=-1)
            token_loss = logsumexp - logits.gather(1, target[:, None]).squeeze(1)
            loss_sum += torch.where(labelled, token_loss, 0.0).sum()
            if needs_grad:
                grad_logits = torch.exp(logits.sub_(logsumexp[:, None]))  # softmax, in place
                grad_logits[torch.arange(len(y), device=y.device), target] -= 1.0
                grad_logits.mul_(labelled[:, None])
                grad_hidden[start : start + chunk_size] = grad_logits @ weight_f
                grad_weight.addmm_(grad_logits.t(), h.float())
        if needs_grad:
            ctx.save_for_backward(grad_hidden, grad_weight)
            ctx.dtypes = (hidden.dtype, weight.dtype)
        return loss_sum

    @staticmethod
    def backward(ctx, grad_loss):  # noqa: ANN001
        grad_hidden, grad_weight = ctx.saved_tensors
        hidden_dtype, weight_dtype = ctx.dtypes
        return (
            (grad_hidden * grad_loss).to(hidden_dtype) if ctx.needs_input_grad[0] else None,
            (grad_weight * grad_loss).to(weight_dtype) if ctx.needs_input_grad[1] else None,
            None,
            None,
            None,
            None,
        )


def fused_linear_next_token_loss_sum(
    hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, chunk_size: int = FUSED_LOSS_CHUNK
) -> tuple[torch.Tensor, torch.Tensor]:
    """hidden: [B, T, D] (the final norm's output), weight: [V, D] (the LM head's, tied or not),
    labels: [B, T] int64 -> the same (loss sum, labelled count) as
    `next_token_loss_sum(hidden @ weight.T, labels)`, with logits only ever [chunk_size, V].

    The logits are computed in autocast's dtype when autocast is on (as the LM head would), else in the
    inputs' dtype; log-softmax, loss and gradients in fp32. The gradients are computed in the forward
    (one pass over the vocabulary), so the memory held for backward is [B*T, D] + [V, D] fp32."""
    if chunk_size < 1:
        raise ValueError(f"chunk_size: expected a positive number of tokens, got {chunk_size}")
    if hidden.shape[:-1] != labels.shape or hidden.shape[-1] != weight.shape[1]:
        raise ValueError(
            f"hidden/weight/labels: expected [B, T, D], [V, D], [B, T], got "
            f"{list(hidden.shape)}, {list(weight.shape)}, {list(labels.shape)}"
        )
    device_type = hidden.device.type
    if torch.is_autocast_enabled(device_type):
        compute_dtype = torch.get_autocast_dtype(device_type)
    else:
        compute_dtype = torch.promote_types(hidden.dtype, weight.dtype)
    loss_sum = _FusedLinearCrossEntropy.apply(
        hidden.flatten(0, 1), weight, labels.flatten(), chunk_size, compute_dtype, torch.is_grad_enabled()
    )
    return loss_sum, (labels != IGNORE_INDEX).sum()
