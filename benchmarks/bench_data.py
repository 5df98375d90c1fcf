"""Data pipeline throughput: `prepare_data` against a plain `tokenizers` batch-encode loop, against
the number of worker processes and of parts (`--part I/N`), and the packed readers' batches per second.

    python benchmarks/bench_data.py [--copies 2] [--files 4] [--repeats 3] [--out benchmarks/results/data_cpu.json]

Corpus: the embedded Shakespeare corpus (5.06 MB of text, 471 documents), repeated `--copies` times and
dealt round robin into `--files` Pile-format jsonl.zst files (inputs are the unit of parallel reading;
data.block_docs=128 gives every file several blocks).
Tokenizer: a byte-level BPE (vocab 8192) trained once up front; every timed run loads that same
tokenizer.json into its folder before its timing starts, so neither training nor saving it is counted. Every timed measurement runs in a fresh process (so
that TOKENIZERS_PARALLELISM applies), and the variants are interleaved over the repeats so that
background load on a shared machine hits them alike; the best and median are reported.

Measured:
- baseline_1thread: one process, `Tokenizer.encode_batch` over batches of 128 documents with
  TOKENIZERS_PARALLELISM=false (no writing);
- baseline_threads: the same loop with the tokenizer's own thread pool (all cores);
- prepare_in_process_1thread: `lmstack.data.prepare_data` end to end (reading, hashing, tokenizing,
  writing shards + index) with num_workers=1 and TOKENIZERS_PARALLELISM=false: the pipeline's own
  overhead against baseline_1thread;
- prepare_in_process_threads: the same with the tokenizer's thread pool on;
- prepare_workers_N: the default, a pool of one single-threaded tokenizer process per core;
- parts_1_workers_N: the same through `--part 1/1` (part record, then the merge);
- parts_N_workers_1: N parts at once (N processes, as N machines would run them, here on one host),
  each with one worker, timed from the start of the first to the merge by the last; the tokenizer is
  made beforehand (`prepare_tokenizer`) and not timed;
- read_parse_1thread: only reading, decompressing and parsing the inputs (what a worker spends on
  the blocks of an input it skips);
- pile_estimate: hours for the whole Pile (~825 GB of text, 30 files, ~211M documents) on M machines
  of C cores: the work of every worker under the real dealing (lmstack.data.prepare.deal, blocks of
  data.block_docs) priced at the median text MB per CPU-second of one worker (times the per-CPU
  efficiency measured with N workers, CPU time being the load-robust figure on a shared host) and,
  for skipped blocks, at read_parse_1thread's rate; the slowest worker sets the time.
  `--estimate-only` recomputes it from the JSON at --out (measuring read_parse_1thread if missing).
- reader: TrainReader / ValReader batches per second at a few (batch, seq_len) shapes.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


PILE_TEXT_MB = 825e3
BLOCK_DOCS = 128


def _corpus(copies: int, files: int, workdir: Path) -> list[Path]:
    """The embedded corpus, repeated `copies` times, dealt round robin into `files` Pile-format
    jsonl.zst files."""
    import zstandard

    from lmstack.data.sources.default import DEFAULT_CORPUS

    raw = zstandard.ZstdDecompressor().stream_reader(DEFAULT_CORPUS.open("rb")).read()
    lines = [line for line in raw.split(b"\n") if line.strip()] * copies
    out = []
    for f in range(files):
        path = workdir / f"corpus_x{copies}_{f}.jsonl.zst"
        path.write_bytes(zstandard.ZstdCompressor(level=3).compress(b"\n".join(lines[f::files]) + b"\n"))
        out.append(path)
    return out


def _cfg(corpus: str, tokenizer: str, workers: int, out: str):
    from lmstack.config import DataConfig
    from lmstack.model.schema import from_dict

    fields = {
        "path": out,
        "source": "pile",
        "source_options": {"pile": {"inputs": corpus.split(",")}},
        "tokenizer": tokenizer,
        "num_workers": workers,
        "val_fraction": 0.02,
        "shard_mb": 8,
        "block_docs": BLOCK_DOCS,
    }
    return from_dict(DataConfig, fields, prefix="data.")


# -- measurements, each run in its own process -----------------------------------------------
def _cpu_seconds() -> float:
    """CPU time of this process and its reaped children (the tokenizer workers), user + system."""
    import resource

    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def _rates(dt: float, cpu: float, n_bytes: int, n_tokens: int) -> dict:
    return {
        "seconds": dt,
        "cpu_seconds": cpu,
        "text_mb_per_s": n_bytes / 1e6 / dt,
        "text_mb_per_cpu_s": n_bytes / 1e6 / cpu,
        "tokens_per_s": n_tokens / dt,
        "tokens_per_cpu_s": n_tokens / cpu,
        "tokens": n_tokens,
    }


def run_baseline(corpus: str, tokenizer: str) -> dict:
    from tokenizers import Tokenizer

    from lmstack.data.sources.jsonl import iter_jsonl

    tok = Tokenizer.from_file(tokenizer)
    t0, c0 = time.perf_counter(), _cpu_seconds()
    n_bytes = n_tokens = 0
    batch: list[str] = []

    def flush() -> None:
        nonlocal n_tokens
        n_tokens += sum(len(e.ids) + 1 for e in tok.encode_batch(batch, add_special_tokens=False))  # +1: EOS
        batch.clear()

    for doc in iter_jsonl([Path(f) for f in corpus.split(",")]):
        n_bytes += len(doc.encode())
        batch.append(doc)
        if len(batch) == 128:
            flush()
    flush()
    return _rates(time.perf_counter() - t0, _cpu_seconds() - c0, n_bytes, n_tokens)


def run_prepare(corpus: str, tokenizer: str, workers: int, out: str, part: str = "") -> dict:
    """One prepare (or, with part "I/N", one part of it) in this process."""
    from lmstack.data.prepare import parse_part, prepare_data, prepare_tokenizer

    if not part:  # the tokenizer is made before the timing, as the parts' is
        prepare_tokenizer(_cfg(corpus, tokenizer, workers, out), progress=False)
    t0, c0 = time.perf_counter(), _cpu_seconds()
    index = prepare_data(
        _cfg(corpus, tokenizer, workers, out), part=parse_part(part) if part else None, progress=False
    )
    dt, cpu = time.perf_counter() - t0, _cpu_seconds() - c0
    if index is None:  # a part that did not merge: its own record
        st = json.loads((Path(out) / "parts" / f"part-{part.replace('/', '-of-')}.json").read_text())["stats"]
    else:
        st = index.stats
    rates = _rates(dt, cpu, st["tokenized_text_bytes"], st["tokenized_tokens"])
    return {**rates, "text_bytes": st["tokenized_text_bytes"], "end": time.time()}


def run_parts(corpus: str, tokenizer: str, parts: int, workers: int, out: str) -> dict:
    """`parts` parts of one prepare at once, each in its own process (as on `parts` machines)."""
    from lmstack.data.prepare import prepare_tokenizer

    prepare_tokenizer(_cfg(corpus, tokenizer, workers, out), progress=False)
    t0 = time.perf_counter()
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                __file__,
                "--_run",
                "prepare",
                corpus,
                tokenizer,
                str(workers),
                out,
                f"{i}/{parts}",
            ],
            stdout=subprocess.PIPE,
            text=True,
        )
        for i in range(1, parts + 1)
    ]
    results = [json.loads(p.communicate()[0].strip().splitlines()[-1]) for p in procs]
    if any(p.returncode for p in procs):
        raise SystemExit("a part failed")
    # From the first part's start to the last part's end (the merge): imports not counted, as elsewhere.
    dt = max(r["end"] for r in results) - min(r["end"] - r["seconds"] for r in results)
    n_bytes = sum(r["text_bytes"] for r in results)
    rates = _rates(dt, sum(r["cpu_seconds"] for r in results), n_bytes, sum(r["tokens"] for r in results))
    return {**rates, "harness_seconds": time.perf_counter() - t0}


def run_read(corpus: str) -> dict:
    from lmstack.data.sources.jsonl import iter_jsonl

    t0, c0 = time.perf_counter(), _cpu_seconds()
    n_bytes = sum(len(doc.encode()) for doc in iter_jsonl([Path(f) for f in corpus.split(",")]))
    return _rates(time.perf_counter() - t0, _cpu_seconds() - c0, n_bytes, 0)


PILE_FILES, PILE_DOCS = 30, 211e6


def pile_estimate(prep: dict, cores: int, block_docs: int = 50000) -> dict:
    """Hours for the Pile on M machines of C cores (see the module docstring)."""
    from lmstack.data.prepare import deal, part_tasks

    def median(variant: str) -> float:
        return statistics.median(r["text_mb_per_cpu_s"] for r in prep[variant]["runs"])

    per_core = median("prepare_in_process_1thread")
    efficiency = min(1.0, median(f"prepare_workers_{cores}") / per_core)
    read_rate = median("read_parse_1thread")
    blocks = int(-(-PILE_DOCS / PILE_FILES // block_docs))
    block_mb = PILE_TEXT_MB / PILE_FILES / blocks

    def hours(machines: int, c: int) -> float:
        worst = 0.0
        for part in range(1, machines + 1):
            for share in deal(part_tasks(PILE_FILES, part, machines), c):
                mine = sum(sum(t.covers(b) for b in range(blocks)) for t in share)
                skipped = len(share) * blocks - mine
                worst = max(worst, mine * block_mb / (per_core * efficiency) + skipped * block_mb / read_rate)
        return round(worst / 3600, 2)

    return {
        "text_mb": PILE_TEXT_MB,
        "files": PILE_FILES,
        "documents": PILE_DOCS,
        "block_docs": block_docs,
        "text_mb_per_cpu_s_one_worker_median": round(per_core, 3),
        f"per_cpu_efficiency_{cores}_workers": round(efficiency, 3),
        "read_parse_mb_per_cpu_s_median": round(read_rate, 3),
        "hours_MxC": {
            f"{m}x{c}": hours(m, c) for m, c in ((1, 2), (1, 64), (4, 64), (16, 64), (32, 64), (64, 128))
        },
        "command": "sbatch --array=1-M --cpus-per-task=C launch/prepare_data.sbatch configs/data/pile.yaml",
    }


def run_reader(data_dir: str) -> dict:
    import torch

    from lmstack.data import TrainReader, ValReader

    torch.set_num_threads(1)
    out = {}
    for B, T in ((8, 2048), (32, 512), (64, 256)):
        r = TrainReader(data_dir, T, B, seed=0)
        r.next_batch()  # map the shards
        n, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < 2.0:
            r.next_batch()
            n += 1
        dt = time.perf_counter() - t0
        out[f"train_B{B}_T{T}"] = {
            "batches_per_s": n / dt,
            "tokens_per_s": n * B * T / dt,
            "ms_per_batch": 1e3 * dt / n,
        }
    v = ValReader(data_dir, 512, 8)
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < 1.0:
        n += sum(1 for _ in v)
    dt = time.perf_counter() - t0
    out["val_B8_T512"] = {"batches_per_s": n / dt, "batches_per_pass": len(v)}
    return out


def _sub(kind: str, *args: str, env: dict | None = None) -> dict:
    cmd = [sys.executable, __file__, "--_run", kind, *args]
    res = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, **(env or {})}, check=False)
    if res.returncode != 0:
        raise SystemExit(f"{kind} failed:\n{res.stderr}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def device_info() -> dict:
    cpu = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import numpy
    import tokenizers
    import torch

    import lmstack

    return {
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "versions": {
            "lmstack": lmstack.__version__,
            "tokenizers": tokenizers.__version__,
            "numpy": numpy.__version__,
            "torch": torch.__version__,
        },
    }


def write_report(out: str, benchmark: str, results: dict, **fields) -> None:
    """Write a benchmark's JSON (name, device and versions, `fields`, results) and print its results."""
    report = {"benchmark": benchmark, "device": device_info(), **fields, "results": results}
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(json.dumps(report, indent=1) + "\n")
    print(json.dumps(results, indent=1))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--copies", type=int, default=2, help="repeat the embedded corpus this many times")
    ap.add_argument("--files", type=int, default=4, help="deal the corpus into this many input files")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--vocab-size", type=int, default=8192)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "data_cpu.json"))
    ap.add_argument("--estimate-only", action="store_true", help="recompute pile_estimate in --out")
    ap.add_argument("--_run", nargs="+", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args._run:
        kind, *rest = args._run
        fn = {
            "baseline": run_baseline,
            "prepare": run_prepare,
            "parts": run_parts,
            "read": run_read,
            "reader": run_reader,
        }[kind]
        if kind in ("prepare", "parts"):
            rest[2] = int(rest[2])
        if kind == "parts":
            rest[3] = int(rest[3])
        print(json.dumps(fn(*rest)))
        return

    from lmstack.data import build_tokenizer
    from lmstack.data.sources.default import DEFAULT_CORPUS
    from lmstack.data.sources.jsonl import iter_jsonl

    cores = os.cpu_count() or 1
    if args.estimate_only:
        estimate_only(args, cores)
        return
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        files = _corpus(args.copies, args.files, tmp)
        corpus = ",".join(str(f) for f in files)
        t0 = time.perf_counter()
        tok = build_tokenizer("bpe", vocab_size=args.vocab_size, train_docs=iter_jsonl([DEFAULT_CORPUS]))
        train_s = time.perf_counter() - t0
        tok_file = tmp / "tokenizer.json"
        tok_file.write_text(tok.json_str)
        text_mb = sum(len(d.encode()) for d in iter_jsonl(files)) / 1e6
        print(f"corpus {text_mb:.2f} MB; BPE ({args.vocab_size}) trained in {train_s:.1f}s", file=sys.stderr)

        variants = {
            "baseline_1thread": lambda: _sub(
                "baseline", corpus, str(tok_file), env={"TOKENIZERS_PARALLELISM": "false"}
            ),
            "baseline_threads": lambda: _sub(
                "baseline", corpus, str(tok_file), env={"TOKENIZERS_PARALLELISM": "true"}
            ),
            "prepare_in_process_1thread": lambda: _sub(
                "prepare",
                corpus,
                str(tok_file),
                "1",
                str(tmp / f"p1_{time.time_ns()}"),
                env={"TOKENIZERS_PARALLELISM": "false"},
            ),
            "prepare_in_process_threads": lambda: _sub(
                "prepare",
                corpus,
                str(tok_file),
                "1",
                str(tmp / f"pt_{time.time_ns()}"),
                env={"TOKENIZERS_PARALLELISM": "true"},
            ),
            f"prepare_workers_{cores}": lambda: _sub(
                "prepare", corpus, str(tok_file), str(cores), str(tmp / f"pn_{time.time_ns()}")
            ),
            "read_parse_1thread": lambda: _sub("read", corpus),
            f"parts_1_workers_{cores}": lambda: _sub(
                "parts", corpus, str(tok_file), "1", str(cores), str(tmp / f"q1_{time.time_ns()}")
            ),
            f"parts_{cores}_workers_1": lambda: _sub(
                "parts", corpus, str(tok_file), str(cores), "1", str(tmp / f"qn_{time.time_ns()}")
            ),
        }
        runs: dict[str, list[dict]] = {k: [] for k in variants}
        for rep in range(args.repeats):
            for name, fn in variants.items():
                r = fn()
                runs[name].append(r)
                print(
                    f"[{rep}] {name:20s} {r['text_mb_per_s']:6.2f} MB/s {r['tokens_per_s'] / 1e3:8.1f}k tok/s"
                    f" {r['tokens_per_cpu_s'] / 1e3:8.1f}k tok/cpu-s",
                    file=sys.stderr,
                )

        data_dir = tmp / "reader_data"
        _sub("prepare", corpus, str(tok_file), str(cores), str(data_dir))
        reader = _sub("reader", str(data_dir))
        for k, v in reader.items():
            print(f"reader {k}: {v['batches_per_s']:.0f} batches/s", file=sys.stderr)

    def summary(rs: list[dict]) -> dict:
        mb = [r["text_mb_per_s"] for r in rs]
        ts = [r["tokens_per_s"] for r in rs]
        cpu = [r["tokens_per_cpu_s"] for r in rs]
        return {
            "tokens_per_cpu_s_median": round(statistics.median(cpu)),
            "text_mb_per_s_best": round(max(mb), 3),
            "text_mb_per_s_median": round(statistics.median(mb), 3),
            "tokens_per_s_best": round(max(ts)),
            "tokens_per_s_median": round(statistics.median(ts)),
            "runs": [{k: round(v, 3) for k, v in r.items()} for r in rs],
        }

    prep = {k: summary(v) for k, v in runs.items()}
    base = prep["baseline_1thread"]["text_mb_per_s_median"]
    result = {
        "benchmark": "data pipeline (benchmarks/bench_data.py)",
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "device": device_info(),
        "load_average_before": [round(x, 2) for x in load_before],
        "load_average_after": [round(x, 2) for x in os.getloadavg()],
        "corpus": {"name": "embedded Shakespeare", "copies": args.copies, "text_mb": round(text_mb, 3)},
        "tokenizer": {
            "kind": "byte-level BPE",
            "vocab_size": tok.vocab_size,
            "train_seconds": round(train_s, 2),
        },
        "prepare": prep,
        "speedup_vs_baseline_1thread_median": {
            k: round(v["text_mb_per_s_median"] / base, 2) for k, v in prep.items() if k != "baseline_1thread"
        },
        "speedup_vs_baseline_1thread_best": {
            k: round(v["text_mb_per_s_best"] / prep["baseline_1thread"]["text_mb_per_s_best"], 2)
            for k, v in prep.items()
            if k != "baseline_1thread"
        },
        "note": "the host's 2 cores are shared with other agents' jobs (about 6 of them; see the load averages): "
        "best-of-N is the least disturbed run; "
        "tokens_per_cpu_s (CPU time of the process and its workers) is the load-robust efficiency figure",
        "reader": {k: {kk: round(vv, 3) for kk, vv in v.items()} for k, v in reader.items()},
        "pile_estimate": pile_estimate(prep, cores),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result["speedup_vs_baseline_1thread_median"]), file=sys.stderr)
    print(f"wrote {args.out}", file=sys.stderr)


def estimate_only(args, cores: int) -> None:
    """pile_estimate of the JSON at --out again; read_parse_1thread measured now if it lacks it."""
    result = json.loads(Path(args.out).read_text())
    prep = result["prepare"]
    if "read_parse_1thread" not in prep:
        with tempfile.TemporaryDirectory() as tmp:
            corpus = ",".join(str(f) for f in _corpus(args.copies, args.files, Path(tmp)))
            runs = [_sub("read", corpus) for _ in range(args.repeats)]
        prep["read_parse_1thread"] = {
            "text_mb_per_s_median": round(statistics.median(r["text_mb_per_s"] for r in runs), 3),
            "runs": [{k: round(v, 3) for k, v in r.items()} for r in runs],
            "measured": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
            + " (--estimate-only, after the rest)",
            "load_average": [round(x, 2) for x in os.getloadavg()],
        }
    result["pile_estimate"] = pile_estimate(prep, cores)
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result["pile_estimate"], indent=1))


if __name__ == "__main__":
    main()
