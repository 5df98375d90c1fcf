"""Cost of verifying a token shard's checksum, and the hash candidates compared on the same file.

    python benchmarks/bench_checksum.py [--size-mb 1024] [--repeats 3] [--out benchmarks/results/checksum_cpu.json]

Writes one shard of `--size-mb` MB of random uint16 tokens (with a matching `.docs` file and record),
then times, best and median of `--repeats`:
- verify_shard: `lmstack.data.shards.check_shard(..., full=True)`, what a reader runs before a shard's
  first read and what `lmstack verify-data` runs per shard (size checks + sha256 of .bin and .docs);
- sha256 / blake2b / crc32: reading the .bin in the same 4 MB chunks and hashing it with each
  (hashlib.sha256 is what the format stores; xxhash is not installed here).
The file is in the page cache after writing it, so these are hashing costs; a cold read adds the
storage's read time.
"""

from __future__ import annotations

import argparse
import hashlib
import statistics
import sys
import tempfile
import time
import zlib
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench_data import write_report  # noqa: E402 (benchmarks/ is the script's folder)

CHUNK = 1 << 22


def _hash_file(path: Path, name: str) -> None:
    if name == "crc32":
        crc = 0
        with open(path, "rb") as f:
            while block := f.read(CHUNK):
                crc = zlib.crc32(block, crc)
        return
    h = hashlib.new(name)
    with open(path, "rb") as f:
        while block := f.read(CHUNK):
            h.update(block)


def _timed(fn, repeats: int) -> dict:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return {"best_s": round(min(times), 3), "median_s": round(statistics.median(times), 3)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size-mb", type=int, default=1024)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "checksum_cpu.json"))
    args = ap.parse_args()

    from lmstack.data.shards import ShardWriter, check_shard

    with tempfile.TemporaryDirectory() as tmp:
        n_tokens = args.size_mb * (1 << 20) // 2
        writer = ShardWriter(Path(tmp), "train", 0, np.uint16, "bench")
        rng = np.random.default_rng(0)
        per_doc = 1 << 16
        for start in range(0, n_tokens, 1 << 24):
            n = min(1 << 24, n_tokens - start)
            lengths = np.full(n // per_doc, per_doc)
            lengths[-1] += n - lengths.sum()
            writer.add(rng.integers(0, 50_000, n, dtype=np.uint16), lengths, 0)
        info = writer.close("bench")
        bin_path = Path(tmp) / info.bin_file
        size_gb = bin_path.stat().st_size / 1e9
        results = {
            "verify_shard": _timed(lambda: check_shard(Path(tmp), info, np.uint16, full=True), args.repeats)
        }
        for name in ("sha256", "blake2b", "crc32"):
            results[name] = _timed(lambda name=name: _hash_file(bin_path, name), args.repeats)
    for r in results.values():
        r["gb_per_s"] = round(size_gb / r["best_s"], 3)
    write_report(
        args.out, "shard checksum verification", results, shard_gb=round(size_gb, 3), repeats=args.repeats
    )


if __name__ == "__main__":
    main()
