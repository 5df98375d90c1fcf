"""MQAR: Zoology's multi-query associative recall (Arora et al., 2023), a synthetic probe of how
much a token mixer can recall from its context (`lmstack eval mqar`).

The model is Zoology's 2-layer probe: a short causal convolution (`shortconv`), then the mixer
under test, each followed by the MLP of `lmstack.model.LM`. The sweep trains one model per mixer x
d_model x learning rate, as Zoology does, with three splits: training, validation (early stopping,
the choice of learning rate) and test (read once per run, with the best-validation weights, for the
reported accuracy); further seeds rerun the chosen rate.

    task.py     the sequences: `multiquery_ar`, `MQARConfig`, `make_splits`
    probe.py    one model on one setting: `probe_model_config`, `train_one`, `accuracy`, `state_size`
    sweep.py    the grid: presets, `sweep_config`, `run_sweep` (worker processes), resume (`load_finished`)
    report.py   `markdown_table`, `plot`, `write_outputs`
"""

from lmstack.eval.mqar.probe import TrainSettings, accuracy, probe_model_config, state_size, train_one
from lmstack.eval.mqar.report import markdown_table, plot, write_outputs
from lmstack.eval.mqar.sweep import (
    PRESETS,
    SweepConfig,
    best_per_group,
    default_mixers,
    load_finished,
    run_sweep,
    sweep_config,
    sweep_key,
)
from lmstack.eval.mqar.task import MQARConfig, make_splits, multiquery_ar

__all__ = [
    "PRESETS",
    "MQARConfig",
    "SweepConfig",
    "TrainSettings",
    "accuracy",
    "best_per_group",
    "default_mixers",
    "load_finished",
    "make_splits",
    "markdown_table",
    "multiquery_ar",
    "plot",
    "probe_model_config",
    "run_sweep",
    "state_size",
    "sweep_config",
    "sweep_key",
    "train_one",
    "write_outputs",
]
