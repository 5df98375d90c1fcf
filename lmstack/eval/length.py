"""Loss against position, at and beyond the training length (`lmstack eval length`).

For each evaluation length L the validation split is read as `eval ppl` reads it (`ValReader`: rows
of L tokens, every next-token prediction once) and the model runs over whole rows through its normal
(chunked) forward. Each scored token is put in a bucket by its **context position**: how many tokens
the model saw before it in its sequence.

    documents masked (default, as in training)      documents joined
    row:  [doc a ......|doc b ..........|doc c ..]   [doc a ......|doc b ..........|doc c ..]
    pos:   0 1 2 ...  k 0 1 2 ...       0 1 ...       0 1 2 ...                        L-1

With masking a document cut at a row start begins again at position 0 (the model sees nothing of
its earlier part), so a bucket far beyond the training length holds tokens of long documents only:
each bucket reports its token count. Joined, every bucket is full but the context crosses document
boundaries, which training never showed the model.

At the training length with masked documents the total equals `eval ppl` exactly (same rows, same
forward); the bucket losses, weighted by their token counts, average to the total.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from lmstack.dtypes import parse_dtype
from lmstack.errors import LMStackError
from lmstack.eval import write_report
from lmstack.eval.loading import default_device, load_model
from lmstack.eval.ppl import check_vocab, scored_batches
from lmstack.model.loss import IGNORE_INDEX


def context_positions(doc_ids: torch.Tensor, mask_documents: bool) -> torch.Tensor:
    """doc_ids: [B, T] non-decreasing per row -> [B, T] int64: tokens before each one in its sequence
    (its document's part of the row when masked, the whole row when joined)."""
    B, T = doc_ids.shape
    t = torch.arange(T).expand(B, T)
    if not mask_documents:
        return t
    starts = torch.ones(B, T, dtype=torch.bool)
    starts[:, 1:] = doc_ids[:, 1:] != doc_ids[:, :-1]
    return t - torch.where(starts, t, 0).cummax(dim=1).values


@torch.no_grad()
def loss_by_position(
    model,
    data_dir: str | Path,
    length: int,
    bucket_size: int = 64,
    tokens_per_batch: int = 8192,
    max_rows: int | None = None,
    split: str = "val",
    mask_documents: bool = True,
    device: str | torch.device = "cpu",
) -> dict[str, Any]:
    """The loss of every scored token of `split` at evaluation length `length`, in total and per
    bucket of `bucket_size` context positions: {"length", "tokens", "loss", "perplexity",
    "buckets": [{"start", "end", "tokens", "loss", "perplexity"}]} (empty buckets left out)."""
    from lmstack.data import ValReader

    if length < 2:
        raise LMStackError(f"--lengths: each length must be at least 2, got {length}")
    if bucket_size < 1:
        raise LMStackError(f"--bucket-size: expected a positive integer, got {bucket_size}")
    batch_size = max(1, tokens_per_batch // length)
    reader = ValReader(data_dir, length, batch_size, split=split)
    check_vocab(model, reader, data_dir)
    if reader.stream.num_tokens - 1 < length:
        raise LMStackError(
            f"--lengths {length}: the '{split}' split of {data_dir} has only {reader.stream.num_tokens:,} "
            f"tokens, fewer than one row of {length} plus its next token"
        )
    max_batches = None if max_rows is None else max(1, math.ceil(max_rows / batch_size))
    n_buckets = math.ceil(length / bucket_size)
    loss_sums = torch.zeros(n_buckets, dtype=torch.float64)
    counts = torch.zeros(n_buckets, dtype=torch.int64)
    for logits, batch in scored_batches(model, reader, device, max_batches, mask_documents):
        labels = batch.labels.to(device)
        token_loss = F.cross_entropy(
            logits.float().flatten(0, 1), labels.flatten(), ignore_index=IGNORE_INDEX, reduction="none"
        ).cpu()
        scored = labels.flatten().cpu() != IGNORE_INDEX
        bucket = (context_positions(batch.doc_ids, mask_documents).flatten() // bucket_size)[scored]
        loss_sums += torch.bincount(bucket, weights=token_loss[scored].double(), minlength=n_buckets)
        counts += torch.bincount(bucket, minlength=n_buckets)
    total = int(counts.sum())
    if total == 0:
        raise LMStackError(f"{data_dir}: the '{split}' split has no tokens to score")
    loss = float(loss_sums.sum()) / total
    buckets = [
        {
            "start": b * bucket_size,
            "end": min((b + 1) * bucket_size, length),
            "tokens": int(counts[b]),
            "loss": float(loss_sums[b]) / int(counts[b]),
            "perplexity": math.exp(float(loss_sums[b]) / int(counts[b])),
        }
        for b in range(n_buckets)
        if counts[b] > 0
    ]
    return {"length": length, "tokens": total, "loss": loss, "perplexity": math.exp(loss), "buckets": buckets}


def run_length(
    model_paths: list[str],
    data_dir: str | None,
    lengths: list[int],
    bucket_size: int = 64,
    tokens_per_batch: int = 8192,
    max_rows: int | None = None,
    split: str = "val",
    mask_documents: bool = True,
    device: str | None = None,
    dtype: str = "float32",
    out: str | None = None,
    command: str | None = None,
    log=print,
) -> dict[str, Any]:
    """The work behind `lmstack eval length`: every model at every length; OUT.json and OUT.png."""
    if not model_paths:
        raise LMStackError("eval length: give at least one model folder")
    if not lengths:
        raise LMStackError("--lengths: give at least one evaluation length, e.g. 256,1024,4096")
    torch_dtype = parse_dtype(dtype)
    device = default_device(device)
    results = []
    for path in model_paths:
        loaded = load_model(path, dtype, hf=False, device=device)
        lm, run_config = loaded.model.to(device=device, dtype=torch_dtype).eval(), loaded.run_config
        data = data_dir or (run_config.data.path if run_config is not None else None)
        if data is None:
            raise LMStackError(f"--data: give the prepared data folder ({path} does not name one)")
        train_len = run_config.data.seq_len if run_config is not None else lm.config.max_seq_len
        entry: dict[str, Any] = {
            "model": str(path),
            "mixers": [lm.config.mixer_for_layer(i) for i in range(lm.config.n_layers)],
            "train_seq_len": train_len,
            "data": str(data),
            "lengths": [],
        }
        for length in lengths:
            start = time.perf_counter()
            r = loss_by_position(
                lm, data, length, bucket_size, tokens_per_batch, max_rows, split, mask_documents, device
            )
            r["seconds"] = round(time.perf_counter() - start, 2)
            entry["lengths"].append(r)
            log(
                f"{path} at length {length} ({r['tokens']:,} tokens, {r['length'] / train_len:.1f}x train): "
                f"loss {r['loss']:.4f}  ppl {r['perplexity']:.3f}  last bucket "
                f"{r['buckets'][-1]['start']}-{r['buckets'][-1]['end']}: {r['buckets'][-1]['loss']:.4f} "
                f"({r['buckets'][-1]['tokens']:,} tokens)"
            )
        results.append(entry)
    report = {
        "command": command,
        "split": split,
        "documents": "masked" if mask_documents else "joined",
        "bucket_size": bucket_size,
        "dtype": dtype,
        "device": str(device),
        "torch": torch.__version__,
        "models": results,
    }
    if out:
        write_report(report, out, plot_length, log)
    return report


def plot_length(report: dict[str, Any], path: Path) -> Path:
    """Loss against context position: one panel per model, one curve per evaluation length, the
    training length marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from lmstack.train.plot import save_figure

    models = report["models"]
    fig, axes = plt.subplots(1, len(models), figsize=(5.5 * len(models), 4), sharey=True, squeeze=False)
    for ax, entry in zip(axes[0], models):
        for r in entry["lengths"]:
            centers = [(b["start"] + b["end"]) / 2 for b in r["buckets"]]
            ax.plot(centers, [b["loss"] for b in r["buckets"]], "-", lw=1.2, label=f"L = {r['length']}")
        ax.axvline(entry["train_seq_len"], color="grey", ls=":", lw=1, label="training length")
        folder = Path(entry["model"])  # a run's export is RUN/hf: the run names it
        name = folder.parent.name if folder.name == "hf" else folder.name
        ax.set_title(f"{name} ({', '.join(dict.fromkeys(entry['mixers']))})")
        ax.set_xscale("log", base=2)
        ax.set_xlabel(f"context position ({report['documents']} documents)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    axes[0][0].set_ylabel("loss (nats/token)")
    return save_figure(fig, path, dpi=110)
