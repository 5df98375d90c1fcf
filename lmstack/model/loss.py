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
