"""Perplexity on the held-out split of prepared data (`lmstack eval ppl`).

Reads every token of the validation split once (`lmstack.data.ValReader`: fixed-length rows of the
split's token stream, documents marked), runs the lmstack `LM` (of an export or a checkpoint, read by
`lmstack.eval.loading.load_model`) with the same document masking as training, and reports the mean
next-token loss, perplexity and bits per token.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

import torch

from lmstack.dtypes import parse_dtype
from lmstack.errors import LMStackError
from lmstack.eval.loading import default_device, load_model


@torch.no_grad()
def scored_rows(
    model,
    data_dir: str | Path,
    seq_len: int,
    batch_size: int = 8,
    max_batches: int | None = None,
    split: str = "val",
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    join_documents: bool = False,
):
    """Yields (losses, labelled, doc_ids) per batch of the split's rows of `seq_len` tokens: the
    next-token cross-entropy of each position in fp32 ([B, T], 0 where unlabelled), the labelled
    mask ([B, T] bool) and the rows' document ids ([B, T], on the host). Documents are masked as in
    training unless `join_documents` (then each row is one context, as a plain forward sees it)."""
    import torch.nn.functional as F

    from lmstack.data import ValReader
    from lmstack.model import BatchContext
    from lmstack.model.loss import IGNORE_INDEX

    reader = ValReader(data_dir, seq_len, batch_size, split=split)
    vocab = getattr(reader.index, "vocab_size", None)
    if vocab is not None and vocab > model.config.vocab_size:
        raise LMStackError(
            f"{data_dir}: its tokenizer has {vocab} tokens but the model only {model.config.vocab_size}: "
            "not the data this model was trained on"
        )
    model = model.to(device=device, dtype=dtype).eval()
    for b, batch in enumerate(reader):
        if max_batches is not None and b >= max_batches:
            break
        ids = batch.input_ids.to(device)
        context = None if join_documents else BatchContext.from_doc_ids(batch.doc_ids, device)
        logits = model(ids, context).logits
        labels = batch.labels.to(device)
        losses = F.cross_entropy(
            logits.float().transpose(1, 2), labels, ignore_index=IGNORE_INDEX, reduction="none"
        )
        yield losses, labels != IGNORE_INDEX, batch.doc_ids


def perplexity(
    model,
    data_dir: str | Path,
    seq_len: int,
    batch_size: int = 8,
    max_batches: int | None = None,
    split: str = "val",
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
) -> dict[str, Any]:
    if seq_len > model.config.max_seq_len:
        raise LMStackError(f"--seq-len {seq_len} exceeds the model's max_seq_len {model.config.max_seq_len}")
    nll, count, batches = 0.0, 0, 0
    start = time.perf_counter()
    for losses, labelled, _ in scored_rows(
        model, data_dir, seq_len, batch_size, max_batches, split, device, dtype
    ):
        nll += losses.sum().item()
        count += int(labelled.sum())
        batches += 1
    n_batches = math.ceil(math.ceil(max(_split_tokens(data_dir, split) - 1, 0) / seq_len) / batch_size)
    if count == 0:
        raise LMStackError(f"{data_dir}: the '{split}' split has no tokens to score")
    loss = nll / count
    return {
        "data": str(data_dir),
        "split": split,
        "seq_len": seq_len,
        "tokens": count,
        "loss": loss,
        "perplexity": math.exp(loss),
        "bits_per_token": loss / math.log(2),
        "complete": batches == n_batches,
        "seconds": round(time.perf_counter() - start, 2),
    }


def _split_tokens(data_dir: str | Path, split: str) -> int:
    from lmstack.data import load_index

    return load_index(data_dir).num_tokens(split)


def run_ppl(
    model_path: str,
    data_dir: str | None = None,
    seq_len: int | None = None,
    batch_size: int = 8,
    max_batches: int | None = None,
    device: str | None = None,
    dtype: str = "float32",
    output: str | None = None,
    split: str = "val",
    log=print,
) -> dict[str, Any]:
    """The work behind `lmstack eval ppl`."""
    torch_dtype = parse_dtype(dtype)
    device = default_device(device)
    loaded = load_model(model_path, dtype, hf=False, device=device)
    lm, run_config = loaded.model, loaded.run_config
    if data_dir is None:
        if run_config is None:
            raise LMStackError("--data: give the prepared data folder (the model folder does not name one)")
        data_dir = run_config.data.path
    if seq_len is None:
        seq_len = run_config.data.seq_len if run_config is not None else lm.config.max_seq_len
    result = perplexity(lm, data_dir, seq_len, batch_size, max_batches, split, device, torch_dtype)
    result["model"] = str(model_path)
    log(
        f"{model_path} on {data_dir} ({result['split']}, {result['tokens']} tokens, seq_len {seq_len}): "
        f"loss {result['loss']:.4f}  ppl {result['perplexity']:.3f}  bits/token {result['bits_per_token']:.4f}"
    )
    if output:
        Path(output).parent.mkdir(parents=True, exist_ok=True)
        Path(output).write_text(json.dumps(result, indent=2) + "\n")
        log(f"wrote {output}")
    return result
