"""What the loop itself must carry across a resume besides the engine and the reader: its counters
(`TrainState`) and every random number generator a step draws from (`RNGState`)."""

from __future__ import annotations

import random
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch


@dataclass
class TrainState:
    """step: optimizer updates applied (the LR schedule's clock); iteration: steps tried, skipped ones
    included; tokens: tokens of every step tried; nan_skips: skipped steps in a row."""

    step: int = 0
    iteration: int = 0
    tokens: int = 0
    nan_skips: int = 0

    def state_dict(self) -> dict[str, int]:
        return asdict(self)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step, self.tokens, self.nan_skips = state["step"], state["tokens"], state["nan_skips"]
        self.iteration = state.get("iteration", self.step)  # checkpoints before skips were counted


def seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


class RNGState:
    """This process's Python, NumPy, torch (and CUDA) generators."""

    @staticmethod
    def state_dict() -> dict[str, Any]:
        state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
        if torch.cuda.is_available():
            state["cuda"] = torch.cuda.get_rng_state()
        return state

    @staticmethod
    def load_state_dict(state: dict[str, Any]) -> None:
        random.setstate(state["python"])
        np.random.set_state(state["numpy"])
        torch.set_rng_state(state["torch"])
        if "cuda" in state and torch.cuda.is_available():
            torch.cuda.set_rng_state(state["cuda"])
