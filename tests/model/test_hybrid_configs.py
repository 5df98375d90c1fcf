"""The DeltaNet and Gated DeltaNet papers' models and hybrids in configs/pile/: the layer patterns, and
the files validate (with a stand-in for `deltanet` while that mixer is not registered)."""

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


GATED_DELTANET_PATTERNS = {
    "": ["gated_deltanet"] * 24,
    "-h1": ["gated_deltanet", "swa"] * 12,  # Gated DeltaNet-H1
    "-h2": ["swa", "gated_deltanet", "swa"] * 8,  # Gated DeltaNet-H2 (SWA in the paper's Mamba2 slot)
}


@pytest.mark.parametrize(("size", "d_model", "gdn_heads"), [("350m", 1024, 6), ("1.3b", 2048, 12)])
@pytest.mark.parametrize("kind", sorted(GATED_DELTANET_PATTERNS))
def test_gated_deltanet_configs_validate(size: str, d_model: int, gdn_heads: int, kind: str) -> None:
    """The Gated DeltaNet paper's models and hybrids load and validate, with the paper's layer widths
    (keys 0.75 d, values twice that) and schedule (lr 4e-4, 512 x 4096 tokens per step)."""
    path = CONFIGS / f"{size}-gated-deltanet{kind}.yaml"
    assert "arXiv 2412.06464" in path.read_text()
    cfg = load_config(path)
    model = cfg.model
    assert [model.mixer_for_layer(i) for i in range(model.n_layers)] == GATED_DELTANET_PATTERNS[kind]
    layer = next(i for i in range(model.n_layers) if model.mixer_for_layer(i) == "gated_deltanet")
    options = model.layer_options(layer)
    assert options.num_heads == gdn_heads and options.num_heads * options.head_dim == 0.75 * d_model
    assert options.expand_v == 2.0 and options.use_gate
    assert cfg.train.lr == 4e-4 and cfg.train.global_batch_size * cfg.data.seq_len == 512 * 4096
    assert cfg.train.run_dir == f"runs/pile-{size}-gated-deltanet{kind}"
