"""The registry of token mixers: configs name mixers by these keys (stable across releases).

Adding a mixer: one new module that defines a `TokenMixer` subclass decorated with `@register`,
plus its import line below.
"""

from __future__ import annotations

from collections.abc import Callable

from lmstack.errors import ConfigError
from lmstack.model.mixers.base import BatchContext, MixerOutput, NoOptions, TokenMixer

MIXERS: dict[str, type[TokenMixer]] = {}


def register(name: str) -> Callable[[type[TokenMixer]], type[TokenMixer]]:
    def add(cls: type[TokenMixer]) -> type[TokenMixer]:
        if name in MIXERS:
            raise ValueError(f"mixer '{name}' is registered twice")
        cls.name = name
        MIXERS[name] = cls
        return cls

    return add


def get_mixer(name: str) -> type[TokenMixer]:
    if name not in MIXERS:
        raise ConfigError(f"unknown mixer '{name}'; registered: {', '.join(sorted(MIXERS))}")
    return MIXERS[name]


# One line per mixer.
from lmstack.model.mixers import attention
from lmstack.model.mixers import lightning
from lmstack.model.mixers import moh
from lmstack.model.mixers import shortconv
from lmstack.model.mixers import swa

__all__ = ["MIXERS", "BatchContext", "MixerOutput", "NoOptions", "TokenMixer", "get_mixer", "register"]
