"""`lmstack prepare-data`: text -> tokenizer -> token shards + index, in parallel and restartable.

Steps:
1. The settings that decide the output (source, tokenizer, BOS/EOS, split, shard size) are written to
   DATA/prepare.json; re-running with other settings into the same folder is refused.
2. The tokenizer is trained (byte-level BPE on the first `bpe_train_mb` MB of training-split text) or
   loaded, and saved into the folder (tokenizer.json, tokenizer/). A re-run reuses it.
3. Documents are numbered in input order; every round(1/val_fraction)-th one goes to the `val` split.
   Each split's documents fill shards of `shard_mb` MB of text in order, so shard contents depend only
   on the input and the settings. Batches of `batch_docs` documents are tokenized by a
   multiprocessing pool (one single-threaded tokenizer per worker: TOKENIZERS_PARALLELISM=false) and
   written in input order by this process.
4. A shard whose record exists, whose files match their checksums and whose input text hashes the
   same is skipped on a re-run; everything else is (re)written under .tmp names and renamed.
5. index.json is written last.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import multiprocessing as mp
import os
import sys
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from lmstack.data.shards import (
    SPLITS,
    DataIndex,
    ShardInfo,
    ShardWriter,
    atomic_write_json,
    check_shard,
    read_shard_record,
    shard_name,
)
from lmstack.data.sources import describe_source, iter_documents, open_source
from lmstack.data.tokenizer import DataTokenizer, build_tokenizer
from lmstack.errors import LMStackError

if TYPE_CHECKING:
    from lmstack.config import DataConfig

SETTINGS_FILE = "prepare.json"
BATCH_BYTES = 1 << 18  # a tokenization task holds at most batch_docs documents or about this much text


def prepare_settings(cfg: DataConfig) -> dict:
    """Everything that decides the prepared tokens (not worker counts or batch sizes)."""
    bpe = cfg.tokenizer == "bpe"
    return {
        "source": describe_source(cfg),
        "tokenizer": cfg.tokenizer,
        "vocab_size": cfg.vocab_size if bpe else None,
        "bpe_train_mb": cfg.bpe_train_mb if bpe else None,
        "add_bos": cfg.add_bos,
        "eos_token": cfg.eos_token,
        "bos_token": cfg.bos_token,
        "val_fraction": cfg.val_fraction,
        "shard_mb": cfg.shard_mb,
    }


def val_period(val_fraction: float) -> int:
    """Document i goes to `val` when val_period > 0 and i % val_period == val_period - 1."""
    return max(2, round(1.0 / val_fraction)) if val_fraction > 0 else 0


def split_of(doc_index: int, period: int) -> str:
    return "val" if period and doc_index % period == period - 1 else "train"


# ---------------------------------------------------------------------------------------------
# Worker side: one tokenizer per process, its own thread pool off.
_WORKER: DataTokenizer | None = None


def _init_worker(args: tuple) -> None:
    global _WORKER
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    _WORKER = DataTokenizer(*args)


def _encode(docs: list[str]):
    return _WORKER.encode_documents(docs)


def _tokenizer_args(tok: DataTokenizer) -> tuple:
    return (tok.json_str, tok.kind, tok.source, tok.eos_token, tok.bos_token, tok.pad_token, tok.add_bos)


@contextlib.contextmanager
def _env(key: str, value: str):
    old = os.environ.get(key)
    os.environ[key] = value
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = old


def _make_pool(workers: int, tok: DataTokenizer):
    methods = mp.get_all_start_methods()
    ctx = mp.get_context("fork" if "fork" in methods and sys.platform == "linux" else None)
    # Set while forking so that the tokenizers library neither warns nor keeps threads in the children.
    with _env("TOKENIZERS_PARALLELISM", "false"):
        return ctx.Pool(workers, initializer=_init_worker, initargs=(_tokenizer_args(tok),))


class _Immediate:
    """A finished result with the AsyncResult interface (for num_workers == 1)."""

    def __init__(self, value) -> None:
        self.value = value

    def get(self):
        return self.value


# ---------------------------------------------------------------------------------------------
@dataclass
class _Event:
    kind: str  # "batch" or "close"
    split: str
    shard: int
    docs: list[str] | None = None
    text_bytes: int = 0
    skip: bool = False
    text_sha256: str = ""
    record: ShardInfo | None = None


def _events(cfg: DataConfig, out: Path, tok: DataTokenizer, log) -> Iterator[_Event]:
    """Batches of documents per (split, shard), then a close event per shard, in input order."""
    period = val_period(cfg.val_fraction)
    shard_bytes = int(cfg.shard_mb * 1e6)
    cur = {s: -1 for s in SPLITS}  # current shard number per split (-1: none open)
    filled = {s: 0 for s in SPLITS}
    hashes: dict[str, hashlib._Hash] = {}
    skip: dict[str, ShardInfo | None] = {}
    buf: dict[str, list[str]] = {s: [] for s in SPLITS}
    buf_bytes = {s: 0 for s in SPLITS}

    def flush(split: str) -> Iterator[_Event]:
        if buf[split]:
            yield _Event("batch", split, cur[split], buf[split], buf_bytes[split], skip[split] is not None)
            buf[split], buf_bytes[split] = [], 0

    def close(split: str) -> Iterator[_Event]:
        yield from flush(split)
        rec = skip[split]
        yield _Event(
            "close",
            split,
            cur[split],
            skip=rec is not None,
            text_sha256=hashes[split].hexdigest(),
            record=rec,
        )

    def open_shard(split: str) -> None:
        cur[split] += 1
        filled[split] = 0
        hashes[split] = hashlib.sha256()
        name = shard_name(split, cur[split])
        rec = read_shard_record(out, name)
        if rec is not None and rec.tokenizer_sha256 == tok.sha256:
            try:
                check_shard(out, rec, tok.dtype, full=True)
            except LMStackError as err:
                log(f"rewriting {name}: {err}")
                rec = None
        else:
            rec = None
        skip[split] = rec

    for i, doc in enumerate(iter_documents(cfg)):
        split = split_of(i, period)
        if cur[split] < 0 or filled[split] >= shard_bytes:
            if cur[split] >= 0:
                yield from close(split)
            open_shard(split)
        raw = doc.encode("utf-8")
        hashes[split].update(len(raw).to_bytes(8, "little"))
        hashes[split].update(raw)
        filled[split] += len(raw)
        buf[split].append(doc)
        buf_bytes[split] += len(raw)
        if len(buf[split]) >= cfg.batch_docs or buf_bytes[split] >= BATCH_BYTES:
            yield from flush(split)
    for split in SPLITS:
        if cur[split] >= 0:
            yield from close(split)


def _train_docs(cfg: DataConfig) -> Iterator[str]:
    period = val_period(cfg.val_fraction)
    for i, doc in enumerate(iter_documents(cfg)):
        if split_of(i, period) == "train":
            yield doc


def _diff(old: dict, new: dict) -> str:
    keys = [k for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]
    return "; ".join(f"{k}: {old.get(k)!r} then, {new.get(k)!r} now" for k in keys)


def _load_or_build_tokenizer(cfg: DataConfig, out: Path, settings: dict, log) -> DataTokenizer:
    settings_path = out / SETTINGS_FILE
    if settings_path.is_file():
        try:
            old = json.loads(settings_path.read_text())
        except (OSError, ValueError):
            old = None
        if old is not None and old.get("settings") != settings:
            raise LMStackError(
                f"{out}: already prepared with other settings ({_diff(old.get('settings') or {}, settings)}); "
                "choose another data.path or delete the folder"
            )
        if old is not None and (out / "tokenizer.json").is_file():
            from lmstack.data.tokenizer import load_data_tokenizer

            try:
                tok = load_data_tokenizer(out, old["tokenizer"])
                log(f"reusing the tokenizer in {out} (sha256 {tok.sha256[:12]})")
                return tok
            except (LMStackError, KeyError) as err:
                log(f"rebuilding the tokenizer: {err}")
    if cfg.tokenizer == "bpe":
        log(f"training a byte-level BPE (vocab {cfg.vocab_size}) on up to {cfg.bpe_train_mb:g} MB of text")
    t0 = time.perf_counter()
    tok = build_tokenizer(
        cfg.tokenizer,
        vocab_size=cfg.vocab_size,
        train_docs=_train_docs(cfg) if cfg.tokenizer == "bpe" else None,
        train_bytes=int(cfg.bpe_train_mb * 1e6),
        add_bos=cfg.add_bos,
        eos_token=cfg.eos_token,
        bos_token=cfg.bos_token,
    )
    log(
        f"tokenizer ready in {time.perf_counter() - t0:.1f}s: vocab {tok.vocab_size}, sha256 {tok.sha256[:12]}"
    )
    tok.save(out)
    atomic_write_json(settings_path, {"settings": settings, "tokenizer": tok.record()})
    return tok


def prepare_data(cfg: DataConfig, *, progress: bool = True, log=None) -> DataIndex:
    """Prepare `cfg.path` from the text `cfg` names (see the module docstring); returns its index.

    progress: show a tqdm bar (MB/s of text, tokens/s) on stderr. log: a callable taking one line
    (default: print to stderr when `progress`, else silent)."""
    from tqdm import tqdm

    if log is None:
        log = (lambda msg: print(msg, file=sys.stderr)) if progress else (lambda msg: None)
    out = Path(cfg.path)
    open_source(cfg).check()  # missing files fail before anything is written or logged
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise LMStackError(f"data.path: cannot create '{out}': {err}") from None
    settings = prepare_settings(cfg)
    tok = _load_or_build_tokenizer(cfg, out, settings, log)

    workers = cfg.num_workers or os.cpu_count() or 1
    pool = _make_pool(workers, tok) if workers > 1 else None
    if pool is None:  # tokenize here (the tokenizer may use its own threads)
        global _WORKER
        _WORKER = tok
    max_inflight = 2 * workers + 2
    records: dict[str, list[ShardInfo]] = {s: [] for s in SPLITS}
    writers: dict[str, ShardWriter | None] = {s: None for s in SPLITS}
    done_bytes = done_tokens = skipped_bytes = n_docs = 0
    skipped, written = [], []
    t0 = time.perf_counter()
    bar = tqdm(
        desc=f"prepare {out}", unit="B", unit_scale=True, disable=not progress, mininterval=0.5, leave=True
    )

    def handle(ev: _Event, res) -> None:
        nonlocal done_bytes, done_tokens, skipped_bytes, n_docs
        if ev.kind == "batch":
            n_docs += len(ev.docs)
            if ev.skip:
                skipped_bytes += ev.text_bytes
            else:
                tokens, lengths = res.get()
                w = writers[ev.split]
                if w is None:
                    w = writers[ev.split] = ShardWriter(out, ev.split, ev.shard, tok.dtype, tok.sha256)
                w.add(tokens, lengths, ev.text_bytes)
                done_bytes += ev.text_bytes
                done_tokens += int(tokens.size)
            bar.update(ev.text_bytes)
            elapsed = max(time.perf_counter() - t0, 1e-9)
            bar.set_postfix_str(
                f"{done_tokens / 1e6:.2f}M tok, {done_tokens / elapsed / 1e3:.1f}k tok/s", refresh=False
            )
            return
        name = shard_name(ev.split, ev.shard)
        if ev.skip:
            if ev.record.text_sha256 != ev.text_sha256:
                raise LMStackError(
                    f"{out / ev.record.meta_file}: the input text of this finished shard has changed since it was "
                    "written; delete the data folder (or choose another data.path) and prepare again"
                )
            records[ev.split].append(ev.record)
            skipped.append(name)
        else:
            records[ev.split].append(writers[ev.split].close(ev.text_sha256))
            writers[ev.split] = None
            written.append(name)

    pending: deque = deque()
    try:
        for ev in _events(cfg, out, tok, log):
            if ev.kind == "batch" and not ev.skip:
                res = (
                    pool.apply_async(_encode, (ev.docs,))
                    if pool is not None
                    else _Immediate(_encode(ev.docs))
                )
            else:
                res = None
            pending.append((ev, res))
            while len(pending) > max_inflight or (
                pending and (pending[0][1] is None or _ready(pending[0][1]))
            ):
                handle(*pending.popleft())
        while pending:
            handle(*pending.popleft())
    except BaseException:
        for w in writers.values():
            if w is not None:
                w.abort()
        raise
    finally:
        bar.close()
        if pool is not None:
            pool.terminate()
            pool.join()

    if n_docs == 0:
        raise LMStackError(f"data.source_options.{cfg.source}: no documents found in {settings['source']}")
    if not records["train"]:
        raise LMStackError("data.val_fraction: every document went to the validation split; lower it")
    elapsed = time.perf_counter() - t0
    stats = {
        "seconds": round(elapsed, 3),
        "documents": n_docs,
        "tokenized_text_bytes": done_bytes,
        "tokenized_tokens": done_tokens,
        "skipped_text_bytes": skipped_bytes,
        "text_mb_per_s": round(done_bytes / 1e6 / elapsed, 3) if elapsed > 0 else None,
        "tokens_per_s": round(done_tokens / elapsed, 1) if elapsed > 0 else None,
        "shards_written": written,
        "shards_skipped": skipped,
        "num_workers": workers,
    }
    index = DataIndex(
        path=out,
        dtype=tok.dtype.name,
        vocab_size=tok.vocab_size,
        tokenizer=tok.record(),
        settings=settings,
        splits=records,
        stats=stats,
    )
    index.write()
    return index


def _ready(res) -> bool:
    return isinstance(res, _Immediate) or res.ready()
