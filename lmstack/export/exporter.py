"""`lmstack export`: a trained model -> a self-contained Hugging Face folder.

Format `lmstack` (default) writes
    config.json             LMStackConfig, with `auto_map` pointing at the bundled code
    model.safetensors       (or model-0000x-of-0000y.safetensors + model.safetensors.index.json past
                            `max_shard_size`)
    configuration_lmstack.py, modeling_lmstack.py, lmstack_*.py   the model code (see `bundle`)
    tokenizer files         (when the checkpoint has a tokenizer)
    generation_config.json
so `AutoModelForCausalLM.from_pretrained(OUT, trust_remote_code=True)` works without lmstack.
Format `llama` writes a plain `LlamaForCausalLM` (no custom code) for attention-only models.

The folder is written under a temporary name next to OUT_DIR and renamed into place at the end, so a
failed export never leaves a half-written OUT_DIR. Before the rename the export is loaded back (with
the bundled code, or as a Llama) and its logits compared with the source model.
"""

from __future__ import annotations

import copy
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch

from lmstack.dtypes import parse_dtype
from lmstack.errors import LMStackError
from lmstack.model.lm import LM

FORMATS = ("lmstack", "llama")


@dataclass
class ExportResult:
    out_dir: Path
    format: str
    files: list[str]
    tokenizer: bool
    max_abs_diff: float | None = None  # verification: reloaded export vs source model (fp32 logits)
    notes: list[str] = field(default_factory=list)


def special_token_ids(model: LM, tokenizer) -> dict[str, int | None]:
    """BOS/EOS/PAD ids of the export: the model config's, else the tokenizer's."""
    ids = {k: getattr(model.config, k) for k in ("bos_token_id", "eos_token_id", "pad_token_id")}
    if tokenizer is not None:
        for key in ids:
            if ids[key] is None:
                ids[key] = getattr(tokenizer, key, None)
    return ids


def _probe_ids(model: LM) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    T = min(16, model.config.max_seq_len)
    return torch.randint(0, model.config.vocab_size, (2, T), generator=g)


def hf_wrapper(model: LM, token_ids: dict[str, int | None]):
    """`LMStackForCausalLM` around `model` itself (no copy, no re-initialisation), with the config
    and generation config an export holds: what loading the export gives, without writing it."""
    from lmstack.export.hf import LMStackConfig, LMStackForCausalLM

    config = LMStackConfig.from_model_config(model.config)
    for key, value in token_ids.items():
        setattr(config, key, value)
    config.auto_map = {
        "AutoConfig": "configuration_lmstack.LMStackConfig",
        "AutoModelForCausalLM": "modeling_lmstack.LMStackForCausalLM",
    }
    config.architectures = ["LMStackForCausalLM"]
    with torch.device("meta"):
        hf_model = LMStackForCausalLM(config)
    hf_model.model = model
    for key, value in token_ids.items():
        setattr(hf_model.generation_config, key, value)
    return hf_model


def _write_lmstack(model: LM, out: Path, max_shard_size: str | int, token_ids: dict) -> None:
    from lmstack.export.bundle import bundle_code

    hf_wrapper(model, token_ids).save_pretrained(out, max_shard_size=max_shard_size)
    bundle = bundle_code()
    bundle.write(out)
    (out / "README.md").write_text(_model_card(model, bundle))


def _model_card(model: LM, bundle) -> str:
    c = model.config
    layers = ", ".join(c.mixer_for_layer(i) for i in range(c.n_layers))
    optional = (
        f"\nOptional packages used when installed: {', '.join(sorted(bundle.guarded))}.\n"
        if bundle.guarded
        else ""
    )
    return f"""# lmstack causal LM

Exported by `lmstack export`. {model.num_params(non_embedding=False):,} parameters; d_model {c.d_model},
{c.n_layers} layers ({layers}), vocabulary {c.vocab_size}, context {c.max_seq_len}.

The model code travels with this folder (`configuration_lmstack.py`, `modeling_lmstack.py`,
`lmstack_*.py`): only torch and transformers are needed.
{optional}
```python
from transformers import AutoModelForCausalLM, AutoTokenizer

model = AutoModelForCausalLM.from_pretrained(PATH, trust_remote_code=True)
tokenizer = AutoTokenizer.from_pretrained(PATH, trust_remote_code=True)  # reads config.json's auto_map
out = model.generate(**tokenizer("Hello", return_tensors="pt"), max_new_tokens=20)
```

Where lmstack is installed, `import lmstack` registers the classes and `trust_remote_code` is not
needed. Generation keeps each layer's own decoding state (KV cache or recurrent state). Batches of
prompts generate together when left-padded (`tokenizer.padding_side = "left"`; the pads of a row
are a document of their own), with the same tokens as generating each prompt alone.
"""


def _write_llama(model: LM, out: Path, max_shard_size: str | int, token_ids: dict) -> None:
    from lmstack.export.llama import to_llama

    llama = to_llama(model, **token_ids)
    for key, value in token_ids.items():
        setattr(llama.generation_config, key, value)
    llama.save_pretrained(out, max_shard_size=max_shard_size)


def _import_bundled(folder: Path, module: str):
    """Import `folder/<module>.py` as part of a private package, the way transformers' remote-code
    loader does (relative imports resolve inside `folder`). -> (module, cleanup callback)."""
    import importlib
    import sys
    import types
    import uuid

    package = f"_lmstack_export_check_{uuid.uuid4().hex[:12]}"
    pkg = types.ModuleType(package)
    pkg.__path__ = [str(folder)]
    sys.modules[package] = pkg

    def cleanup() -> None:
        for name in [n for n in sys.modules if n == package or n.startswith(package + ".")]:
            del sys.modules[name]

    try:
        return importlib.import_module(f"{package}.{module}"), cleanup
    except BaseException:
        cleanup()
        raise


@torch.no_grad()
def _verify(model: LM, out: Path, fmt: str) -> float:
    """Load the written folder back -- with the bundled code (not lmstack's own classes), or as a
    native Llama -- and compare fp32 logits with the source model."""
    cleanup = None
    if fmt == "lmstack":
        bundled, cleanup = _import_bundled(out, "modeling_lmstack")
        model_class = bundled.LMStackForCausalLM
    else:
        from transformers import LlamaForCausalLM as model_class
    try:
        loaded = model_class.from_pretrained(out, dtype=torch.float32).eval()
        ids = _probe_ids(model)
        reference = model.float()(ids)[0]
        logits = loaded(ids, use_cache=False).logits
        return (logits - reference).abs().max().item()
    finally:
        if cleanup is not None:
            cleanup()


def _parse_shard_size(size: str | int) -> int:
    """'2GB' / '500MB' / '1GiB' / 123 -> bytes; LMStackError naming --max-shard-size otherwise."""
    from huggingface_hub.serialization._base import parse_size_to_int

    try:
        n = size if isinstance(size, int) and not isinstance(size, bool) else parse_size_to_int(str(size))
    except (ValueError, TypeError):
        n = None
    if n is None or n <= 0:
        raise LMStackError(f"--max-shard-size: expected a positive size such as 2GB or 500MB, got '{size}'")
    return n


def export_model(
    model: LM,
    out_dir: str | Path,
    *,
    tokenizer_dir: str | Path | None = None,
    fmt: str = "lmstack",
    max_shard_size: str | int = "2GB",
    dtype: str | None = None,
    overwrite: bool = False,
    verify: bool = True,
    tolerance: float = 1e-4,
) -> ExportResult:
    """Write `model` (+ tokenizer) as a Hugging Face folder at `out_dir` (atomically)."""
    if fmt not in FORMATS:
        raise LMStackError(f"--format: expected one of {', '.join(FORMATS)}, got '{fmt}'")
    weight_dtype = parse_dtype(dtype) if dtype is not None else torch.float32
    max_shard_size = _parse_shard_size(max_shard_size)
    out = Path(out_dir).absolute()
    if out.exists() and not out.is_dir():
        raise LMStackError(f"{out}: exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise LMStackError(f"{out}: already exists and is not empty (pass --overwrite to replace it)")
    out.parent.mkdir(parents=True, exist_ok=True)

    tokenizer = None
    notes = []
    if tokenizer_dir is not None:
        from transformers import AutoTokenizer

        try:
            tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
        except (OSError, ValueError) as err:
            raise LMStackError(f"{tokenizer_dir}: cannot load the tokenizer: {err}") from None
    else:
        notes.append("no tokenizer found: exported without tokenizer files")

    model = model.float().eval()
    token_ids = special_token_ids(model, tokenizer)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        max_diff = None
        writer = _write_lmstack if fmt == "lmstack" else _write_llama
        writer(model, tmp, max_shard_size, token_ids)  # fp32 first: verified against the source model
        if verify:
            max_diff = _verify(model, tmp, fmt)
            if not max_diff < tolerance:
                raise LMStackError(
                    f"export verification failed: reloaded logits differ from the model's by {max_diff:.3e} "
                    f"(tolerance {tolerance:.0e}); nothing was written to {out}"
                )
        if weight_dtype != torch.float32:
            for path in tmp.glob("*.safetensors*"):
                path.unlink()
            writer(copy.deepcopy(model).to(weight_dtype), tmp, max_shard_size, token_ids)
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
        files = sorted(p.name for p in tmp.iterdir())
        os.chmod(tmp, 0o755)  # mkdtemp makes it private
        if out.exists():
            old = out.parent / f".{out.name}.old-{os.getpid()}"
            os.rename(out, old)
            os.rename(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return ExportResult(out, fmt, files, tokenizer is not None, max_diff, notes)


def export_checkpoint(checkpoint: str | Path, out_dir: str | Path, **kwargs) -> ExportResult:
    """`lmstack export CHECKPOINT OUT_DIR`: load a trainer checkpoint and export it (see `export_model`)."""
    from lmstack.export.checkpoint import load_checkpoint_model
    from lmstack.export.llama import llama_incompatibility

    model, _, tokenizer_dir = load_checkpoint_model(checkpoint)
    result = export_model(model, out_dir, tokenizer_dir=tokenizer_dir, **kwargs)
    if result.format == "lmstack" and llama_incompatibility(model) is None:
        result.notes.append("this model is a plain Llama: `--format llama` exports it without custom code")
    return result
