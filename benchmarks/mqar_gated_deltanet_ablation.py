"""Gated DeltaNet at d_model 16 on the `cpu` MQAR preset, one change at a time (README, MQAR).

Single runs at lr 1e-2 (the rate the sweep chooses for every mixer) through the sweep's own
`train_one`: the layer as configured, without the output gate, with values as wide as the keys, and
with the decay started almost off (A = 0.01 instead of the paper's A ~ U(0, 16)). Prints one JSON
line per run. Usage: python benchmarks/mqar_gated_deltanet_ablation.py [--seeds 0 1]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math

import torch

import lmstack.model.mixers.gated_deltanet as gdn
from lmstack.eval.mqar.probe import train_one
from lmstack.eval.mqar.sweep import make_splits, sweep_config

paper_init = gdn.GatedDeltaNet._init_decay


def weak_decay_init(self) -> None:
    paper_init(self)
    with torch.no_grad():
        self.A_log.fill_(math.log(1e-2))  # g = −0.01·softplus(·): barely any decay at the start


VARIANTS = {
    "paper init": ({}, paper_init),
    "no output gate": ({"use_gate": False}, paper_init),
    "expand_v 1": ({"expand_v": 1.0}, paper_init),
    "decay started almost off (A = 0.01)": ({}, weak_decay_init),
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS))
    args = p.parse_args()
    cfg = sweep_config("cpu")
    data = make_splits(cfg.data)
    for name in args.variants:
        options, init = VARIANTS[name]
        gdn.GatedDeltaNet._init_decay = init
        for seed in args.seeds:
            settings = dataclasses.replace(cfg.train, seed=seed)
            r = train_one("gated_deltanet", 16, 1e-2, cfg.data, data, settings, 1, {"gated_deltanet": options}, log=lambda *a: None)  # fmt: skip
            keep = ("seed", "accuracy", "val_accuracy", "steps", "state_size")
            print(json.dumps({"variant": name, **{k: r[k] for k in keep}}), flush=True)


if __name__ == "__main__":
    main()
