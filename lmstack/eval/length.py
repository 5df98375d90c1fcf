"""Loss against position at several context lengths (`lmstack eval length`): length generalisation.

For each evaluation length L the held-out split is read as in `lmstack eval ppl` (rows of L tokens of
the split's stream, `lmstack.eval.ppl.scored_rows`), each row through the model's normal (chunked)
forward, and every next-token loss is put in the bucket of its context position: the number of tokens
before it that it can see (its position in its document's piece of the row when documents are masked,
as in training; its position in the row with `join_documents`). Lengths beyond the training length
just run: attention's RoPE positions are computed for any length, the linear mixers carry their state.
The bucket losses, weighted by their token counts, average to the length's total loss, which at the
training length is `eval ppl`'s.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

import torch

from lmstack.dtypes import parse_dtype
from lmstack.errors import LMStackError
from lmstack.eval import write_report
from lmstack.eval.loading import default_device, load_model
from lmstack.eval.ppl import scored_rows


def context_positions(doc_ids: torch.Tensor) -> torch.Tensor:
    """doc_ids [B, T] (non-decreasing along rows) -> [B, T]: each position's offset from the start of
    its document's piece of the row (the tokens of context it sees under document masking)."""
    T = doc_ids.shape[1]
    index = torch.arange(T).expand_as(doc_ids)
    starts = torch.ones_like(doc_ids, dtype=torch.bool)
    starts[:, 1:] = doc_ids[:, 1:] != doc_ids[:, :-1]
    return index - torch.cummax(torch.where(starts, index, 0), dim=1).values


@torch.no_grad()
def length_losses(
    model,
    data_dir: str | Path,
    seq_len: int,
    bucket_size: int = 64,
    tokens_per_batch: int = 8192,
    max_rows: int | None = None,
    split: str = "val",
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    join_documents: bool = False,
) -> dict[str, Any]:
    """Loss and perplexity of rows of `seq_len` tokens, in total and per bucket of `bucket_size`
    context positions."""
    from lmstack.data import load_index

    if seq_len < 1 or bucket_size < 1:
        raise LMStackError(
            f"--lengths and --bucket-size: expected positive integers, got {seq_len}, {bucket_size}"
        )
    available = load_index(data_dir).num_tokens(split) - 1
    if seq_len > available:
        raise LMStackError(
            f"--lengths: {seq_len} tokens do not fit the '{split}' split of {data_dir} ({available} predictions)"
        )
    batch_size = max(1, tokens_per_batch // seq_len)
    if max_rows is not None:
        if max_rows < 1:
            raise LMStackError(f"--max-rows: expected a positive integer, got {max_rows}")
        batch_size = min(batch_size, max_rows)
    max_batches = None if max_rows is None else math.ceil(max_rows / batch_size)
    n_buckets = math.ceil(seq_len / bucket_size)
    sums = torch.zeros(n_buckets, dtype=torch.float64)
    counts = torch.zeros(n_buckets, dtype=torch.int64)
    rows = 0
    start = time.perf_counter()
    batches = scored_rows(
        model, data_dir, seq_len, batch_size, max_batches, split, device, dtype, join_documents
    )
    for losses, labelled, doc_ids in batches:
        losses, labelled = losses.cpu(), labelled.cpu()
        if max_rows is not None and rows + len(losses) > max_rows:
            keep = max_rows - rows
            losses, labelled, doc_ids = losses[:keep], labelled[:keep], doc_ids[:keep]
        rows += len(losses)
        positions = torch.arange(seq_len).expand_as(doc_ids) if join_documents else context_positions(doc_ids)
        bucket = (positions // bucket_size)[labelled]
        sums += torch.bincount(bucket, weights=losses[labelled].double(), minlength=n_buckets)
        counts += torch.bincount(bucket, minlength=n_buckets)
    total = int(counts.sum())
    if total == 0:
        raise LMStackError(f"{data_dir}: the '{split}' split has no tokens to score")
    loss = sums.sum().item() / total
    buckets = []
    for i in range(n_buckets):
        n = int(counts[i])
        mean = sums[i].item() / n if n else None
        buckets.append(
            {
                "start": i * bucket_size,
                "end": min((i + 1) * bucket_size, seq_len),
                "tokens": n,
                "loss": mean,
                "perplexity": math.exp(mean) if n else None,
            }
        )
    return {
        "seq_len": seq_len,
        "rows": rows,
        "tokens": total,
        "loss": loss,
        "perplexity": math.exp(loss),
        "buckets": buckets,
        "seconds": round(time.perf_counter() - start, 2),
    }


def run_length(
    model_paths: list[str],
    data_dir: str | None,
    lengths: list[int],
    bucket_size: int = 64,
    tokens_per_batch: int = 8192,
    max_rows: int | None = None,
    split: str = "val",
    device: str | None = None,
    dtype: str = "float32",
    join_documents: bool = False,
    output: str | None = None,
    log=print,
) -> dict[str, Any]:
    """The work behind `lmstack eval length`: every model at every length; OUT.json and OUT.png."""
    if not lengths:
        raise LMStackError("--lengths: give at least one evaluation length, e.g. 256,1024,4096")
    torch_dtype = parse_dtype(dtype)
    device = default_device(device)
    results = []
    for path in model_paths:
        loaded = load_model(path, dtype, hf=False, device=device)
        lm, run_config = loaded.model, loaded.run_config
        data = data_dir or (run_config.data.path if run_config is not None else None)
        if data is None:
            raise LMStackError("--data: give the prepared data folder (the model folder does not name one)")
        train_len = run_config.data.seq_len if run_config is not None else lm.config.max_seq_len
        entry = {"model": str(path), "mixer": lm.config.mixer, "train_seq_len": train_len, "data": str(data)}
        entry["lengths"] = []
        for L in lengths:
            r = length_losses(
                lm,
                data,
                L,
                bucket_size,
                tokens_per_batch,
                max_rows,
                split,
                device,
                torch_dtype,
                join_documents,
            )
            r["times_train_length"] = L / train_len
            entry["lengths"].append(r)
            log(
                f"{path} ({lm.config.mixer}) L={L} ({L / train_len:g}x train): loss {r['loss']:.4f} "
                f"ppl {r['perplexity']:.3f} over {r['tokens']} tokens, {r['rows']} rows"
            )
        results.append(entry)
    report = {
        "split": split,
        "bucket_size": bucket_size,
        "join_documents": join_documents,
        "dtype": dtype,
        "device": str(device),
        "models": results,
    }
    if output:
        write_report(report, output, plot_length_curves, log)
    return report


def plot_length_curves(report: dict[str, Any], path: Path) -> None:
    """Loss against context position: one panel per model, one curve per evaluation length; a dashed
    line marks the training length."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = report["models"]
    fig, axes = plt.subplots(1, len(models), figsize=(5 * len(models), 4), sharey=True, squeeze=False)
    for ax, entry in zip(axes[0], models):
        for r in entry["lengths"]:
            pts = [((b["start"] + b["end"]) / 2, b["loss"]) for b in r["buckets"] if b["tokens"]]
            ax.plot(*zip(*pts), label=f"L={r['seq_len']}")
        ax.axvline(entry["train_seq_len"], color="grey", linestyle="--", linewidth=1)
        ax.set_xscale("log")
        ax.set_title(f"{entry['mixer']}: {Path(entry['model']).name}")
        ax.set_xlabel("context position (tokens)")
        ax.legend(fontsize=8)
    axes[0][0].set_ylabel(f"next-token loss (buckets of {report['bucket_size']})")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
