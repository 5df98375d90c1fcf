"""The registry of token mixers: configs name mixers by these keys (stable across releases).

Adding a mixer: one new module that defines a `TokenMixer` subclass decorated with `@register`,
plus its import line below.
"""

from __future__ import annotations

from lmstack.model.mixers.base import BatchContext, MixerOutput, NoOptions, TokenMixer
from lmstack.model.schema import Registry

MIXERS: Registry[type[TokenMixer]] = Registry("mixer")
register = MIXERS.register
get_mixer = MIXERS.lookup


# One line per mixer.
from lmstack.model.mixers import attention
from lmstack.model.mixers import deltanet
from lmstack.model.mixers import gated_deltanet
from lmstack.model.mixers import gla
from lmstack.model.mixers import lightning
from lmstack.model.mixers import moh
from lmstack.model.mixers import shortconv
from lmstack.model.mixers import swa

__all__ = ["MIXERS", "BatchContext", "MixerOutput", "NoOptions", "TokenMixer", "get_mixer", "register"]
