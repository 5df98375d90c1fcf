"""The DeepSpeed engine around the model, and the three things the loop asks of it: the model's
output for a micro-batch, its backward, and one optimizer step that is skipped, on every rank, when
the global gradient norm is not finite.

ZeRO stage `train.zero_stage` (0: plain data parallelism; 1: optimizer states sharded; 2: + gradients;
3: + weights); bf16 runs keep fp32 master weights and fp32 gradient accumulation, which DeepSpeed has
only in its ZeRO optimizers, so they use at least stage 1. The optimizer is a torch AdamW
(lmstack.train.optim), handed to DeepSpeed: its fused CPU Adam would JIT-compile a C++ extension.

Skipped steps: DeepSpeed's ZeRO and bf16 optimizers skip a step whose gradients hold inf/NaN on any
rank themselves. Without ZeRO the engine computes the norm of the (all-reduced, so equal on every
rank) gradients and sets the `GuardedAdamW`'s `overflow` for that step, which DeepSpeed reads back.
Either way nothing is updated: weights, optimizer moments and step counts stay as they were.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from lmstack.config.schema import RunConfig
from lmstack.model import LM, BatchContext, LMOutput
from lmstack.train.layout import RunLayout
from lmstack.train.optim import GuardedAdamW, build_optimizer


def zero_stage_for(stage: int, bf16: bool) -> int:
    """DeepSpeed keeps fp32 master weights and fp32 gradient accumulation for bf16 only in its ZeRO
    optimizers, so bf16 runs asked for stage 0 use stage 1 (the same math; optimizer states sharded)."""
    return max(stage, 1) if bf16 else stage


def deepspeed_config(
    cfg: RunConfig, micro_batch: int, grad_accum: int, world: int, bf16: bool, load_universal: bool = False
) -> dict:
    """DeepSpeed's config; `load_universal`: the resume reads a universal checkpoint (another world size)."""
    t = cfg.train
    stage = zero_stage_for(t.zero_stage, bf16)
    zero: dict[str, Any] = {"stage": stage}
    if stage >= 2:
        zero.update(overlap_comm=torch.cuda.is_available(), contiguous_gradients=True)
    if stage == 3:
        zero.update(stage3_gather_16bit_weights_on_model_save=False)
    ds: dict[str, Any] = {
        "train_batch_size": micro_batch * grad_accum * world,
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": grad_accum,
        "gradient_clipping": t.grad_clip,
        "zero_optimization": zero,
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 2**62,
        "wall_clock_breakdown": False,
    }
    if bf16:
        # bf16 weights/activations; fp32 master weights (optimizer) and fp32 gradient accumulation.
        ds["bf16"] = {"enabled": True, "check_grad_overflow": True}
        ds["data_types"] = {"grad_accum_dtype": "fp32"}
    if load_universal:
        ds["checkpoint"] = {"load_universal": True}
    return ds


class Engine:
    """`model` (on its device) inside a DeepSpeed engine; `ds` is DeepSpeed's engine itself (what
    checkpoints save and load)."""

    def __init__(
        self, model: LM, config: RunConfig, layout: RunLayout, bf16: bool, load_universal: bool = False
    ) -> None:
        import deepspeed

        self.zero_stage = zero_stage_for(config.train.zero_stage, bf16)
        optimizer = build_optimizer(model, config.train, guarded=self.zero_stage == 0)
        ds_config = deepspeed_config(
            config, layout.micro_batch, layout.grad_accum, layout.world, bf16, load_universal
        )
        self.ds, _, _, _ = deepspeed.initialize(
            model=model, optimizer=optimizer, config=ds_config, dist_init_required=False
        )
        self.guard = self.ds.optimizer if isinstance(self.ds.optimizer, GuardedAdamW) else None

    @property
    def module(self) -> LM:
        return self.ds.module

    def set_lr(self, lr: float) -> None:
        for group in self.ds.optimizer.param_groups:
            group["lr"] = lr

    def __call__(
        self, input_ids: torch.Tensor, context: BatchContext, return_hidden: bool = False
    ) -> LMOutput:
        return self.ds(input_ids, context, return_hidden=return_hidden)

    def backward(self, loss: torch.Tensor, last_micro_batch: bool) -> None:
        """Accumulate the gradients of one micro-batch (DeepSpeed counts micro-steps: the ones before
        the last advance its counter, they update nothing)."""
        self.ds.backward(loss)
        if not last_micro_batch:
            self.ds.step()

    def step(self) -> tuple[bool, float | None]:
        """The optimizer step after the last micro-batch: (applied, global gradient norm before
        clipping, NaN where a step was skipped and DeepSpeed has no norm of it)."""
        if self.guard is not None:
            grad_norm = self._own_grad_norm()
            self.guard.overflow = not math.isfinite(grad_norm)
            self.ds.step()
            return self.ds.was_step_applied(), grad_norm
        self.ds.step()
        applied = self.ds.was_step_applied()
        grad_norm = self.ds.get_global_grad_norm()
        if isinstance(grad_norm, torch.Tensor):
            grad_norm = grad_norm.item()
        if not applied and grad_norm is not None and math.isfinite(grad_norm):
            grad_norm = float("nan")  # DeepSpeed reports the previous norm for a skipped step
        return applied, grad_norm

    def _own_grad_norm(self) -> float:
        """Norm of the (all-reduced) gradients without ZeRO, where DeepSpeed reports none."""
        norms = [p.grad.detach().float().norm() for p in self.module.parameters() if p.grad is not None]
        return torch.stack(norms).norm().item() if norms else 0.0

    def train(self) -> None:
        self.ds.train()

    def eval(self) -> None:
        self.ds.eval()
