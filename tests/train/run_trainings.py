"""Runs several trainings one after the other in one process (group): `run_trainings.py JSON`, JSON a
list of {"overrides": [...], "resume": null|"auto"}. Used by the tests, alone or under torchrun."""

import json
import sys

from aux_probe import register_probe

from lmstack.config import load_config
from lmstack.train import distributed, train

if __name__ == "__main__":
    register_probe()  # the test-only `probe` mixer (aux losses), available to every run
    runs = json.loads(sys.argv[1])
    info = distributed.init_distributed(timeout_s=60)
    try:
        for run in runs:
            summary = train(load_config(None, run["overrides"]), resume=run.get("resume"))
            if info.is_main:
                print("SUMMARY", json.dumps(summary), flush=True)
    finally:
        distributed.destroy()
