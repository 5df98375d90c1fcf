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


def check_vocab(model, reader, data_dir: str | Path) -> None:
    """A data folder whose tokenizer has more tokens than the model's embedding is not its data."""
    vocab = getattr(reader.index, "vocab_size", None)
    if vocab is not None and vocab > model.config.vocab_size:
        raise LMStackError(
            f"{data_dir}: its tokenizer has {vocab} tokens but the model only {model.config.vocab_size}: "
            "not the data this model was trained on"
        )


def scored_batches(model, reader, device, max_batches: int | None = None, mask_documents: bool = True):
    """(logits [B, T, V], batch) for each batch of a `ValReader`, at most `max_batches`: the model
    run with the batch's document masking as in training (`mask_documents=False`: each row one
    sequence, documents joined)."""
    from lmstack.model import BatchContext

    for i, batch in enumerate(reader):
        if max_batches is not None and i >= max_batches:
            return
        context = BatchContext.from_doc_ids(batch.doc_ids, device) if mask_documents else None
        yield model(batch.input_ids.to(device), context).logits, batch


@torch.no_grad()
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
    from lmstack.data import ValReader
    from lmstack.model.loss import next_token_loss_sum

    reader = ValReader(data_dir, seq_len, batch_size, split=split)
    check_vocab(model, reader, data_dir)
    if seq_len > model.config.max_seq_len:
        raise LMStackError(f"--seq-len {seq_len} exceeds the model's max_seq_len {model.config.max_seq_len}")
    model = model.to(device=device, dtype=dtype).eval()
    nll, count, batches = 0.0, 0, 0
    start = time.perf_counter()
    for logits, batch in scored_batches(model, reader, device, max_batches):
        loss_sum, n_labelled = next_token_loss_sum(logits, batch.labels.to(device))
        nll += loss_sum.item()
        count += int(n_labelled)
        batches += 1
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
        "complete": max_batches is None or batches < max_batches or batches == len(reader),
        "seconds": round(time.perf_counter() - start, 2),
    }


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
    val_path: dict[str, str] | None = None,
) -> dict[str, Any]:
    """The work behind `lmstack eval ppl`: `data_dir`'s `split`, then every named folder of `val_path`
    (default: the run config's data.val_path) as `result["val_path"][name]`: its `train` split, the whole
    stream of a folder prepared with data.val_fraction=0, as in training."""
    torch_dtype = parse_dtype(dtype)
    device = default_device(device)
    loaded = load_model(model_path, dtype, hf=False, device=device)
    lm, run_config = loaded.model, loaded.run_config
    if data_dir is None:
        if run_config is None:
            raise LMStackError("--data: give the prepared data folder (the model folder does not name one)")
        if run_config.data.mixture:
            raise LMStackError(
                "--data: the run trained on data.mixture; give one prepared folder (e.g. one of its sources: "
                f"{', '.join(s.path for s in run_config.data.mixture)})"
            )
        data_dir = run_config.data.path
    if seq_len is None:
        seq_len = run_config.data.seq_len if run_config is not None else lm.config.max_seq_len
    result = perplexity(lm, data_dir, seq_len, batch_size, max_batches, split, device, torch_dtype)
    result["model"] = str(model_path)
    _log_result(log, model_path, data_dir, result)
    if val_path is None and run_config is not None:
        val_path = run_config.data.val_path
    named = {}
    for name, folder in (val_path or {}).items():  # a folder prepared for validation: its whole stream
        named_split = "train" if _has_split(folder, "train") else "val"
        named[name] = perplexity(
            lm, folder, seq_len, batch_size, max_batches, named_split, device, torch_dtype
        )
        _log_result(log, f"{model_path} [val/{name}]", folder, named[name])
    if named:
        result["val_path"] = named
    if output:
        Path(output).parent.mkdir(parents=True, exist_ok=True)
        Path(output).write_text(json.dumps(result, indent=2) + "\n")
        log(f"wrote {output}")
    return result


def _has_split(folder: str | Path, split: str) -> bool:
    from lmstack.data import load_index

    return bool(load_index(folder).splits.get(split))


def _log_result(log, model_path, data_dir, result: dict[str, Any]) -> None:
    log(
        f"{model_path} on {data_dir} ({result['split']}, {result['tokens']} tokens, seq_len {result['seq_len']}): "
        f"loss {result['loss']:.4f}  ppl {result['perplexity']:.3f}  bits/token {result['bits_per_token']:.4f}"
    )
