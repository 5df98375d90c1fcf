"""The DeltaNet paper's hybrids in configs/pile/: the layer patterns, and the files validate (with a
stand-in for `deltanet` while that mixer is not registered)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from lmstack.config import load_config
from lmstack.model import MIXERS

CONFIGS = Path(__file__).parents[2] / "configs" / "pile"


@pytest.mark.parametrize(("size", "n_layers"), [("125m", 12), ("350m", 24)])
@pytest.mark.parametrize("kind", ["swa", "global"])
def test_deltanet_hybrid_configs(size: str, n_layers: int, kind: str) -> None:
    path = CONFIGS / f"{size}-deltanet-{kind}.yaml"
    layers = yaml.safe_load(path.read_text())["model"]["layer_mixers"]
    if kind == "swa":  # sliding-window attention in every other layer
        expected = ["deltanet", "swa"] * (n_layers // 2)
    else:  # global attention in the second layer and the (N/2 + 1)-th
        expected = ["attention" if i in (1, n_layers // 2) else "deltanet" for i in range(n_layers)]
    assert layers == expected
    stand_in = [] if "deltanet" in MIXERS else [
        f"model.layer_mixers={json.dumps([n if n != 'deltanet' else 'shortconv' for n in layers])}"
    ]  # fmt: skip
    cfg = load_config(path, stand_in)
    assert cfg.model.n_layers == n_layers
    assert cfg.train.run_dir == f"runs/pile-{size}-deltanet-{kind}"
