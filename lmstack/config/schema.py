"""Schemas of the run sections other than `model` (which lives with the model so it can travel)."""

from __future__ import annotations

from dataclasses import dataclass, field

from lmstack.model.config import ModelConfig


@dataclass
class DataConfig:
    """Where training tokens come from (filled in by the data pipeline)."""

    # Folder of prepared, memory-mapped token shards (`lmstack prepare-data` writes it).
    path: str = "data/default"
    seq_len: int = 256


@dataclass
class TrainConfig:
    """Optimisation and run settings (filled in by the trainer)."""

    run_dir: str = "runs/default"
    seed: int = 0


@dataclass
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
