"""The model configuration: sizes, the per-layer token-mixer pattern, and each mixer's options.

Layer pattern, in order of precedence:
- `layer_mixers`: an explicit list with one entry per layer: a registry name, or a mapping with the
  key `mixer` and that layer's own options, e.g. `{mixer: swa, window: 512}`;
- otherwise every layer uses `mixer`, except that with `attention_every: k` layers k-1, 2k-1, ...
  (every k-th layer, counted from 1) use softmax `attention` — the usual hybrid recipe.

Options of a layer: the mixer's defaults, overridden by `mixer_options.<name>` (all layers of that
mixer), overridden by the layer's own entry. Each mixer declares them as a dataclass
(`TokenMixer.Options`), so a misspelt option is caught like any other key, naming the layer.
"""

from __future__ import annotations

import dataclasses
import difflib
from dataclasses import dataclass, field
from typing import Any

from lmstack.errors import ConfigError
from lmstack.model.schema import from_dict


@dataclass(frozen=True)
class LayerPaths:
    """Config paths of one layer's settings, for error messages that name the exact entry a value came
    from: `model("d_model")` -> "model.d_model"; `option("window")` -> "model.layer_mixers[2].window"
    when layer 2's own entry sets `window`, else "model.mixer_options.swa.window" (where a value
    shared by every layer of the mixer, or one replacing its default, is set)."""

    prefix: str
    layer: int
    mixer: str
    own: frozenset[str]

    def model(self, field: str) -> str:
        return f"{self.prefix}{field}"

    def option(self, key: str) -> str:
        if key in self.own:
            return f"{self.prefix}layer_mixers[{self.layer}].{key}"
        return f"{self.prefix}mixer_options.{self.mixer}.{key}"


@dataclass
class ModelConfig:
    vocab_size: int = 32000
    d_model: int = 256
    n_layers: int = 4
    n_heads: int = 4
    # Key/value heads for grouped-query attention; None means n_heads (plain multi-head attention).
    n_kv_heads: int | None = None
    # SwiGLU hidden size; None means 8/3 * d_model rounded up to a multiple of mlp_multiple_of.
    mlp_hidden: int | None = None
    mlp_multiple_of: int = 64
    max_seq_len: int = 2048
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    tie_embeddings: bool = True
    init_std: float = 0.02
    mixer: str = "attention"
    layer_mixers: list[str | dict[str, Any]] | None = None
    attention_every: int = 0
    mixer_options: dict[str, dict[str, Any]] = field(default_factory=dict)
    bos_token_id: int | None = None
    eos_token_id: int | None = None
    pad_token_id: int | None = None

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads or self.n_heads

    @property
    def ffn_hidden(self) -> int:
        if self.mlp_hidden is not None:
            return self.mlp_hidden
        m = self.mlp_multiple_of
        return -(-(8 * self.d_model // 3) // m) * m

    def _layer_entry(self, layer_idx: int) -> tuple[str, dict[str, Any]]:
        """(mixer name, the layer's own options) of layer `layer_idx`."""
        if self.layer_mixers is not None:
            entry = self.layer_mixers[layer_idx]
            if isinstance(entry, dict):
                return entry.get("mixer", ""), {k: v for k, v in entry.items() if k != "mixer"}
            return entry, {}
        if self.attention_every and (layer_idx + 1) % self.attention_every == 0:
            return "attention", {}
        return self.mixer, {}

    def mixer_for_layer(self, layer_idx: int) -> str:
        return self._layer_entry(layer_idx)[0]

    def layer_paths(self, layer_idx: int, prefix: str = "model.") -> LayerPaths:
        """Where each setting of layer `layer_idx` is written in the config (see `LayerPaths`)."""
        name, own = self._layer_entry(layer_idx)
        return LayerPaths(prefix, layer_idx, name, frozenset(own))

    def mixer_options_for(self, name: str) -> Any:
        """The typed options dataclass of mixer `name` (its defaults overridden by `mixer_options`)."""
        from lmstack.model.mixers import get_mixer

        return from_dict(get_mixer(name).Options, self.mixer_options.get(name, {}), f"mixer_options.{name}.")

    def layer_options(self, layer_idx: int, prefix: str = "") -> Any:
        """The typed options of layer `layer_idx`: defaults < `mixer_options.<name>` < the layer's entry."""
        from lmstack.model.mixers import get_mixer

        name, own = self._layer_entry(layer_idx)
        options = {**self.mixer_options.get(name, {}), **own}
        return from_dict(get_mixer(name).Options, options, f"{prefix}layer_mixers[{layer_idx}].")

    def validate(self, prefix: str = "") -> None:
        from lmstack.model.mixers import MIXERS

        def fail(name: str, msg: str) -> None:
            raise ConfigError(f"{prefix}{name}: {msg}")

        for name in ("vocab_size", "d_model", "n_layers", "n_heads", "max_seq_len", "mlp_multiple_of"):
            if getattr(self, name) <= 0:
                fail(name, f"expected a positive integer, got {getattr(self, name)}")
        if self.d_model % self.n_heads:
            fail("d_model", f"{self.d_model} is not divisible by n_heads={self.n_heads}")
        if self.n_kv_heads is not None and (self.n_kv_heads <= 0 or self.n_heads % self.n_kv_heads):
            fail("n_kv_heads", f"{self.n_kv_heads} must be positive and divide n_heads={self.n_heads}")
        if self.head_dim % 2:
            fail("d_model", f"head_dim={self.head_dim} must be even for rotary embeddings")
        if self.mlp_hidden is not None and self.mlp_hidden <= 0:
            fail("mlp_hidden", f"expected a positive integer, got {self.mlp_hidden}")
        if self.attention_every < 0:
            fail("attention_every", f"expected 0 (off) or a positive integer, got {self.attention_every}")
        names = [("mixer", self.mixer)]
        if self.layer_mixers is not None:
            if len(self.layer_mixers) != self.n_layers:
                fail(
                    "layer_mixers",
                    f"expected {self.n_layers} entries (n_layers), got {len(self.layer_mixers)}",
                )
            for i, entry in enumerate(self.layer_mixers):
                if isinstance(entry, dict) and not isinstance(entry.get("mixer"), str):
                    fail(f"layer_mixers[{i}].mixer", "expected a mixer name (e.g. {mixer: attention, ...})")
                names.append((f"layer_mixers[{i}]", self.mixer_for_layer(i)))
        for where, name in names:
            if name not in MIXERS:
                close = difflib.get_close_matches(name, list(MIXERS), n=1)
                hint = f"did you mean '{close[0]}'?" if close else f"registered: {', '.join(sorted(MIXERS))}"
                fail(where, f"unknown mixer '{name}'; {hint}")
        for name in self.mixer_options:
            if name not in MIXERS:
                fail(f"mixer_options.{name}", f"unknown mixer; registered: {', '.join(sorted(MIXERS))}")
            from_dict(MIXERS[name].Options, self.mixer_options[name], f"{prefix}mixer_options.{name}.")
        for i in range(self.n_layers):
            name = self.mixer_for_layer(i)
            MIXERS[name].validate_config(self, self.layer_options(i, prefix), self.layer_paths(i, prefix))

    @classmethod
    def from_dict(cls, data: dict[str, Any], prefix: str = "") -> ModelConfig:
        return from_dict(cls, data, prefix)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)
