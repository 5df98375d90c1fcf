"""The Hugging Face face of lmstack: config and model classes, and their registration with the Auto factories.

`import lmstack` calls `register_auto_classes()`, so an exported folder loads with plain
`AutoModelForCausalLM.from_pretrained(path)` (no `trust_remote_code`) wherever lmstack is installed;
elsewhere the code bundled in the folder is used (`trust_remote_code=True`).
"""

from __future__ import annotations

from lmstack.export.configuration_lmstack import LMStackConfig
from lmstack.export.modeling_lmstack import LMStackCache, LMStackForCausalLM

__all__ = ["LMStackCache", "LMStackConfig", "LMStackForCausalLM", "register_auto_classes"]


def register_auto_classes() -> None:
    """Register `LMStackConfig` / `LMStackForCausalLM` with AutoConfig / AutoModelForCausalLM.

    Idempotent and cheap, so loaders call it right before `from_pretrained` rather than trusting
    that an earlier registration still holds in the transformers modules imported now."""
    from transformers import AutoConfig, AutoModelForCausalLM

    AutoConfig.register(LMStackConfig.model_type, LMStackConfig, exist_ok=True)
    AutoModelForCausalLM.register(LMStackConfig, LMStackForCausalLM, exist_ok=True)
