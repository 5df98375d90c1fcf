"""Runs several trainings one after the other in one process (group): `run_trainings.py JSON`, JSON a
list of {"overrides": [...], "resume": null|"auto", "source": null|"masked_labels"|"term_at_start"}. Used by the
tests, alone or under torchrun."""

import json
import os
import signal
import sys

from aux_probe import register_probe

from lmstack.config import load_config
from lmstack.data.reader import IGNORE_INDEX
from lmstack.train import distributed, train
from lmstack.train.data import prepared_source


class MaskedLabels:
    """A reader whose odd-numbered samples keep only their last label: micro-batches of one step
    carry unequal numbers of labelled tokens, the same for a sample however the step is split."""

    def __init__(self, reader) -> None:
        self.reader = reader

    def __next__(self):
        batch = next(self.reader)
        for row, sample in enumerate(batch.sample_ids.tolist()):
            if sample % 2:
                batch.labels[row, :-1] = IGNORE_INDEX
        return batch

    def state_dict(self):
        return self.reader.state_dict()

    def load_state_dict(self, state) -> None:
        self.reader.load_state_dict(state)


def masked_labels_source(config, rank, world, micro_batch):
    source = prepared_source(config, rank, world, micro_batch)
    source.train = MaskedLabels(source.train)
    return source


def term_at_start_source(config, rank, world, micro_batch):
    """The prepared source, after a SIGTERM to this process: a stop signal before the first step."""
    os.kill(os.getpid(), signal.SIGTERM)
    return prepared_source(config, rank, world, micro_batch)


SOURCES = {
    None: prepared_source,
    "masked_labels": masked_labels_source,
    "term_at_start": term_at_start_source,
}

if __name__ == "__main__":
    register_probe()  # the test-only `probe` mixer (aux losses), available to every run
    runs = json.loads(sys.argv[1])
    info = distributed.init_distributed(timeout_s=60)
    try:
        for run in runs:
            config = load_config(None, run["overrides"])
            summary = train(config, resume=run.get("resume"), source_factory=SOURCES[run.get("source")])
            if info.is_main:
                print("SUMMARY", json.dumps(summary), flush=True)
    finally:
        distributed.destroy()
