"""Helpers of the export tests: a tiny byte-level BPE tokenizer, tiny models, subprocess settings."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch

from lmstack.model import LM, MIXERS, ModelConfig

TEXT = [
    "The quick brown fox jumps over the lazy dog.",
    "Shall I compare thee to a summer's day? Thou art more lovely and more temperate.",
    "In the beginning was the word, and the word was with the model.",
    "Pack my box with five dozen liquor jugs; sphinx of black quartz, judge my vow.",
] * 20


def build_tokenizer(out: Path) -> Path:
    """A byte-level BPE (vocab <= 320) trained here, saved as a Hugging Face tokenizer folder."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320,
        special_tokens=["<|endoftext|>", "<|pad|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(TEXT, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|endoftext|>", pad_token="<|pad|>"
    )
    fast.save_pretrained(str(out))
    return out


def tiny_config(vocab_size: int, **overrides) -> ModelConfig:
    base = dict(vocab_size=vocab_size, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=64)
    return ModelConfig(**{**base, **overrides})


# Layer options that make a mixer's structure show at the tests' lengths (prompts of 4-12 tokens and
# up to 13 in generation): a window shorter than the sequence.
HYBRID_OPTIONS = {"swa": {"window": 3}}


def hybrid_layers() -> list[str | dict]:
    """A layer pattern using every registered mixer (other mixers are added by other issues)."""
    return [
        {"mixer": name, **HYBRID_OPTIONS[name]} if name in HYBRID_OPTIONS else name for name in sorted(MIXERS)
    ]


def tiny_model(vocab_size: int, seed: int = 0, **overrides) -> LM:
    torch.manual_seed(seed)
    model = LM(tiny_config(vocab_size, **overrides)).eval()
    with torch.no_grad():  # norms away from 1 so that a mixed-up norm weight would show
        for p in model.parameters():
            if p.dim() == 1:
                p.add_(0.1 * torch.randn_like(p))
    return model


def subprocess_env(tmp_path: Path) -> dict[str, str]:
    env = dict(os.environ)
    env.update(HF_HOME=str(tmp_path / "hf_home"), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    env.pop("PYTHONPATH", None)
    return env


PYTHON = sys.executable
