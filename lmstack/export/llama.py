"""Native Llama export: an lmstack model whose every layer is standard softmax `attention` is exactly a
Llama (pre-norm RMSNorm, rotate-half RoPE, GQA, SwiGLU gate/up/down, no biases), so it converts to a
plain `transformers.LlamaForCausalLM` that needs no custom code.
"""

from __future__ import annotations

import dataclasses
import re

from lmstack.errors import LMStackError
from lmstack.model.lm import LM

_LAYER_MAP = {
    "mixer_norm.weight": "input_layernorm.weight",
    "mixer.q_proj.weight": "self_attn.q_proj.weight",
    "mixer.k_proj.weight": "self_attn.k_proj.weight",
    "mixer.v_proj.weight": "self_attn.v_proj.weight",
    "mixer.o_proj.weight": "self_attn.o_proj.weight",
    "mlp_norm.weight": "post_attention_layernorm.weight",
    "mlp.gate_proj.weight": "mlp.gate_proj.weight",
    "mlp.up_proj.weight": "mlp.up_proj.weight",
    "mlp.down_proj.weight": "mlp.down_proj.weight",
}
_TOP_MAP = {
    "embed.weight": "model.embed_tokens.weight",
    "norm.weight": "model.norm.weight",
    "lm_head.weight": "lm_head.weight",
}


def llama_incompatibility(model: LM) -> str | None:
    """Why `model` cannot be exported as a native Llama, or None if it can."""
    config = model.config
    mixers = {config.mixer_for_layer(i) for i in range(config.n_layers)}
    if mixers != {"attention"}:
        return f"layers use {sorted(mixers)}; a native Llama needs softmax 'attention' in every layer"
    options = config.mixer_options_for("attention")
    if dataclasses.asdict(options) != dataclasses.asdict(type(options)()):
        return f"mixer_options.attention {dataclasses.asdict(options)} are not the standard settings"
    for name in model.state_dict():
        if _llama_name(name) is None:
            return f"weight '{name}' has no Llama counterpart"
    return None


def _llama_name(name: str) -> str | None:
    if name in _TOP_MAP:
        return _TOP_MAP[name]
    m = re.fullmatch(r"blocks\.(\d+)\.(.+)", name)
    if m and m.group(2) in _LAYER_MAP:
        return f"model.layers.{m.group(1)}.{_LAYER_MAP[m.group(2)]}"
    return None


def llama_config(model: LM, **token_ids: int | None):
    from transformers import LlamaConfig

    c = model.config
    ids = {k: token_ids.get(k, getattr(c, k)) for k in ("bos_token_id", "eos_token_id", "pad_token_id")}
    return LlamaConfig(
        vocab_size=c.vocab_size,
        hidden_size=c.d_model,
        intermediate_size=c.ffn_hidden,
        num_hidden_layers=c.n_layers,
        num_attention_heads=c.n_heads,
        num_key_value_heads=c.kv_heads,
        head_dim=c.head_dim,
        hidden_act="silu",
        max_position_embeddings=c.max_seq_len,
        rms_norm_eps=c.norm_eps,
        rope_parameters={"rope_type": "default", "rope_theta": c.rope_theta},
        attention_bias=False,
        mlp_bias=False,
        tie_word_embeddings=c.tie_embeddings,
        **ids,
    )


def to_llama(model: LM, **token_ids: int | None):
    """-> a `LlamaForCausalLM` (eval mode, same dtype) with `model`'s weights. Raises LMStackError when
    the model is not a plain Llama (see `llama_incompatibility`)."""
    from transformers import LlamaForCausalLM

    why = llama_incompatibility(model)
    if why is not None:
        raise LMStackError(f"cannot export as a native Llama: {why}")
    dtype = next(model.parameters()).dtype
    # Built for real on the CPU (not on meta) so that non-persistent buffers such as the rotary
    # inv_freq are computed by transformers itself.
    llama = LlamaForCausalLM(llama_config(model, **token_ids))
    state = {_llama_name(k): v.detach() for k, v in model.state_dict().items()}
    if model.config.tie_embeddings:
        state.pop("lm_head.weight", None)
    missing, unexpected = llama.load_state_dict(state, strict=False)
    missing = [k for k in missing if not (model.config.tie_embeddings and k == "lm_head.weight")]
    if missing or unexpected:
        raise LMStackError(f"cannot export as a native Llama: missing {missing}, unexpected {unexpected}")
    return llama.to(dtype).eval()
