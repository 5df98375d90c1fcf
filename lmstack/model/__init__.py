"""The model: configuration, the LM, and the token-mixer registry. Imports nothing from training,
data or evaluation, so that it can travel with exported checkpoints."""

from lmstack.model.config import ModelConfig
from lmstack.model.lm import LM, LMCache, LMOutput
from lmstack.model.mixers import MIXERS, BatchContext, MixerOutput, TokenMixer, get_mixer, register

__all__ = [
    "LM",
    "MIXERS",
    "BatchContext",
    "LMCache",
    "LMOutput",
    "MixerOutput",
    "ModelConfig",
    "TokenMixer",
    "get_mixer",
    "register",
]
