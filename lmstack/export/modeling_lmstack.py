"""`LMStackForCausalLM`: lmstack's `LM` behind the Hugging Face `PreTrainedModel` + `GenerationMixin` API.

Decoding state: every mixer keeps its own state (a KV cache, a recurrent state, ...) that `LM.forward`
returns inside an `LMCache`. `LMStackCache` is a `transformers.Cache` that carries that `LMCache`
through `generate()` unchanged: the per-layer states stay opaque here. `generate()` asks for an
`LMStackCache` (see `_prepare_cache_for_generation`); after the first step it passes only the newest
token, which `LM` continues from the cached state.

Padding: an `attention_mask` with zeros is honoured. Without a cache each run of equal mask values
becomes its own document, so pads never mix with tokens. With a cache (batched generation) prompts
must be left-padded: the pads of each row are a leading document of their own, so every mixer's
returned state (recurrent, short-convolution, KV cache) belongs to the row's real tokens, and the
cache records each row's pad count (`LMCache.pads`) so that decoding continues at the row's own
position. Batched greedy generation then equals generating each prompt alone.

This file is copied into every export (see `lmstack.export.bundle`).
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from transformers import GenerationMixin, PreTrainedModel
from transformers.cache_utils import Cache
from transformers.modeling_outputs import CausalLMOutputWithPast

from lmstack.export.configuration_lmstack import LMStackConfig
from lmstack.model.lm import LM, LMCache
from lmstack.model.loss import IGNORE_INDEX
from lmstack.model.mixers.base import BatchContext

# transformers >= 5.2x renamed `past_key_values` to `cache` (outputs and generate's model kwargs).
_OUTPUT_CACHE_FIELD = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"
_GENERATE_CACHE_KWARG = (
    "cache"
    if "cache" in inspect.signature(GenerationMixin.prepare_inputs_for_generation).parameters
    else "past_key_values"
)


def map_tensors(state: Any, fn: Callable[[torch.Tensor], torch.Tensor]) -> Any:
    """Apply `fn` to every tensor inside a (nested) decoding state: tensors, dataclasses, lists,
    tuples and dicts. Used to select/reorder batch rows of opaque per-layer states (batch first)."""
    if isinstance(state, torch.Tensor):
        return fn(state)
    if dataclasses.is_dataclass(state) and not isinstance(state, type):
        changes = {
            f.name: map_tensors(getattr(state, f.name), fn) for f in dataclasses.fields(state) if f.init
        }
        return dataclasses.replace(state, **changes)
    if isinstance(state, list | tuple):
        return type(state)(map_tensors(s, fn) for s in state)
    if isinstance(state, dict):
        return {k: map_tensors(v, fn) for k, v in state.items()}
    return state


class LMStackCache(Cache):
    """A `transformers.Cache` holding lmstack's `LMCache` (per-layer states, treated as opaque).

    Beam search and row selection assume every tensor in a layer state has the batch as dim 0."""

    def __init__(self, lm_cache: LMCache | None = None) -> None:
        try:
            super().__init__(layers=[])
        except TypeError:  # older transformers
            super().__init__()
        self.lm_cache = lm_cache

    def __repr__(self) -> str:
        return f"LMStackCache(seen_tokens={self.get_seq_length()})"

    def __len__(self) -> int:
        return len(self.lm_cache.states) if self.lm_cache is not None else 0

    def get_seq_length(self, layer_idx: int | None = 0) -> int:
        return self.lm_cache.seen_tokens if self.lm_cache is not None else 0

    def get_max_cache_shape(self, layer_idx: int = 0) -> int:
        return -1

    def get_max_length(self) -> int | None:
        return None

    # generate() inspects these; no layer here is a transformers cache layer.
    @property
    def is_compileable(self) -> bool:
        return False

    @property
    def is_initialized(self) -> bool:
        return self.lm_cache is not None

    @property
    def is_croppable(self) -> bool:
        return False

    @property
    def is_sliding(self) -> list[bool]:
        return [False]

    @property
    def is_linear(self) -> list[bool]:
        # [False]: generate() then slices a continued prompt by get_seq_length(), as for a KV cache.
        return [False]

    @property
    def batch_size(self) -> int:
        found: list[int] = []
        if self.lm_cache is not None:
            map_tensors(self.lm_cache.states, lambda t: found.append(t.shape[0]) or t)
        return found[0] if found else -1

    def _map(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
        if self.lm_cache is not None:  # the states and the per-row pad counts
            self.lm_cache = map_tensors(self.lm_cache, fn)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._map(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        # `LMCache.pads` lives on the host while the states are on the model's device.
        self._map(lambda t: t[torch.as_tensor(indices, device=t.device)])

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._map(lambda t: t.repeat_interleave(repeats, dim=0))

    def reset(self) -> None:
        self.lm_cache = None

    def crop(self, tokens_to_remove: int) -> None:
        if tokens_to_remove:
            raise NotImplementedError(
                "LMStackCache cannot drop tokens (recurrent states cannot be rolled back)"
            )

    def activate_past_recording(self) -> None:
        raise NotImplementedError("LMStackCache does not support assisted decoding")


class LMStackPreTrainedModel(PreTrainedModel):
    config_class = LMStackConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = False
    _no_split_modules = ["Block"]
    _supports_sdpa = True

    def _init_weights(self, module: torch.nn.Module) -> None:
        # `LM` initialises itself when it is built (documented in lmstack.model.lm); from_pretrained
        # then overwrites every weight. Nothing to do here.
        pass


class LMStackForCausalLM(LMStackPreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"model.lm_head.weight": "model.embed.weight"}  # used when tie_word_embeddings

    def __init__(self, config: LMStackConfig) -> None:
        super().__init__(config)
        self.model = LM(config.to_model_config())
        self.post_init()

    # --- embeddings (resize_token_embeddings, tying) -------------------------------------------
    def get_input_embeddings(self) -> torch.nn.Module:
        return self.model.embed

    def set_input_embeddings(self, value: torch.nn.Module) -> None:
        self.model.embed = value

    def get_output_embeddings(self) -> torch.nn.Module:
        return self.model.lm_head

    def set_output_embeddings(self, value: torch.nn.Module) -> None:
        self.model.lm_head = value

    # --- loading -----------------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, *args: Any, **kwargs: Any) -> LMStackForCausalLM:
        model = super().from_pretrained(*args, **kwargs)
        model._refill_non_persistent_buffers()
        return model

    def _refill_non_persistent_buffers(self) -> None:
        """transformers leaves non-persistent buffers (not in the weights file) uninitialised after
        from_pretrained; recompute them from a freshly built LM (only if the model has any)."""
        wanted = []
        for mod_name, module in self.model.named_modules():
            for buf_name in getattr(module, "_non_persistent_buffers_set", ()):
                wanted.append((module, buf_name, f"{mod_name}.{buf_name}" if mod_name else buf_name))
        if not wanted:
            return
        with torch.device("cpu"):
            fresh = dict(LM(self.model.config).named_buffers())
        for module, buf_name, full_name in wanted:
            old = getattr(module, buf_name)
            if old is not None and full_name in fresh:
                module._buffers[buf_name] = fresh[full_name].to(device=old.device, dtype=old.dtype)

    # --- generation --------------------------------------------------------------------------------
    def _prepare_cache_for_generation(
        self, generation_config: Any, model_kwargs: dict, *args: Any, **kwargs: Any
    ):
        """generate() would build a `DynamicCache`; give it an empty `LMStackCache` instead."""
        user_cache = model_kwargs.get(_GENERATE_CACHE_KWARG)
        if user_cache is not None:
            if not isinstance(user_cache, LMStackCache):
                raise ValueError(f"expected an LMStackCache, got {type(user_cache).__name__}")
            user_cache._is_user_defined = True
            return
        if generation_config.use_cache is False:
            return
        if getattr(generation_config, "cache_implementation", None) not in (None, "dynamic"):
            raise ValueError(
                f"cache_implementation={generation_config.cache_implementation!r} is not supported: "
                "lmstack models keep their own per-layer decoding state (LMStackCache)"
            )
        model_kwargs[_GENERATE_CACHE_KWARG] = LMStackCache()

    # --- forward -----------------------------------------------------------------------------------
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        past_key_values: Cache | None = None,
        use_cache: bool | None = None,
        labels: torch.LongTensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        return_dict: bool | None = None,
        cache: Cache | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        **kwargs: Any,
    ) -> CausalLMOutputWithPast | tuple:
        """input_ids: [B, T] -> logits [B, T, V] (+ loss when `labels` [B, T] are given; labels are
        shifted inside, IGNORE_INDEX (-100) is ignored) and the decoding cache when `use_cache`."""
        if inputs_embeds is not None:
            raise ValueError("LMStackForCausalLM takes input_ids, not inputs_embeds")
        if input_ids is None:
            raise ValueError("input_ids is required")
        cache = cache if cache is not None else past_key_values
        lm_cache = None
        if isinstance(cache, LMStackCache):
            lm_cache = cache.lm_cache
        elif cache is not None and (not isinstance(cache, Cache) or cache.get_seq_length() > 0):
            raise ValueError(f"expected an LMStackCache, got {type(cache).__name__}")
        padded = attention_mask is not None and not bool(attention_mask.all())
        if use_cache is None:
            # generate() asks for the cache explicitly; a plain padded call does not need one.
            use_cache = bool(getattr(self.config, "use_cache", True)) and not self.training and not padded
        past = lm_cache.seen_tokens if lm_cache is not None else 0
        context, pads = None, None
        if padded:
            mask = attention_mask[:, -input_ids.shape[1] :].long().cpu()
            if past and not bool(mask.all()):
                raise ValueError(
                    "attention_mask: padding after the first call of a cached sequence; pad prompts "
                    "on the left and pass them in the first call"
                )
            if use_cache and bool((mask[:, 1:] < mask[:, :-1]).any()):
                raise ValueError(
                    "attention_mask: decoding with a cache needs left padding (zeros before the "
                    "tokens in every row); call with use_cache=False for other padding"
                )
            if not past:  # pads (a leading document of each row) and tokens are separate documents
                context = BatchContext.from_doc_ids(mask, input_ids.device)
                pads = (mask == 0).sum(1)
        logits, new_lm_cache, _ = self.model(input_ids, context, cache=lm_cache, use_cache=use_cache)
        if new_lm_cache is not None and pads is not None:
            new_lm_cache.pads = pads
        loss = None
        if labels is not None:
            loss = F.cross_entropy(
                logits[:, :-1].flatten(0, 1).float(),
                labels[:, 1:].flatten().to(logits.device),
                ignore_index=IGNORE_INDEX,
            )
        if isinstance(logits_to_keep, int) and logits_to_keep > 0:
            logits = logits[:, -logits_to_keep:]
        elif isinstance(logits_to_keep, torch.Tensor):
            logits = logits[:, logits_to_keep]
        out_cache = None
        if use_cache:
            if isinstance(
                cache, LMStackCache
            ):  # update in place: a cache the caller passed outlives the call
                cache.lm_cache = new_lm_cache
                out_cache = cache
            else:
                out_cache = LMStackCache(new_lm_cache)
        output = CausalLMOutputWithPast(loss=loss, logits=logits, **{_OUTPUT_CACHE_FIELD: out_cache})
        if return_dict is False:
            return output.to_tuple()
        return output


__all__ = ["LMStackCache", "LMStackConfig", "LMStackForCausalLM", "LMStackPreTrainedModel"]
