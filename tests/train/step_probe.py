"""Probes the non-finite gradient guard from inside a trainer: `step_probe.py JSON`, JSON a list of
override lists. For each: two steps, a third whose loss is NaN on rank 0, then a fourth; prints one
JSON line per run with what the skipped step changed in the optimizer's own state (fp32 master
weights, Adam moments and step counts, read from `engine.optimizer.state_dict()`) and the module."""

import json
import math
import sys

import torch

from lmstack.config import load_config
from lmstack.train import Trainer, distributed
from lmstack.train.faults import Faults, TrainHooks


def flat(obj, prefix=""):
    """{path: value} of every tensor and number inside nested dicts/lists."""
    if isinstance(obj, dict):  # the LR is set by the trainer before each step (checked on its own)
        items = [(key, value) for key, value in obj.items() if key != "lr"]
        return {k: v for key, value in items for k, v in flat(value, f"{prefix}/{key}").items()}
    if isinstance(obj, (list, tuple)):
        return {k: v for i, value in enumerate(obj) for k, v in flat(value, f"{prefix}/{i}").items()}
    if isinstance(obj, torch.Tensor):
        return {prefix: obj.detach().clone().float()}
    if isinstance(obj, (int, float)) and not isinstance(obj, bool):
        return {prefix: obj}
    return {}


def snapshot(trainer):
    state = flat(trainer.engine.ds.optimizer.state_dict(), "optimizer")
    if trainer.zero_stage < 3:  # ZeRO 3 leaves only placeholders in the module (weights: optimizer)
        state.update(flat(trainer.engine.module.state_dict(), "module"))
    return state


def changed(a, b):
    """Paths whose values differ (NaN never equals anything)."""
    out = []
    for key in a:
        x, y = a[key], b.get(key)
        same = torch.equal(x, y) if isinstance(x, torch.Tensor) else x == y
        if not same:
            out.append(key)
    return out


if __name__ == "__main__":
    info = distributed.init_distributed(timeout_s=60)
    try:
        for overrides in json.loads(sys.argv[1]):
            trainer = Trainer(load_config(None, overrides), hooks=TrainHooks())
            for _ in range(2):
                assert not trainer.train_step()["skipped"]
            before = snapshot(trainer)
            trainer.hooks = Faults.parse("nan_at:3", info.rank)
            skipped = trainer.train_step()
            after = snapshot(trainer)
            applied = trainer.train_step()
            final = snapshot(trainer)
            result = {
                "skipped": skipped["skipped"],
                "grad_norm_finite": skipped["grad_norm"] is not None and math.isfinite(skipped["grad_norm"]),
                "step_after_skip": trainer.state.step - 1,
                "lr_after_skip": applied["lr"],
                "lr_before_skip": skipped["lr"],
                "changed_by_skip": changed(before, after),
                "changed_by_next": len(changed(after, final)),
                "master_keys": len(before),
                "final_finite": all(
                    bool(torch.isfinite(v).all()) if isinstance(v, torch.Tensor) else math.isfinite(v)
                    for v in final.values()
                ),
                "next_skipped": applied["skipped"],
            }
            if info.is_main:
                print("PROBE", json.dumps(result), flush=True)
            distributed.barrier()
    finally:
        distributed.destroy()
