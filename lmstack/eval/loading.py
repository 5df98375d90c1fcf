"""The one model loader of evaluation: `load_model(path, dtype, hf=...)` for every folder a model can
be read from.

- an export (`lmstack export`: `config.json` and the weights), read with `from_pretrained`;
- a run directory, its `checkpoints/` directory, one checkpoint tag, or a plain model directory,
  read by `lmstack.export.checkpoint.load_checkpoint_model` (the folder resolved as
  `lmstack.checkpoint.find_tag_dir` does, every `.pt` file read with `safe_torch_load`).

`hf=False` gives the native `LM` (perplexity, state sizes, gradients); `hf=True` the Hugging Face
model and the training tokenizer (lm-eval). A checkpoint is wrapped in memory in the same
`LMStackForCausalLM`, config and generation config that its export would hold
(`lmstack.export.exporter.hf_wrapper`), so a checkpoint and its export evaluate alike.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lmstack.checkpoint import TOKENIZER_DIR
from lmstack.dtypes import parse_dtype
from lmstack.errors import LMStackError

#: Weight files of an export (one file, or shards with an index).
EXPORT_WEIGHTS = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin")


@dataclass
class LoadedModel:
    model: Any  # hf=False: the native LM; hf=True: a transformers causal LM (LMStackForCausalLM or any)
    run_config: Any  # the checkpoint's RunConfig (its data path and seq_len); None for an export
    tokenizer: Any = None  # hf=True: the training tokenizer
    add_bos: bool | None = None  # hf=True: whether training put BOS before documents (None: unknown)
    notes: list[str] = field(default_factory=list)  # how the folder was read, for the log


def is_export_dir(path: Path) -> bool:
    return (path / "config.json").is_file() and any((path / f).is_file() for f in EXPORT_WEIGHTS)


def default_device(device: str | None = None) -> str:
    """`device`, else cuda when available, else cpu."""
    import torch

    return device or ("cuda" if torch.cuda.is_available() else "cpu")


def training_add_bos(tokenizer: Any) -> bool | None:
    """Whether training put BOS before every document. The data pipeline writes the tokenizer that
    travels with checkpoints and exports so that encoding prepends BOS exactly when the data set was
    prepared with `add_bos` (lmstack.data.tokenizer), so the tokenizer itself answers.
    None when the tokenizer has no BOS token (lm-eval's default then applies)."""
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        return None
    ids = tokenizer("x", add_special_tokens=True)["input_ids"]
    return bool(ids) and ids[0] == bos


def _load_tokenizer(tok_dir: Path) -> Any:
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(tok_dir))
    except (OSError, ValueError) as err:
        raise LMStackError(f"{tok_dir}: cannot load the tokenizer: {err}") from None


def _load_export(path: Path, dtype: Any, hf: bool) -> LoadedModel:
    from transformers import AutoModelForCausalLM

    from lmstack.export.hf import register_auto_classes

    register_auto_classes()
    try:
        model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype)
    except (OSError, ValueError) as err:
        raise LMStackError(f"{path}: cannot load the exported model: {err}") from None
    if hf:
        nested = path / TOKENIZER_DIR  # an export holds the tokenizer files itself, or in tokenizer/
        tokenizer = _load_tokenizer(nested if (nested / "tokenizer_config.json").is_file() else path)
        return LoadedModel(model, None, tokenizer, training_add_bos(tokenizer))
    lm = getattr(model, "model", None)
    if lm is None or not hasattr(lm, "blocks"):
        raise LMStackError(f"{path}: not an lmstack export (model_type {model.config.model_type})")
    return LoadedModel(lm, None)


def _load_checkpoint(path: Path, dtype: Any, hf: bool) -> LoadedModel:
    from lmstack.export.checkpoint import load_checkpoint_model

    lm, run_config, tokenizer_dir = load_checkpoint_model(path)
    if dtype != "auto":  # "auto": the checkpoint's fp32 weights as they are
        lm = lm.to(dtype)
    notes = [f"loaded the checkpoint {path} (not an export)"]
    if not hf:
        return LoadedModel(lm, run_config, notes=notes)
    if tokenizer_dir is None:
        raise LMStackError(
            f"{path}: the checkpoint has no {TOKENIZER_DIR}/ folder; lm-eval needs the tokenizer"
        )
    from lmstack.export.exporter import hf_wrapper, special_token_ids

    tokenizer = _load_tokenizer(tokenizer_dir)
    model = hf_wrapper(lm, special_token_ids(lm, tokenizer))
    return LoadedModel(model, run_config, tokenizer, training_add_bos(tokenizer), notes)


def load_model(
    path: str | Path, dtype: str = "float32", hf: bool = True, device: str | None = None
) -> LoadedModel:
    """The model in `path` (an export, a run / checkpoints / tag directory or a plain model
    directory) in eval mode on `device` (default: cuda when available), its weights in `dtype`
    (`auto`: as stored). `hf=True`: the Hugging Face model with the training tokenizer; `hf=False`:
    the native `LM` (an lmstack export or checkpoint only)."""
    path = Path(path)
    torch_dtype = parse_dtype(dtype, allow_auto=True)
    if not path.exists():
        raise LMStackError(f"{path}: no such model folder or checkpoint")
    if (path / "config.json").is_file() and not is_export_dir(path):
        raise LMStackError(
            f"{path}: config.json without weights ({', '.join(EXPORT_WEIGHTS)}): an incomplete export"
        )
    load = _load_export if is_export_dir(path) else _load_checkpoint
    loaded = load(path, torch_dtype, hf)
    loaded.model.to(default_device(device)).eval()
    return loaded
