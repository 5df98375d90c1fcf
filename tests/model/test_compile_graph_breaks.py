"""torch.compile's hot path: one block of every registered mixer traces with no graph break (each
break is a separate graph per layer per step, and a host sync on CUDA when it reads a tensor). The
kernels' value checks read tensors back, so they run in eager calls only (`checks_values`)."""

from __future__ import annotations

import pytest
import torch
import torch._dynamo

from lmstack.model import LM, ModelConfig
from lmstack.model.mixers import MIXERS, BatchContext


@pytest.mark.parametrize("mixer", sorted(MIXERS))
def test_a_block_traces_without_graph_breaks(mixer):
    torch._dynamo.reset()
    cfg = ModelConfig.from_dict(
        dict(vocab_size=64, d_model=32, n_layers=1, n_heads=2, max_seq_len=16, mixer=mixer)
    )
    model = LM(cfg)
    ids = torch.randint(0, 64, (2, 16))
    context = BatchContext.for_rows(2, 16, ids.device, offset=0)
    explained = torch._dynamo.explain(model.blocks[0])(model.embed(ids), context, None, False)
    reasons = [
        f"{b.reason.splitlines()[0]} at {b.user_stack[-1] if b.user_stack else '?'}"
        for b in explained.break_reasons
    ]
    assert explained.graph_break_count == 0, reasons


def test_the_value_checks_still_run_in_eager_calls():
    from lmstack_kernels.lightning import lightning_attn

    q = torch.randn(1, 8, 2, 16)
    with pytest.raises(ValueError, match="decay"):
        lightning_attn(q, q, q, torch.tensor([0.5, -0.1]))
