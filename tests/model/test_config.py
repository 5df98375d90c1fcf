"""Config loading: YAML files, overrides, and one clear message per mistake naming file and field."""

import subprocess
import sys
from pathlib import Path

import pytest

from lmstack.config import load_config
from lmstack.errors import ConfigError
from lmstack.model import ModelConfig


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "run.yaml"
    path.write_text(text)
    return path


def test_yaml_and_overrides(tmp_path: Path) -> None:
    path = write(tmp_path, "model:\n  d_model: 64\n  n_heads: 4\n  n_kv_heads: 2\n")
    cfg = load_config(path, ["model.n_layers=3", "model.layer_mixers=[attention, attention, attention]"])
    assert (cfg.model.d_model, cfg.model.n_layers, cfg.model.kv_heads, cfg.model.head_dim) == (64, 3, 2, 16)
    assert cfg.model.layer_mixers == ["attention"] * 3


@pytest.mark.parametrize(
    ("text", "overrides", "expected"),
    [
        ("model:\n  n_layrs: 2\n", [], "model.n_layrs: unknown key; did you mean 'model.n_layers'?"),
        ("model:\n  d_model: sixty\n", [], "model.d_model: expected an integer, got str 'sixty'"),
        ("model:\n  d_model: 100\n  n_heads: 3\n", [], "model.d_model: 100 is not divisible by n_heads=3"),
        (
            "model:\n  n_heads: 4\n  n_kv_heads: 3\n",
            [],
            "model.n_kv_heads: 3 must be positive and divide n_heads=4",
        ),
        (
            "model:\n  mixer: atention\n",
            [],
            "model.mixer: unknown mixer 'atention'; did you mean 'attention'?",
        ),
        (
            "model:\n  n_layers: 2\n  layer_mixers: [attention]\n",
            [],
            "model.layer_mixers: expected 2 entries",
        ),
        ("modle:\n  d_model: 64\n", [], "modle: unknown key; did you mean 'model'?"),
        ("model:\n  tie_embeddings: 3\n", [], "model.tie_embeddings: expected true or false"),
        ("model: {}\n", ["model.rope_theta=abc"], "model.rope_theta: expected a number, got str 'abc'"),
        ("train:\n  eps: 0\n", [], "train.eps: expected a positive number, got 0"),
        (
            "model:\n  d_model: 64\n  n_heads: 8\n  mixer: lightning\n",
            [],
            "model.d_model: head_dim = d_model / n_heads = 8 is not supported by mixer lightning; expected 16..256",
        ),
        ("train:\n  grad_clip: -1\n", [], "train.grad_clip: expected a number >= 0, got -1"),
        ("train:\n  weight_decay: -0.5\n", [], "train.weight_decay: expected a number >= 0, got -0.5"),
        (
            "model: {}\n",
            ["model.mixer_options.attention.bogus=1"],
            "model.mixer_options.attention.bogus: unknown key",
        ),
    ],
)
def test_bad_config_names_file_and_field(
    tmp_path: Path, text: str, overrides: list[str], expected: str
) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as err:
        load_config(path, overrides)
    assert str(err.value).startswith(f"{path}: ")
    assert expected in str(err.value)


def test_missing_file_and_bad_yaml(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="nope.yaml: config file not found"):
        load_config(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="run.yaml: not valid YAML"):
        load_config(write(tmp_path, "model: [unclosed\n"))


def test_layer_pattern() -> None:
    cfg = ModelConfig(n_layers=6, mixer="lightning", attention_every=3)
    assert [cfg.mixer_for_layer(i) for i in range(6)] == ["lightning", "lightning", "attention"] * 2
    cfg = ModelConfig(n_layers=3, mixer="lightning")
    assert [cfg.mixer_for_layer(i) for i in range(3)] == ["lightning"] * 3
    # An explicit list wins over `mixer` and `attention_every`.
    cfg = ModelConfig(
        n_layers=3, mixer="attention", attention_every=1, layer_mixers=["lightning", "attention", "shortconv"]
    )
    assert [cfg.mixer_for_layer(i) for i in range(3)] == ["lightning", "attention", "shortconv"]


def test_cli_prints_one_line_error(tmp_path: Path) -> None:
    path = write(tmp_path, "model:\n  n_heads: 0\n")
    proc = subprocess.run(
        [sys.executable, "-m", "lmstack.cli", "show-config", str(path)], capture_output=True, text=True
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        f"lmstack show-config: error: {path}: model.n_heads: expected a positive integer, got 0"
    ]
