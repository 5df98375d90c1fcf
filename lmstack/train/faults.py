"""Fault injection for tests: the trainer's named hook points, and the faults that tests install there
through the environment. Nothing here runs unless `LMSTACK_FAULT` is set.

`LMSTACK_FAULT` is a comma-separated list of `name:value` items, parsed once when training starts:

    nan_at:3+4          the loss of iterations 3 and 4 (1-based, skipped steps included) is NaN on rank 0
                        (the non-finite gradient guard must skip those steps on every rank)
    loss_noise:0.1      each micro-batch's loss is scaled by 1 + 0.1·u, u ~ U(0, 1) drawn from torch's
                        RNG in the step (an exact resume must restore every rank's RNG state)
    kill_at_step:5      SIGKILL right after optimizer step 5 (its checkpoint, if one was due, is saved)
    kill_in_save:6      SIGKILL inside the save of step 6: all files written, nothing renamed into place
    term_at_step:5      SIGTERM to itself right after optimizer step 5 (a stop signal: lmstack.train.stop)
    term_in_save:6      SIGTERM to itself inside the save of step 6 (at the same point as kill_in_save)
    step_delay:0.2      sleep 0.2 s after every optimizer step (slows a run down for signal and scheduler
                        tests; the numbers are unchanged)
    NAME@R:VALUE        a kill or SIGTERM on rank R only, e.g. kill_at_step@1:2

The trainer calls its `hooks` (a `TrainHooks`, doing nothing) at these points; `hooks_from_env()`
returns the `Faults` to install instead when the variable is set (`lmstack.train.train` does so).
"""

from __future__ import annotations

import os
import signal
import time
from dataclasses import dataclass, field

import torch

from lmstack.errors import LMStackError

ENV = "LMSTACK_FAULT"
# The signal each kill point sends to the process itself.
KILL_POINTS = {
    "kill_at_step": signal.SIGKILL,
    "kill_in_save": signal.SIGKILL,
    "term_at_step": signal.SIGTERM,
    "term_in_save": signal.SIGTERM,
}


class TrainHooks:
    """The named points of the training loop; each leaves everything as it is."""

    def micro_batch_loss(self, loss_sum: torch.Tensor, iteration: int) -> torch.Tensor:
        """A micro-batch's loss sum, before its backward (`iteration`: 1-based, skipped steps included)."""
        return loss_sum

    def after_step(self, step: int) -> None:
        """After optimizer step `step` is logged, evaluated and, when due, saved."""

    def before_publish(self, step: int) -> None:
        """Rank 0, inside the save of `step`: every file written, nothing renamed into place yet."""


@dataclass
class Faults(TrainHooks):
    """The faults of one `LMSTACK_FAULT` value, for the process of global rank `rank`."""

    rank: int
    nan_at: set[int] = field(default_factory=set)
    loss_noise: float = 0.0
    step_delay: float = 0.0
    kills: dict[str, int] = field(default_factory=dict)  # kill point -> step, for this rank

    @classmethod
    def parse(cls, spec: str, rank: int) -> Faults:
        faults = cls(rank)
        for item in filter(None, spec.split(",")):
            key, _, value = item.partition(":")
            name, _, only_rank = key.partition("@")
            try:
                if name == "nan_at":
                    faults.nan_at = {int(v) for v in value.split("+") if v}
                elif name == "loss_noise":
                    faults.loss_noise = float(value)
                elif name == "step_delay":
                    faults.step_delay = float(value)
                elif name in KILL_POINTS:
                    if not only_rank or int(only_rank) == rank:
                        faults.kills[name] = int(value)
                else:
                    raise LMStackError(
                        f"{ENV}: unknown fault '{name}' in '{spec}'; known: nan_at, loss_noise, step_delay, "
                        f"{', '.join(KILL_POINTS)}"
                    )
            except ValueError:
                raise LMStackError(
                    f"{ENV}: cannot read '{item}' (expected name:value, see lmstack.train.faults)"
                ) from None
        return faults

    def micro_batch_loss(self, loss_sum: torch.Tensor, iteration: int) -> torch.Tensor:
        if iteration in self.nan_at and self.rank == 0:
            loss_sum = loss_sum * float("nan")
        if self.loss_noise:
            loss_sum = loss_sum * (1.0 + self.loss_noise * torch.rand(()).item())
        return loss_sum

    def after_step(self, step: int) -> None:
        if self.step_delay:
            time.sleep(self.step_delay)
        self._kill_at(("kill_at_step", "term_at_step"), step)

    def before_publish(self, step: int) -> None:
        self._kill_at(("kill_in_save", "term_in_save"), step)

    def _kill_at(self, points: tuple[str, ...], step: int) -> None:
        for point in points:
            if self.kills.get(point) == step:
                os.kill(os.getpid(), KILL_POINTS[point])


def hooks_from_env() -> TrainHooks:
    """`Faults` from `LMSTACK_FAULT` for this process's rank, or the plain `TrainHooks` when unset."""
    spec = os.environ.get(ENV, "")
    return Faults.parse(spec, int(os.environ.get("RANK", "0"))) if spec else TrainHooks()
