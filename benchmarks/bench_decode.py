"""Decoding cost against context length, per mixer, through the Hugging Face export's `generate()`.

Per registered mixer (shortconv aside; `--mixers` to choose): an `LM` of the tiny config's shape
(d_model 128, 4 layers, 4 heads, vocab 8192; every layer the mixer, random weights) is exported with
lmstack's exporter (`lmstack.export.export_model`, which checks the reloaded logits) to a temporary
folder and loaded with `AutoModelForCausalLM.from_pretrained(..., trust_remote_code=True)`. Then, for
each prompt length L, one greedy `generate()` of `--new-tokens` tokens with the cache:

- `prefill_ms`: from the call to the first token's logits (the prompt's forward through the
  chunked path, which fills the cache);
- `decode_ms_per_token`: the median interval between the following tokens' logits (one cached
  forward of one token each); `decode_cpu_ms_per_token`: the same in this process's CPU time,
  which other processes on a shared host disturb less;
- `cache_bytes`: bytes of every tensor in the cache after the prompt's forward alone (the KV cache
  for attention, the recurrent states and convolution tails for the linear mixers);
- `cache_equals_full`: the check that decoding with the cache is the model's function: the
  generated tokens and their logits against one full forward (no cache) of the prompt and the
  generated tokens (`max_abs_logit_diff` within `--tolerance`; greedy tokens equal).

Timings are wall-clock medians of one call per length (the per-token figure a median over the
decoded tokens); with `--threads 1` (the default on CPU) they are per core. The 1-minute load average
before and after is recorded (`host`): on a shared host, read `*_cpu_ms_*`.

Writes `benchmarks/results/decode_<device>.json` (device, versions, shape, one row per mixer and L;
`decode_ms_per_token` also as `{mixer: {L: ms}}`) and a PNG of prefill time, per-token decode time
and cache size against L.

`--run-dir RUN` measures a trained run instead: its export `RUN/hf` (`lmstack export RUN RUN/hf`,
which `lmstack compare` writes for each of its runs) with its own weights and shape, and writes
`RUN/decode.json` with `decode_ms_per_token` as `{L: ms}`: the file `lmstack compare` reads for its
"decode ms/token @8K" column.

    python benchmarks/bench_decode.py                       # CPU: L = 512 ... 16384, every mixer
    python benchmarks/bench_decode.py --quick --out /tmp/decode.json   # tiny shapes (a test)
    python benchmarks/bench_decode.py --run-dir runs/compare/runs/lightning --lengths 512,2048,8192
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import op_bench  # noqa: E402

LENGTHS = [512, 1024, 2048, 4096, 8192, 16384]
QUICK = {"d_model": 32, "n_layers": 2, "n_heads": 2, "vocab": 256, "lengths": [32, 64], "new_tokens": 4}


class Clock:
    """A logits processor that only records when generate() asks for each token's scores."""

    def __init__(self) -> None:
        self.wall: list[float] = []
        self.cpu: list[float] = []

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        self.wall.append(time.perf_counter())
        self.cpu.append(time.process_time())
        return scores


def cache_bytes(cache) -> int:
    from lmstack.export.modeling_lmstack import map_tensors

    sizes: list[int] = []
    map_tensors(cache.lm_cache.states, lambda t: sizes.append(t.numel() * t.element_size()) or t)
    return sum(sizes)


def load_export(folder: Path):
    """The export in `folder` through transformers (its own model code) and its number of parameters."""
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(str(folder), trust_remote_code=True).eval()
    return hf, hf.model.num_params()


def build_export(mixer: str, args: argparse.Namespace, max_len: int, folder: Path):
    """(the exported model reloaded through transformers, number of parameters)."""
    from lmstack.export.exporter import export_model
    from lmstack.model import LM, ModelConfig

    torch.manual_seed(0)
    config = ModelConfig(
        vocab_size=args.vocab,
        d_model=args.d_model,
        n_layers=args.n_layers,
        n_heads=args.n_heads,
        layer_mixers=[mixer] * args.n_layers,
        max_seq_len=max_len,
    )
    config.validate()
    model = LM(config)
    export_model(model, folder, overwrite=True)
    return load_export(folder)


@torch.inference_mode()
def measure(hf, L: int, new_tokens: int, tolerance: float) -> dict:
    gen = torch.Generator().manual_seed(L)
    prompt = torch.randint(0, hf.config.vocab_size, (1, L), generator=gen)
    clock = Clock()
    t0, c0 = time.perf_counter(), time.process_time()
    out = hf.generate(
        prompt,
        attention_mask=torch.ones_like(prompt),
        max_new_tokens=new_tokens,
        min_new_tokens=new_tokens,
        do_sample=False,
        use_cache=True,
        logits_processor=[clock],
        output_logits=True,
        return_dict_in_generate=True,
        pad_token_id=0,
    )
    decode = [b - a for a, b in zip(clock.wall, clock.wall[1:])]
    decode_cpu = [b - a for a, b in zip(clock.cpu, clock.cpu[1:])]
    tokens = out.sequences[0, L:]
    cached_logits = torch.stack(out.logits, 1)[0]  # [new_tokens, V]
    # The same function without the cache: one forward of the prompt and all but the last new token.
    full = hf(out.sequences[:, :-1], use_cache=False).logits[0, L - 1 :]
    diff = (full - cached_logits).abs().max().item()
    same_tokens = torch.equal(full.argmax(-1), tokens)
    prefill_cache = hf(prompt, use_cache=True).past_key_values
    return {
        "L": L,
        "prefill_ms": (clock.wall[0] - t0) * 1e3,
        "prefill_cpu_ms": (clock.cpu[0] - c0) * 1e3,
        "decode_ms_per_token": statistics.median(decode) * 1e3,
        "decode_cpu_ms_per_token": statistics.median(decode_cpu) * 1e3,
        "decoded_tokens": len(decode),
        "cache_bytes": cache_bytes(prefill_cache),
        "cache_tokens": prefill_cache.get_seq_length(),
        "max_abs_logit_diff": diff,
        "greedy_tokens_equal": same_tokens,
        "cache_equals_full": same_tokens and diff <= tolerance,
    }


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for mixer in result["mixers"]:
        rows = [r for r in result["results"] if r["mixer"] == mixer]
        Ls = [r["L"] for r in rows]
        for ax, key, scale in zip(axes, ("prefill_ms", "decode_ms_per_token", "cache_bytes"), (1, 1, 2**-20)):
            ax.plot(Ls, [r[key] * scale for r in rows], marker="o", label=mixer)
    for ax, ylabel in zip(axes, ("prefill (ms)", "decode (ms / token)", "cache after the prompt (MiB)")):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("prompt length L (tokens)")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3, which="both")
    axes[0].legend()
    s = result["shape"]
    fig.suptitle(
        f"generate() of the HF export, {result['device']}: d_model {s['d_model']}, {s['n_layers']} layers, "
        f"{s['n_heads']} heads, fp32, batch 1"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--mixers", default=None, help="comma-separated (default: every registered mixer but shortconv)"
    )
    p.add_argument("--lengths", default=None, help=f"comma-separated prompt lengths (default {LENGTHS})")
    p.add_argument("--new-tokens", type=int, default=16, help="tokens generated after each prompt")
    p.add_argument("--d-model", type=int, default=128)
    p.add_argument("--n-layers", type=int, default=4)
    p.add_argument("--n-heads", type=int, default=4)
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--tolerance", type=float, default=1e-3, help="max |logit difference|, cached vs full")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: 1 on CPU)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--quick", action="store_true", help=f"tiny shapes for a test: {QUICK}")
    p.add_argument(
        "--run-dir",
        type=Path,
        default=None,
        help="measure this run's export RUN/hf (its weights and shape; --mixers and the shape flags do not "
        "apply) and write RUN/decode.json, which `lmstack compare` reads",
    )
    p.add_argument("--out", type=Path, default=None, help="JSON path (default results/decode_<device>.json)")
    p.add_argument(
        "--into",
        type=Path,
        default=None,
        help="instead of --out and the PNG: put the result under the key 'decode' of this JSON file (and "
        "its failures into the file's 'failures'); the GPU suite's way to stay within 8 result files",
    )
    args = p.parse_args(argv)
    if args.quick:
        for key in ("d_model", "n_layers", "n_heads", "vocab", "new_tokens"):
            setattr(args, key, QUICK[key])
        args.lengths = args.lengths or ",".join(map(str, QUICK["lengths"]))
    args.lengths = [int(v) for v in args.lengths.split(",")] if args.lengths else LENGTHS
    if args.new_tokens < 2:
        p.error("--new-tokens: at least 2 (the per-token time is measured between tokens)")
    return args


def main(argv: list[str] | None = None) -> dict:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    args = parse_args(argv)
    from lmstack.model import MIXERS

    device = torch.device(args.device)
    torch.set_num_threads(args.threads or (1 if device.type == "cpu" else torch.get_num_threads()))
    mixers = args.mixers.split(",") if args.mixers else [m for m in MIXERS if m != "shortconv"]
    run_export = None
    if args.run_dir is not None:
        folder = args.run_dir / "hf"
        if not (folder / "config.json").is_file():
            sys.exit(
                f"--run-dir {args.run_dir}: no export in {folder} (lmstack export {args.run_dir} {folder})"
            )
        run_export = load_export(folder)
        config = run_export[0].model.config
        mixers = ["+".join(dict.fromkeys(config.mixer_for_layer(i) for i in range(config.n_layers)))]
        args.d_model, args.n_layers, args.n_heads, args.vocab = (
            config.d_model, config.n_layers, config.n_heads, config.vocab_size
        )  # fmt: skip
    import transformers

    result = {
        "benchmark": "decode",
        "device": torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)",
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "quick": args.quick,
        "run_dir": None if args.run_dir is None else str(args.run_dir),
        "shape": {
            "d_model": args.d_model,
            "n_layers": args.n_layers,
            "n_heads": args.n_heads,
            "vocab": args.vocab,
            "batch": 1,
            "dtype": "fp32",
            "new_tokens": args.new_tokens,
        },
        "tolerance": args.tolerance,
        "timing": "one greedy generate() per (mixer, L); prefill: call to the first logits; decode: median "
        "interval between the following tokens' logits; ms",
        "mixers": mixers,
        "results": [],
    }
    if hasattr(os, "getloadavg"):
        result["load_avg_1min_before"] = round(os.getloadavg()[0], 2)
    with tempfile.TemporaryDirectory(prefix="bench-decode-") as tmp:
        for mixer in mixers:
            hf, params = run_export or build_export(
                mixer, args, max(args.lengths) + args.new_tokens, Path(tmp) / mixer
            )
            hf.to(device)
            for L in args.lengths:
                row = {"mixer": mixer, "params": params, **measure(hf, L, args.new_tokens, args.tolerance)}
                result["results"].append(row)
                print(
                    json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in row.items()}),
                    flush=True,
                )
            del hf
    result["decode_ms_per_token"] = {
        m: {str(r["L"]): round(r["decode_ms_per_token"], 3) for r in result["results"] if r["mixer"] == m}
        for m in mixers
    }
    if args.run_dir is not None:  # one model: {L: ms}, as `lmstack compare` reads it
        result["decode_ms_per_token"] = result["decode_ms_per_token"][mixers[0]]
    result["failures"] = [
        f"{r['mixer']} L={r['L']}: cached decoding differs from the full forward "
        f"(max |logit diff| {r['max_abs_logit_diff']:.2e}, greedy tokens equal: {r['greedy_tokens_equal']})"
        for r in result["results"]
        if not r["cache_equals_full"]
    ]
    if hasattr(os, "getloadavg"):
        result["load_avg_1min_after"] = round(os.getloadavg()[0], 2)
        result["host"] = op_bench.host_note(result["load_avg_1min_before"], result["load_avg_1min_after"])
    if args.into is not None:
        record = json.loads(args.into.read_text()) if args.into.is_file() else {"failures": []}
        record["decode"] = result
        record["failures"] = record.get("failures", []) + [f"decode: {line}" for line in result["failures"]]
        args.into.write_text(json.dumps(record, indent=2) + "\n")
        print(f"wrote the key 'decode' of {args.into}")
        return result
    default = op_bench.RESULTS / f"decode_{op_bench.device_tag(device)}.json"
    out = args.out or (default if args.run_dir is None else args.run_dir / "decode.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    plot(result, out.with_suffix(".png"))
    print(f"wrote {out} and {out.with_suffix('.png')}")
    for line in result["failures"]:
        print("FAIL", line)
    return result


if __name__ == "__main__":
    sys.exit(1 if main()["failures"] else 0)
