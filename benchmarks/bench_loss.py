"""Peak memory of one loss step (forward + backward of LM head + cross-entropy) at vocab 50K on CPU:
the plain path (`next_token_loss_sum(hidden @ W.T, labels)`, [N, V] logits) against the fused one
(`fused_linear_next_token_loss_sum`, [chunk, V] logits).

    python benchmarks/bench_loss.py [--tokens 4096] [--d-model 512] [--vocab 50304] [--chunk 1024]

Method: each path runs in its own fresh process (`--_run`), so allocator state cannot carry over. After
building the inputs (hidden [N, D], weight [V, D], labels, all fp32) the process reads its peak resident
set (`resource.getrusage(...).ru_maxrss`), runs one step, reads it again; the step's peak is the
difference. Tensors this large are mmap-ed by glibc and returned on free, so RSS follows the live
tensors; the figure is the extra peak over the inputs, which includes the input gradients both paths
must produce ([N, D] + [V, D]). `expected_logits_mb` is one fp32 [N, V] block, for scale.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench_data import write_report  # noqa: E402 (benchmarks/ is the script's folder)


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def run_one(path: str, tokens: int, d_model: int, vocab: int, chunk: int) -> dict:
    import torch

    from lmstack.model.loss import fused_linear_next_token_loss_sum, next_token_loss_sum

    torch.manual_seed(0)
    hidden = torch.randn(tokens, d_model).requires_grad_()
    weight = (torch.randn(vocab, d_model) / d_model**0.5).requires_grad_()
    labels = torch.randint(0, vocab, (1, tokens))
    before = _peak_mb()
    if path == "plain":
        loss, _ = next_token_loss_sum((hidden @ weight.t())[None], labels)
    else:
        loss, _ = fused_linear_next_token_loss_sum(hidden[None], weight, labels, chunk_size=chunk)
    loss.backward()
    return {"peak_step_mb": round(_peak_mb() - before, 1), "loss": loss.item()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=4096, help="tokens in the micro-batch (B * T)")
    ap.add_argument("--d-model", type=int, default=512)
    ap.add_argument("--vocab", type=int, default=50304)
    ap.add_argument("--chunk", type=int, default=1024, help="tokens per chunk of the fused path")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "loss_cpu.json"))
    ap.add_argument("--_run", help=argparse.SUPPRESS)
    args = ap.parse_args()
    shape = (args.tokens, args.d_model, args.vocab, args.chunk)
    if args._run:
        print(json.dumps(run_one(args._run, *shape)))
        return
    results = {}
    for path in ("plain", "fused"):
        cmd = [
            sys.executable,
            __file__,
            "--_run",
            path,
            *(f"--{k}={v}" for k, v in zip(("tokens", "d-model", "vocab", "chunk"), shape)),
        ]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True, cwd=ROOT)
        results[path] = json.loads(out.stdout.strip().splitlines()[-1])
    results["saved_mb"] = round(results["plain"]["peak_step_mb"] - results["fused"]["peak_step_mb"], 1)
    fields = dict(zip(("tokens", "d_model", "vocab", "chunk"), shape))
    fields["method"] = "fresh process per path; ru_maxrss after the step minus before it (inputs built)"
    fields["expected_logits_mb"] = round(args.tokens * args.vocab * 4 / 2**20, 1)
    write_report(args.out, "loss", results, **fields)


if __name__ == "__main__":
    main()
