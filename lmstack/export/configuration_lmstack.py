"""`LMStackConfig`: lmstack's `ModelConfig` as a Hugging Face `PretrainedConfig` (model_type "lmstack").

Every `ModelConfig` field is stored under its own name in `config.json`; the usual Hugging Face names
(`hidden_size`, `num_hidden_layers`, `num_attention_heads`, `max_position_embeddings`) are aliases, and
`tie_word_embeddings` follows `tie_embeddings`. This file is copied into every export, so it imports
only torch-free model code (bundled next to it).
"""

from __future__ import annotations

import copy
import dataclasses
from typing import Any

from transformers import PretrainedConfig

from lmstack.model.config import ModelConfig

MODEL_FIELDS = tuple(f.name for f in dataclasses.fields(ModelConfig))


class LMStackConfig(PretrainedConfig):
    model_type = "lmstack"
    attribute_map = {
        "hidden_size": "d_model",
        "num_hidden_layers": "n_layers",
        "num_attention_heads": "n_heads",
        "max_position_embeddings": "max_seq_len",
    }

    def __init__(self, **kwargs: Any) -> None:
        defaults = ModelConfig()
        for name in MODEL_FIELDS:
            setattr(
                self, name, kwargs.pop(name) if name in kwargs else copy.deepcopy(getattr(defaults, name))
            )
        kwargs.pop("tie_word_embeddings", None)  # always follows tie_embeddings
        self.use_cache = kwargs.pop("use_cache", True)
        super().__init__(tie_word_embeddings=self.tie_embeddings, **kwargs)

    def to_model_config(self) -> ModelConfig:
        """The validated lmstack `ModelConfig` (raises `ConfigError` naming the bad field)."""
        return ModelConfig.from_dict({name: copy.deepcopy(getattr(self, name)) for name in MODEL_FIELDS})

    @classmethod
    def from_model_config(cls, config: ModelConfig, **kwargs: Any) -> LMStackConfig:
        return cls(**config.to_dict(), **kwargs)
