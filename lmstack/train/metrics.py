"""Training metrics: MFU, memory, and the run directory's logs (JSONL + TensorBoard).

MFU = achieved model FLOP/s / (peak FLOP/s per device x number of devices), where model FLOPs per
token come from `LM.flops_per_token(seq_len)`: the sum of each mixer's own count (softmax attention
counts its T^2 term, linear mixers their state updates) plus the MLPs and the LM head, times 3 for
forward + backward. Activation recomputation is not counted (this is MFU, not HFU).

Peak FLOP/s by device: dense (no sparsity) tensor-core peaks from NVIDIA's data sheets, bf16 for
`precision: bf16` and fp32 (non-tensor-core) otherwise; matched on the CUDA device name. Unknown
devices and CPUs have no entry: MFU is then not reported unless `train.peak_flops` is set.
"""

from __future__ import annotations

import json
import math
import resource
import sys
from pathlib import Path
from typing import Any

import torch

# name substring -> (bf16 dense FLOP/s, fp32 FLOP/s); first match wins, so specific names come first.
PEAK_FLOPS: list[tuple[str, tuple[float, float]]] = [
    ("H100 PCIe", (756e12, 51e12)),
    ("H100", (989e12, 67e12)),  # SXM5 (also H100 80GB HBM3)
    ("H200", (989e12, 67e12)),
    ("H800", (989e12, 67e12)),
    ("A100", (312e12, 19.5e12)),
    ("A800", (312e12, 19.5e12)),
    ("L40S", (362e12, 91.6e12)),
    ("L4", (121e12, 30.3e12)),
]


def peak_flops(device: torch.device, bf16: bool, override: float | None) -> float | None:
    """Peak FLOP/s of one device, or None when unknown (CPU, unlisted GPU) and not overridden."""
    if override is not None:
        return override
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, (bf16_peak, fp32_peak) in PEAK_FLOPS:
        if key in name:
            return bf16_peak if bf16 else fp32_peak
    return None


def memory_stats(device: torch.device) -> dict[str, float]:
    """Peak memory of this process in GiB: CUDA allocator peak on GPU, peak RSS on CPU."""
    out = {"mem_peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 2**30}
    if sys.platform == "darwin":  # ru_maxrss is in bytes there
        out["mem_peak_rss_gib"] /= 1024
    if device.type == "cuda":
        out["mem_peak_alloc_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
        out["mem_peak_reserved_gib"] = torch.cuda.max_memory_reserved(device) / 2**30
    return out


class RunLogger:
    """Appends metric records to `RUN_DIR/metrics.jsonl` and TensorBoard (`RUN_DIR/tensorboard`).

    Only the main rank writes. A resumed run appends; records of steps repeated after a crash appear
    twice, and readers keep the last one (`read_metrics`)."""

    def __init__(self, run_dir: Path, enabled: bool, tensorboard: bool) -> None:
        self.enabled = enabled
        self.file = open(run_dir / "metrics.jsonl", "a") if enabled else None  # noqa: SIM115
        self.tb = None
        if enabled and tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(run_dir / "tensorboard"))

    def log(self, kind: str, step: int, values: dict[str, Any]) -> None:
        if not self.enabled:
            return
        record = {"kind": kind, "step": step, **values}
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        if self.tb is not None:
            for key, value in values.items():
                if isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value):
                    self.tb.add_scalar(f"{kind}/{key}", value, step)

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
        if self.tb is not None:
            self.tb.close()

    def __enter__(self) -> RunLogger:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class MetricsWindow:
    """Wall time, CPU time and tokens of the steps since the last `train` record (skipped steps
    included): the throughput and per-step times that record reports."""

    def __init__(self) -> None:
        self._start_over()

    def _start_over(self) -> None:
        self.time, self.cpu_time, self.tokens, self.steps = 0.0, 0.0, 0, 0

    def add(self, step: dict[str, Any], tokens: int) -> None:
        """One step's metrics (its `time` and `cpu_time`) and the tokens it read."""
        self.time += step["time"]
        self.cpu_time += step["cpu_time"]
        self.tokens += tokens
        self.steps += 1

    def take(self, flops_per_token: float, peak: float | None, world: int) -> dict[str, float | None]:
        """tokens/s (all ranks), seconds and CPU seconds per step, MFU (None without a peak); then
        the window starts over."""
        tok_s = self.tokens / max(self.time, 1e-9)
        out = {
            "tokens_per_s": tok_s,
            "step_time_s": self.time / max(self.steps, 1),
            # this process's CPU time (all threads) per step: robust to a busy machine
            "step_cpu_s": self.cpu_time / max(self.steps, 1),
            "mfu": (flops_per_token * tok_s / (peak * world)) if peak else None,
        }
        self._start_over()
        return out


def read_metrics(run_dir: str | Path) -> dict[str, list[dict[str, Any]]]:
    """Records of `RUN_DIR/metrics.jsonl` by kind, sorted by step, the last record of each step kept."""
    path = Path(run_dir) / "metrics.jsonl"
    by_kind: dict[str, dict[int, dict[str, Any]]] = {}
    with open(path) as f:
        for line in f:
            line = line.strip()
            if not line:
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:  # a line cut by a crash
                continue
            by_kind.setdefault(record.get("kind", "train"), {})[record["step"]] = record
    return {kind: [recs[s] for s in sorted(recs)] for kind, recs in by_kind.items()}
