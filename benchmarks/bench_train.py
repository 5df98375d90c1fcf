"""Training throughput and peak memory: lmstack against transformers' LlamaForCausalLM of the same
size, batch and sequence length, in one run.

    python benchmarks/bench_train.py                       # CPU defaults -> benchmarks/results/train_cpu.json
    python benchmarks/bench_train.py --preset gpu-350m     # on a GPU -> benchmarks/results/train_gpu.json

Variants (each in its own process, so peak memory is its own):
- hf_llama:        LlamaForCausalLM (SDPA attention), a plain PyTorch loop;
- lmstack:         lmstack.model.LM, the same loop (plain causal rows);
- lmstack_packed:  the same with packed documents (a BatchContext), as the trainer feeds it;
- lmstack_trainer: the full `lmstack train` path: DeepSpeed engine (ZeRO 0), synthetic packed data,
                   the NaN guard's all-reduce, logging (tokens/s taken from its metrics.jsonl).
The plain loops: forward, fp32 cross-entropy over the logits, backward, clip to 1.0, AdamW (same
parameter groups), zero_grad; fp32 on CPU, bf16 autocast on CUDA. Same initial seed; identical
parameter counts are checked. Step times after `--warmup` steps; tokens/s from the median step.
Memory: CUDA allocator peak on GPU; on CPU the peak RSS of the process and its growth over the RSS
measured after imports (both processes import torch and transformers).
On a shared CPU machine wall-clock times swing with the load of other processes: the JSON also has
each variant's CPU time per step (this process, all threads) and the load average, and `--rounds`
interleaves the variants, keeping each one's fastest round.
Compilation: `compile_s` per variant is what its warm-up steps took beyond as many median steps
(first-launch Triton compiles, autotuning, allocator warm-up); the trainer variant runs with
`train.compile=false` (the GPU suite's compile probe measures torch.compile on its own).
The JSON is rewritten (atomically) after every variant, so a run stopped midway keeps the variants
it finished; a variant that fails is recorded in `failures` and the others still run (exit status 1).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PRESETS = {
    # ~10M parameters: a few seconds per step on 2 CPU cores.
    "cpu": dict(d_model=256, n_layers=4, n_heads=4, vocab=8192, seq=256, batch=8, steps=6, warmup=2),
    # ~350M parameters at T=2048 (the MFU target of the trainer issue).
    "gpu-350m": dict(
        d_model=1024, n_layers=24, n_heads=16, vocab=50304, seq=2048, batch=8, steps=20, warmup=5
    ),
}
VARIANTS = ["hf_llama", "lmstack", "lmstack_packed", "lmstack_trainer"]


def _rss_gib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**30


def _model_config(a):
    from lmstack.model import ModelConfig

    return ModelConfig.from_dict(
        dict(
            vocab_size=a.vocab, d_model=a.d_model, n_layers=a.n_layers, n_heads=a.n_heads,
            max_seq_len=a.seq, tie_embeddings=True, mixer=a.mixer,
        )
    )  # fmt: skip


def _llama(cfg):
    from transformers import LlamaConfig, LlamaForCausalLM

    lc = LlamaConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.d_model, intermediate_size=cfg.ffn_hidden,
        num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads, num_key_value_heads=cfg.kv_heads,
        max_position_embeddings=cfg.max_seq_len, rms_norm_eps=cfg.norm_eps, rope_theta=cfg.rope_theta,
        tie_word_embeddings=cfg.tie_embeddings, attention_bias=False, mlp_bias=False, use_cache=False,
    )  # fmt: skip
    lc._attn_implementation = "sdpa"
    return LlamaForCausalLM(lc)


def run_variant(a) -> dict:
    import torch
    import torch.nn.functional as F
    import transformers  # noqa: F401  (same import baseline in every variant)

    from lmstack.model import LM, BatchContext

    torch.manual_seed(0)
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    cfg = _model_config(a)
    base_rss = _rss_gib()
    tokens_per_step = a.batch * a.seq

    if a.variant == "lmstack_trainer":
        return run_trainer(a, cfg, base_rss)

    model = _llama(cfg) if a.variant == "hf_llama" else LM(cfg)
    model.to(device).train()
    n_params = sum(p.numel() for p in model.parameters())
    from lmstack.config.schema import TrainConfig
    from lmstack.train.optim import param_groups

    opt = torch.optim.AdamW(param_groups(model, 0.1), lr=3e-4, betas=(0.9, 0.95), fused=cuda or None)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, cfg.vocab_size, (a.batch, a.seq + 1), generator=g).to(device)
    inputs, labels = ids[:, :-1], ids[:, 1:]
    context = None
    if a.variant == "lmstack_packed":  # ~4 documents per row
        starts = torch.rand(a.batch, a.seq, generator=g) < 4 / a.seq
        starts[:, 0] = False
        context = BatchContext.from_doc_ids(starts.long().cumsum(1), device)
    del TrainConfig

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=cuda):
            if a.variant == "hf_llama":
                logits = model(input_ids=inputs).logits
            else:
                logits = model(inputs, context).logits
        loss = F.cross_entropy(logits.float().flatten(0, 1), labels.flatten())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    times, cpu_times, warmup_times = [], [], []
    for i in range(a.warmup + a.steps):
        if cuda:
            torch.cuda.synchronize()
        t0, c0 = time.perf_counter(), time.process_time()
        loss = step()
        loss.item()
        if cuda:
            torch.cuda.synchronize()
        if i >= a.warmup:
            times.append(time.perf_counter() - t0)
            cpu_times.append(time.process_time() - c0)
        else:
            warmup_times.append(time.perf_counter() - t0)
    med = statistics.median(times)
    out = {
        "variant": a.variant,
        **_compile_estimate(warmup_times, med),
        "params": n_params,
        "tokens_per_s": tokens_per_step / med,
        "tokens_per_s_mean": tokens_per_step * len(times) / sum(times),
        "step_time_s_median": med,
        "step_cpu_s_median": statistics.median(cpu_times),
        "final_loss": float(loss),
    }
    out.update(_memory(device, base_rss))
    out["flops_per_token"] = LM(cfg).flops_per_token(a.seq) if a.variant != "hf_llama" else None
    return out


def _compile_estimate(warmup_times: list[float], median: float) -> dict:
    return {
        "warmup_step_times_s": warmup_times,
        "compile_s": round(sum(warmup_times) - len(warmup_times) * median, 2),
    }


def _memory(device, base_rss: float) -> dict:
    import torch

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    out = {"peak_rss_gib": peak, "peak_rss_over_baseline_gib": peak - base_rss}
    if device.type == "cuda":
        out["peak_cuda_alloc_gib"] = torch.cuda.max_memory_allocated() / 2**30
    return out


def run_trainer(a, cfg, base_rss: float) -> dict:
    import torch

    from lmstack.config import load_config
    from lmstack.train import train
    from lmstack.train.data import synthetic_source
    from lmstack.train.metrics import read_metrics

    run_dir = Path(tempfile.mkdtemp(prefix="bench-train-"))
    overrides = [
        f"data.seq_len={a.seq}", f"train.run_dir={run_dir}", f"train.max_steps={a.warmup + a.steps}",
        f"train.global_batch_size={a.batch}", f"train.micro_batch_size={a.batch}", "train.log_every=1",
        "train.eval_batches=0", f"train.save_every={10**9}", "train.progress_bar=false", "train.tensorboard=false",
        "train.warmup_steps=1", "train.zero_stage=0", "train.compile=false",
    ]  # fmt: skip
    config = load_config(None, overrides)
    config.model = cfg
    summary = train(config, resume=None, source_factory=synthetic_source)
    all_records = read_metrics(run_dir)["train"]
    records = all_records[a.warmup :]
    times = [r["step_time_s"] for r in records]
    med = statistics.median(times)
    warmup_times = [r["step_time_s"] for r in all_records[: a.warmup]]
    cpu_med = statistics.median(r["step_cpu_s"] for r in records)
    tokens_per_step = a.batch * a.seq
    out = {
        "variant": a.variant,
        **_compile_estimate(warmup_times, med),
        "params": read_metrics(run_dir)["run"][0]["params"],
        "tokens_per_s": tokens_per_step / med,
        "tokens_per_s_mean": tokens_per_step * len(times) / sum(times),
        "step_time_s_median": med,
        "step_cpu_s_median": cpu_med,
        "final_loss": summary["loss"],
        "flops_per_token": read_metrics(run_dir)["run"][0]["flops_per_token"],
    }
    out.update(_memory(torch.device("cuda" if torch.cuda.is_available() else "cpu"), base_rss))
    return out


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return f"{line.split(':', 1)[1].strip()} ({os.cpu_count()} cores)"
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _spawn(a, variant: str) -> dict:
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
        result_path = f.name
    cmd = [sys.executable, __file__, "--variant", variant, "--result", result_path]
    cmd += [f"--{k.replace('_', '-')}={getattr(a, k)}" for k in PRESETS["cpu"]] + [f"--mixer={a.mixer}"]
    pythonpath = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    env = dict(os.environ, PYTHONPATH=pythonpath, TOKENIZERS_PARALLELISM="false")
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        print(proc.stderr[-3000:], file=sys.stderr)
        raise SystemExit(f"variant {variant} failed")
    r = json.loads(Path(result_path).read_text())
    os.unlink(result_path)
    r["wall_s"] = time.perf_counter() - t0
    return r


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--preset", choices=sorted(PRESETS), default=None, help="default: cpu, or gpu-350m with CUDA"
    )
    for key in PRESETS["cpu"]:
        p.add_argument(f"--{key.replace('_', '-')}", type=int, default=None)
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument(
        "--mixer", default="attention", help="token mixer of the lmstack variants (hf_llama: attention only)"
    )
    p.add_argument(
        "--rounds", type=int, default=2, help="all variants this many times, interleaved; best kept"
    )
    p.add_argument("--out", default=None, help="JSON path (default benchmarks/results/train_{cpu,gpu}.json)")
    p.add_argument("--variant", help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    a = p.parse_args()

    import torch

    cuda = torch.cuda.is_available()
    preset = PRESETS[a.preset or ("gpu-350m" if cuda else "cpu")]
    for key, value in preset.items():
        if getattr(a, key) is None:
            setattr(a, key, value)

    if not a.variant and a.mixer != "attention" and "hf_llama" in a.variants.split(","):
        p.error(f"--mixer {a.mixer}: hf_llama is softmax attention only; leave it out of --variants")
    if a.variant:  # child process
        Path(a.result).write_text(json.dumps(run_variant(a)))
        return

    out = Path(a.out or REPO / "benchmarks" / "results" / f"train_{'gpu' if cuda else 'cpu'}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    report = {
        "benchmark": "training tokens/s and peak memory, lmstack vs transformers LlamaForCausalLM",
        "device": torch.cuda.get_device_name() if cuda else _cpu_name(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "versions": {"torch": torch.__version__, "transformers": __import__("transformers").__version__},
        "precision": "bf16 autocast" if cuda else "fp32",
        "shape": {k: getattr(a, k) for k in PRESETS["cpu"]},
        "mixer": a.mixer,
        "rounds": a.rounds,
        "results": [],
        "failures": [],
    }
    # Rounds interleave the variants so that a busy machine slows them alike; each keeps its best round.
    best: dict[str, dict] = {}
    for round_ in range(a.rounds):
        for variant in a.variants.split(","):
            try:
                r = _spawn(a, variant)
            except SystemExit as err:  # the child's stderr is already printed
                report["failures"].append(f"round {round_} {variant}: {err}")
                _save(out, report, best, a)
                continue
            r["round"] = round_
            if variant not in best or r["tokens_per_s"] > best[variant]["tokens_per_s"]:
                best[variant] = r
            print(
                f"round {round_} {variant:16s} {r['tokens_per_s']:8.0f} tok/s  median step "
                f"{r['step_time_s_median']:.3f}s (CPU {r['step_cpu_s_median']:.3f}s)  peak RSS {r['peak_rss_gib']:.2f} GiB "
                f"(+{r['peak_rss_over_baseline_gib']:.2f})"
                + (f"  CUDA peak {r['peak_cuda_alloc_gib']:.2f} GiB" if "peak_cuda_alloc_gib" in r else ""),
                flush=True,
            )
            _save(out, report, best, a)
    print(f"wrote {out}")
    if report["failures"]:
        raise SystemExit(f"{len(report['failures'])} variant runs failed: {report['failures']}")


def _save(out: Path, report: dict, best: dict[str, dict], a) -> None:
    """Write what is finished: the best round of each variant so far, and the ratios to hf_llama."""
    results = list(best.values())
    params = {r["params"] for r in results}
    differ = f"models differ in size: {[(r['variant'], r['params']) for r in results]}"
    if len(params) > 1 and differ not in report["failures"]:
        report["failures"].append(differ)
    for r in results:
        r["tokens_per_cpu_s"] = a.batch * a.seq / r["step_cpu_s_median"]
    report.update(results=results, load_average_at_end=os.getloadavg())
    report["compile_s"] = round(sum(max(r["compile_s"], 0.0) for r in results), 1)
    if "hf_llama" in best:
        ref = best["hf_llama"]
        report["vs_hf_llama"] = {
            v: {
                "tokens_per_s_ratio": r["tokens_per_s"] / ref["tokens_per_s"],
                "cpu_time_per_step_ratio": r["step_cpu_s_median"] / ref["step_cpu_s_median"],
                "peak_memory_ratio": (
                    r["peak_cuda_alloc_gib"] / ref["peak_cuda_alloc_gib"]
                    if "peak_cuda_alloc_gib" in r
                    else r["peak_rss_over_baseline_gib"] / ref["peak_rss_over_baseline_gib"]
                ),
            }
            for v, r in best.items()
            if v != "hf_llama"
        }
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(report, indent=2) + "\n")
    tmp.replace(out)


if __name__ == "__main__":
    main()
