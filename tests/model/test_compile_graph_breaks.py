"""torch.compile's hot path: one block of every registered mixer traces with no graph break (each
break is a separate graph per layer per step, and a host sync on CUDA when it reads a tensor). The
kernels' value checks read tensors back, so they run in eager calls only (`checks_values`). With
packed documents the chunked linear-attention paths run eagerly on purpose
(`lmstack_kernels.common.compiler.eager_with_documents`), and break nowhere else."""

from __future__ import annotations

import pytest
import torch
import torch._dynamo

from lmstack.model import LM, ModelConfig
from lmstack.model.mixers import MIXERS, BatchContext


def graph_breaks(mixer: str, context: BatchContext) -> list[tuple[str, str]]:
    """(first line of the reason, file of the innermost frame) of each graph break when one block of
    `mixer` (width 32, 2 heads) traces a [2, 16] batch under `context`."""
    torch._dynamo.reset()
    cfg = ModelConfig.from_dict(
        dict(vocab_size=64, d_model=32, n_layers=1, n_heads=2, max_seq_len=16, mixer=mixer)
    )
    model = LM(cfg)
    ids = torch.randint(0, 64, (2, 16))
    explained = torch._dynamo.explain(model.blocks[0])(model.embed(ids), context, None, False)
    return [
        (b.reason.splitlines()[0], b.user_stack[-1].filename if b.user_stack else "?")
        for b in explained.break_reasons
    ]


@pytest.mark.parametrize("mixer", sorted(MIXERS))
def test_a_block_traces_without_graph_breaks(mixer):
    assert graph_breaks(mixer, BatchContext.for_rows(2, 16, offset=0)) == []


@pytest.mark.parametrize("mixer", sorted(MIXERS))
def test_packed_documents_break_only_into_the_eager_document_path(mixer):
    doc_ids = torch.zeros(2, 16, dtype=torch.long)
    doc_ids[0, 5:], doc_ids[0, 11:] = 1, 2
    breaks = graph_breaks(mixer, BatchContext.from_doc_ids(doc_ids))
    assert all(file.endswith("common/compiler.py") for _, file in breaks), breaks


def test_the_value_checks_still_run_in_eager_calls():
    from lmstack_kernels.lightning import lightning_attn

    q = torch.randn(1, 8, 2, 16)
    with pytest.raises(ValueError, match="decay"):
        lightning_attn(q, q, q, torch.tensor([0.5, -0.1]))
