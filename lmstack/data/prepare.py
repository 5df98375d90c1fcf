"""`lmstack prepare-data`: text -> tokenizer -> token shards + index, in parallel, restartable, and
shared out over machines (`--part I/N`).

Layout: the source's inputs (one per file, `Source.readers`; all of them as one stream when
data.max_documents caps the count, since the cap counts across files) are cut into blocks of
`block_docs` documents. Document k of an input goes to the `val` split when
k % round(1/val_fraction) == round(1/val_fraction) - 1. Each (input, block, split) fills shards of
`shard_mb` MB of text of its own (lmstack.data.shards names them), so a shard depends only on its
block's text and the settings, never on which process or machine prepared it; the index lists the
shards in (input, block) order. A folder prepared in one go, by any number of workers or as any
number of parts is therefore the same folder, token for token.

Steps:
1. The settings that decide the output (source, tokenizer, BOS/EOS, split, shard and block size) are
   written to DATA/prepare.json; re-running with other settings into the same folder is refused.
2. The tokenizer is trained (byte-level BPE on the first `bpe_train_mb` MB of training-split text) or
   loaded, and saved into the folder (tokenizer.json, tokenizer/). A re-run reuses it. A part never
   makes its own: `prepare_tokenizer` (`--tokenizer-only`) or a whole prepare makes it once.
3. The work is dealt out as tasks, "the blocks b of input i with b % m == r" (`deal`): N parts take
   the inputs round robin (when there are more parts than inputs, an input's blocks are dealt over
   the parts that share it), and a part deals its tasks over `num_workers` processes the same way.
   Each worker reads and decompresses its input itself (inputs are read in parallel), tokenizes its
   blocks with one single-threaded tokenizer and writes their shards; the blocks of other tasks cost
   it only reading and parsing. When the input ends it writes a record per block,
   DATA/parts/{i:05d}-{b:05d}.json (the block's shards and the input's number of blocks).
4. A shard whose record exists, whose files match their checksums and whose input text hashes the
   same is skipped on a re-run (its text is only hashed); everything else is (re)written under .tmp
   names and renamed. So a killed prepare or part resumes by running the same command again.
5. index.json is written last, from the block records. A part writes DATA/parts/part-I-of-N.json
   when it is done; the part that then finds all N of them merges (writes index.json), and
   `merge_parts` (`--merge N`) does the same by hand, naming the first part that has not finished.
"""

from __future__ import annotations

import functools
import hashlib
import json
import multiprocessing as mp
import os
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

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
from lmstack.data.tokenizer import DataTokenizer, build_tokenizer, load_data_tokenizer
from lmstack.errors import LMStackError

if TYPE_CHECKING:
    from lmstack.config import DataConfig

SETTINGS_FILE = "prepare.json"
PARTS_DIR = "parts"  # block records and part records
BATCH_BYTES = 1 << 18  # a tokenization call holds at most batch_docs documents or about this much text


def prepare_settings(cfg: DataConfig) -> dict:
    """Everything that decides the prepared tokens (not worker or part counts, nor batch sizes)."""
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
        "block_docs": cfg.block_docs,
    }


def val_period(val_fraction: float) -> int:
    """Document k of an input goes to `val` when val_period > 0 and k % val_period == val_period - 1."""
    return max(2, round(1.0 / val_fraction)) if val_fraction > 0 else 0


def split_of(doc_index: int, period: int) -> str:
    return "val" if period and doc_index % period == period - 1 else "train"


def input_readers(cfg: DataConfig) -> list[Callable[[], Iterator[str]]]:
    """The inputs, each prepared on its own, in order (see the module docstring)."""
    if cfg.max_documents is not None:
        return [functools.partial(iter_documents, cfg)]
    return open_source(cfg).readers()


# ---------------------------------------------------------------------------------------------
# Sharing out the work.
@dataclass(frozen=True)
class Task:
    """The blocks b of input `input` with b % modulus == residue."""

    input: int
    residue: int = 0
    modulus: int = 1

    def covers(self, block: int) -> bool:
        return block % self.modulus == self.residue


def deal(tasks: list[Task], n: int) -> list[list[Task]]:
    """`tasks` dealt to n executors: whole tasks round robin when there are at least n; else executor e
    shares task e % len(tasks) with the others that do, each taking every k-th of its blocks."""
    if len(tasks) >= n:
        return [tasks[e::n] for e in range(n)]
    out: list[list[Task]] = [[] for _ in range(n)]
    for t, task in enumerate(tasks):
        sharers = range(t, n, len(tasks))
        for j, e in enumerate(sharers):
            out[e].append(Task(task.input, task.residue + task.modulus * j, task.modulus * len(sharers)))
    return out


def part_tasks(n_inputs: int, part: int, parts: int) -> list[Task]:
    """The tasks of part `part` (1-based) of `parts`."""
    return deal([Task(i) for i in range(n_inputs)], parts)[part - 1]


def block_owner(n_inputs: int, input_idx: int, block: int, parts: int) -> int:
    """The part (1-based) that prepares block `block` of input `input_idx`."""
    for p in range(1, parts + 1):
        if any(t.input == input_idx and t.covers(block) for t in part_tasks(n_inputs, p, parts)):
            return p
    raise AssertionError("deal() covers every block")


def parse_part(text: str) -> tuple[int, int]:
    """'I/N' -> (I, N), for `--part`; LMStackError unless 1 <= I <= N."""
    try:
        i, n = (int(x) for x in text.split("/"))
    except ValueError:
        i = n = 0
    check_part(i, n, text)
    return i, n


def check_part(i: int, n: int, given: str) -> None:
    if not 1 <= i <= n:
        raise LMStackError(f"--part: expected I/N with 1 <= I <= N (e.g. 2/8), got '{given}'")


def block_record_path(out: Path, input_idx: int, block: int) -> Path:
    return Path(out) / PARTS_DIR / f"{input_idx:05d}-{block:05d}.json"


def part_record_path(out: Path, part: int, parts: int) -> Path:
    return Path(out) / PARTS_DIR / f"part-{part}-of-{parts}.json"


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


# ---------------------------------------------------------------------------------------------
# Worker side: every worker process reads, tokenizes and writes whole tasks.
@dataclass
class _Worker:
    cfg: DataConfig
    out: Path
    tok: DataTokenizer
    verbose: bool
    progress: Any  # shared counter of the text bytes done (multiprocessing.Value)
    readers: list[Callable[[], Iterator[str]]]

    def log(self, msg: str) -> None:
        if self.verbose:
            print(msg, file=sys.stderr)

    def advance(self, n_bytes: int) -> None:
        with self.progress.get_lock():
            self.progress.value += n_bytes


_WORKER: _Worker | None = None


def _init_worker(cfg: DataConfig, out: Path, tok_args: tuple, verbose: bool, progress) -> None:
    """Pool initializer: one single-threaded tokenizer per worker process."""
    global _WORKER
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    _WORKER = _Worker(cfg, out, DataTokenizer(*tok_args), verbose, progress, input_readers(cfg))


def _tokenizer_args(tok: DataTokenizer) -> tuple:
    return (tok.json_str, tok.kind, tok.source, tok.eos_token, tok.bos_token, tok.pad_token, tok.add_bos)


def _new_stats() -> dict:
    return {
        "documents": 0,
        "tokenized_text_bytes": 0,
        "tokenized_tokens": 0,
        "skipped_text_bytes": 0,
        "shards_written": [],
        "shards_skipped": [],
    }


class _SplitShards:
    """One split of one block: its documents fill shards of shard_mb MB of text in order; a finished
    shard whose text hashes the same is kept, every other one is tokenized and written."""

    def __init__(self, w: _Worker, split: str, input_idx: int, block: int, stats: dict) -> None:
        self.w, self.split, self.input_idx, self.block, self.stats = w, split, input_idx, block, stats
        self.records: list[ShardInfo] = []
        self.k = -1  # current shard number (-1: none open)
        self.filled = 0
        self.text_hash = hashlib.sha256()
        self.kept: ShardInfo | None = None  # the record of the open shard when it is finished already
        self.writer: ShardWriter | None = None
        self.buf: list[str] = []
        self.buf_bytes = 0

    def add(self, doc: str) -> None:
        if self.k < 0 or self.filled >= self.w.cfg.shard_mb * 1e6:
            if self.k >= 0:
                self._close_shard()
            self._open_shard()
        raw = doc.encode("utf-8")
        self.text_hash.update(len(raw).to_bytes(8, "little"))
        self.text_hash.update(raw)
        self.filled += len(raw)
        self.stats["documents"] += 1
        if self.kept is not None:
            self.stats["skipped_text_bytes"] += len(raw)
            self.w.advance(len(raw))
            return
        self.buf.append(doc)
        self.buf_bytes += len(raw)
        if len(self.buf) >= self.w.cfg.batch_docs or self.buf_bytes >= BATCH_BYTES:
            self._flush()

    def _open_shard(self) -> None:
        w = self.w
        self.k += 1
        self.filled = 0
        self.text_hash = hashlib.sha256()
        name = shard_name(self.split, self.input_idx, self.block, self.k)
        rec = read_shard_record(w.out, name)
        if rec is not None and rec.tokenizer_sha256 == w.tok.sha256:
            try:
                check_shard(w.out, rec, w.tok.dtype, full=True)
            except LMStackError as err:
                w.log(f"rewriting {name}: {err}")
                rec = None
        else:
            rec = None
        self.kept = rec
        if rec is None:
            self.writer = ShardWriter(w.out, self.split, name, w.tok.dtype, w.tok.sha256)

    def _flush(self) -> None:
        if self.buf:
            tokens, lengths = self.w.tok.encode_documents(self.buf)
            self.writer.add(tokens, lengths, self.buf_bytes)
            self.stats["tokenized_text_bytes"] += self.buf_bytes
            self.stats["tokenized_tokens"] += int(tokens.size)
            self.w.advance(self.buf_bytes)
            self.buf, self.buf_bytes = [], 0

    def _close_shard(self) -> None:
        text_sha256 = self.text_hash.hexdigest()
        if self.kept is not None:
            if self.kept.text_sha256 != text_sha256:
                raise LMStackError(
                    f"{self.w.out / self.kept.meta_file}: the input text of this finished shard has changed since it "
                    "was written; delete the data folder (or choose another data.path) and prepare again"
                )
            self.records.append(self.kept)
            self.stats["shards_skipped"].append(self.kept.name)
        else:
            self._flush()
            self.records.append(self.writer.close(text_sha256))
            self.writer = None
            self.stats["shards_written"].append(self.records[-1].name)

    def close(self) -> list[dict]:
        if self.k >= 0:
            self._close_shard()
        return [asdict(r) for r in self.records]

    def abort(self) -> None:
        if self.writer is not None:
            self.writer.abort()


def _run_task(task: Task) -> dict:
    """Prepare the blocks of `task` and write their block records; returns its stats."""
    w = _WORKER
    period, block_docs = val_period(w.cfg.val_fraction), w.cfg.block_docs
    stats = _new_stats()
    done: dict[int, dict] = {}  # block -> its shard records per split
    open_block: tuple[int, dict[str, _SplitShards]] | None = None

    def close_block() -> None:
        b, shards = open_block
        done[b] = {split: s.close() for split, s in shards.items()}

    n_docs = 0
    try:
        for k, doc in enumerate(w.readers[task.input]()):
            n_docs = k + 1
            b = k // block_docs
            if open_block is not None and open_block[0] != b:
                close_block()
                open_block = None
            if not task.covers(b):
                continue
            if open_block is None:
                open_block = (b, {s: _SplitShards(w, s, task.input, b, stats) for s in SPLITS})
            open_block[1][split_of(k, period)].add(doc)
        if open_block is not None:
            close_block()
            open_block = None
    except BaseException:
        if open_block is not None:
            for s in open_block[1].values():
                s.abort()
        raise
    n_blocks = max(1, -(-n_docs // block_docs))  # an empty input still has its (empty) block 0
    if n_docs == 0 and task.covers(0):
        done[0] = {s: [] for s in SPLITS}
    for b, shards in done.items():
        record = {"input": task.input, "block": b, "input_blocks": n_blocks, "tokenizer_sha256": w.tok.sha256}
        atomic_write_json(block_record_path(w.out, task.input, b), {**record, "shards": shards})
    return stats


def _make_pool(workers: int, initargs: tuple):
    methods = mp.get_all_start_methods()
    ctx = mp.get_context("fork" if "fork" in methods and sys.platform == "linux" else None)
    # Set while forking so that the tokenizers library neither warns nor keeps threads in the children.
    old = os.environ.get("TOKENIZERS_PARALLELISM")
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    try:
        return ctx.Pool(workers, initializer=_init_worker, initargs=initargs)
    finally:
        if old is None:
            os.environ.pop("TOKENIZERS_PARALLELISM", None)
        else:
            os.environ["TOKENIZERS_PARALLELISM"] = old


def _combine(stats: list[dict], seconds: float, **extra) -> dict:
    """The stats of several tasks (or parts) run side by side for `seconds`."""
    total = _new_stats()
    for st in stats:
        for key, value in total.items():
            total[key] = value + st[key]
    rate = seconds > 0
    return {
        "seconds": round(seconds, 3),
        **{k: v for k, v in total.items() if not isinstance(v, list)},
        "text_mb_per_s": round(total["tokenized_text_bytes"] / 1e6 / seconds, 3) if rate else None,
        "tokens_per_s": round(total["tokenized_tokens"] / seconds, 1) if rate else None,
        "shards_written": sorted(total["shards_written"]),
        "shards_skipped": sorted(total["shards_skipped"]),
        **extra,
    }


def _run_tasks(cfg: DataConfig, out: Path, tok: DataTokenizer, tasks: list[Task], progress: bool) -> dict:
    """Run `tasks` on cfg.num_workers processes (1: in this process); returns their combined stats."""
    from tqdm import tqdm

    global _WORKER
    workers = cfg.num_workers or os.cpu_count() or 1
    if len(tasks) < workers:  # share the inputs' blocks so that every worker has a task
        tasks = [t for share in deal(tasks, workers) for t in share]
    done = mp.Value("q", 0)
    bar = tqdm(desc=f"prepare {out}", unit="B", unit_scale=True, disable=not progress, mininterval=0.5)
    t0 = time.perf_counter()
    try:
        if workers == 1:  # here, the tokenizer may use its own threads
            _WORKER = _Worker(cfg, out, tok, progress, done, input_readers(cfg))
            results = [_run_task(t) for t in tasks]
        else:
            pool = _make_pool(min(workers, len(tasks)), (cfg, out, _tokenizer_args(tok), progress, done))
            try:
                pending = pool.map_async(_run_task, tasks, chunksize=1)
                while not pending.ready():
                    pending.wait(0.5)
                    bar.update(done.value - bar.n)
                results = pending.get()
            finally:
                pool.terminate()
                pool.join()
        bar.update(done.value - bar.n)
    finally:
        bar.close()
    return _combine(results, time.perf_counter() - t0, num_workers=workers)


# ---------------------------------------------------------------------------------------------
def _train_docs(cfg: DataConfig) -> Iterator[str]:
    period = val_period(cfg.val_fraction)
    for read in input_readers(cfg):
        for k, doc in enumerate(read()):
            if split_of(k, period) == "train":
                yield doc


def _diff(old: dict, new: dict) -> str:
    keys = [k for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]
    return "; ".join(f"{k}: {old.get(k)!r} then, {new.get(k)!r} now" for k in keys)


def _existing_tokenizer(out: Path, settings: dict, log) -> tuple[DataTokenizer | None, str]:
    """The folder's tokenizer (None and why when there is none to reuse); LMStackError when the folder
    was prepared with other settings."""
    old = _read_json(out / SETTINGS_FILE)
    if old is None:
        return None, f"{out / SETTINGS_FILE} is missing or unreadable"
    if old.get("settings") != settings:
        raise LMStackError(
            f"{out}: already prepared with other settings ({_diff(old.get('settings') or {}, settings)}); "
            "choose another data.path or delete the folder"
        )
    try:
        tok = load_data_tokenizer(out, old["tokenizer"])
    except (LMStackError, KeyError) as err:
        return None, str(err)
    log(f"reusing the tokenizer in {out} (sha256 {tok.sha256[:12]})")
    return tok, ""


def _load_or_build_tokenizer(cfg: DataConfig, out: Path, settings: dict, log) -> DataTokenizer:
    tok, why = _existing_tokenizer(out, settings, log)
    if tok is not None:
        return tok
    if (out / SETTINGS_FILE).is_file():
        log(f"rebuilding the tokenizer: {why}")
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
    atomic_write_json(out / SETTINGS_FILE, {"settings": settings, "tokenizer": tok.record()})
    return tok


def _shared_tokenizer(out: Path, settings: dict, log) -> DataTokenizer:
    """The tokenizer every part shares: made once beforehand, never by a part."""
    tok, why = _existing_tokenizer(out, settings, log)
    if tok is None:
        raise LMStackError(
            f"{out / 'tokenizer.json'}: no tokenizer to share ({why}); a part never makes its own: run "
            "`lmstack prepare-data CONFIG --tokenizer-only` once before the parts"
        )
    return tok


def _start(cfg: DataConfig, progress: bool, log) -> tuple[Path, dict, Any]:
    if log is None:
        log = (lambda msg: print(msg, file=sys.stderr)) if progress else (lambda msg: None)
    out = Path(cfg.path)
    open_source(cfg).check()  # missing files fail before anything is written or logged
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise LMStackError(f"data.path: cannot create '{out}': {err}") from None
    (out / PARTS_DIR).mkdir(exist_ok=True)
    return out, prepare_settings(cfg), log


def prepare_tokenizer(cfg: DataConfig, *, progress: bool = True, log=None) -> DataTokenizer:
    """Train or load the tokenizer into `cfg.path` (step 2), or reuse the one there: the first step
    before `prepare_data(cfg, part=...)` runs anywhere."""
    out, settings, log = _start(cfg, progress, log)
    return _load_or_build_tokenizer(cfg, out, settings, log)


def prepare_data(
    cfg: DataConfig, *, part: tuple[int, int] | None = None, progress: bool = True, log=None
) -> DataIndex | None:
    """Prepare `cfg.path` from the text `cfg` names (see the module docstring); returns its index.

    part: (I, N) prepares part I of N only (the tokenizer must be there already, see
    `prepare_tokenizer`), and returns None unless it found the other N - 1 parts finished and merged.
    progress: show a tqdm bar (MB/s of text) on stderr. log: a callable taking one line (default:
    print to stderr when `progress`, else silent)."""
    out, settings, log = _start(cfg, progress, log)
    n_inputs = len(input_readers(cfg))
    if part is None:
        tok = _load_or_build_tokenizer(cfg, out, settings, log)
        stats = _run_tasks(cfg, out, tok, [Task(i) for i in range(n_inputs)], progress)
        return _merge(cfg, out, tok, settings, stats, None)
    i, n = part
    check_part(i, n, f"{i}/{n}")
    tok = _shared_tokenizer(out, settings, log)
    stats = _run_tasks(cfg, out, tok, part_tasks(n_inputs, i, n), progress)
    atomic_write_json(
        part_record_path(out, i, n), {"part": i, "parts": n, "tokenizer_sha256": tok.sha256, "stats": stats}
    )
    log(
        f"part {i}/{n} done: {len(stats['shards_written'])} shards written, {len(stats['shards_skipped'])} kept"
    )
    if _unfinished_part(out, n, tok) is not None:
        return None
    return merge_parts(cfg, n, progress=progress, log=log)


def _unfinished_part(out: Path, parts: int, tok: DataTokenizer) -> int | None:
    for p in range(1, parts + 1):
        rec = _read_json(part_record_path(out, p, parts))
        if rec is None or rec.get("tokenizer_sha256") != tok.sha256:
            return p
    return None


def merge_parts(cfg: DataConfig, parts: int, *, progress: bool = True, log=None) -> DataIndex:
    """Write index.json of a folder prepared as `parts` parts (step 5); LMStackError naming the first
    part that has not finished."""
    out, settings, log = _start(cfg, progress, log)
    if parts < 1:
        raise LMStackError(f"--merge: expected the number of parts (a positive integer), got {parts}")
    tok = _shared_tokenizer(out, settings, lambda msg: None)
    missing = _unfinished_part(out, parts, tok)
    if missing is not None:
        raise LMStackError(
            f"{part_record_path(out, missing, parts)}: part {missing}/{parts} has not finished; run "
            f"`lmstack prepare-data CONFIG --part {missing}/{parts}` (again), then merge"
        )
    records = [_read_json(part_record_path(out, p, parts))["stats"] for p in range(1, parts + 1)]
    stats = _combine(
        records, max(r["seconds"] for r in records), num_workers=sum(r["num_workers"] for r in records)
    )
    index = _merge(cfg, out, tok, settings, {**stats, "parts": parts}, parts)
    log(f"merged {parts} parts into {out / 'index.json'}")
    return index


def _merge(
    cfg: DataConfig, out: Path, tok: DataTokenizer, settings: dict, stats: dict, parts: int | None
) -> DataIndex:
    """index.json from the block records, in (input, block) order."""
    n_inputs = len(input_readers(cfg))
    shards: dict[str, list[ShardInfo]] = {s: [] for s in SPLITS}
    for i in range(n_inputs):
        b, n_blocks = 0, 1
        while b < n_blocks:
            path = block_record_path(out, i, b)
            rec = _read_json(path)
            if rec is None or rec.get("tokenizer_sha256") != tok.sha256:
                who = f"part {block_owner(n_inputs, i, b, parts)}/{parts}" if parts else "the prepare"
                raise LMStackError(
                    f"{path}: missing: block {b} of input {i} was not prepared ({who} did not finish); "
                    "run it again"
                )
            n_blocks = rec["input_blocks"]
            for split in SPLITS:
                shards[split].extend(ShardInfo.from_dict(d) for d in rec["shards"][split])
            b += 1
    for split_shards in shards.values():
        for info in split_shards:
            check_shard(out, info, tok.dtype)
    if not any(shards.values()):
        raise LMStackError(f"data.source_options.{cfg.source}: no documents found in {settings['source']}")
    if not shards["train"]:
        raise LMStackError("data.val_fraction: every document went to the validation split; lower it")
    index = DataIndex(
        path=out,
        dtype=tok.dtype.name,
        vocab_size=tok.vocab_size,
        tokenizer=tok.record(),
        settings=settings,
        splits=shards,
        stats=stats,
    )
    index.write()
    return index
