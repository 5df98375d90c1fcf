"""Load a trained model from what the trainer wrote: a DeepSpeed checkpoint (ZeRO 0-3) plus
`config.yaml` and `tokenizer/` in each tag folder (the layout: `lmstack.checkpoint`).

Accepted paths:
- a run directory (`RUN/checkpoints/latest` names the tag),
- a checkpoints directory (`latest` inside),
- a tag directory (`mp_rank_00_model_states.pt` or `zero_pp_rank_*` files inside),
- a plain model directory written by `save_model_dir` (`model.safetensors` + `config.yaml`).

Loading is safe: every `.pt` file is first read with `lmstack.checkpoint.safe_torch_load`, so a tampered
pickle is refused before anything executes it.

Weights: ZeRO 1-3 (and bf16 runs, whose fp32 master weights live in the optimizer shards) are
consolidated to fp32 with DeepSpeed's `zero_to_fp32`; ZeRO 0 takes the `module` entry of
`mp_rank_00_model_states.pt`.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from lmstack.checkpoint import (
    CONFIG_FILE,
    MODEL_FILE,
    MODEL_STATES,
    TOKENIZER_DIR,
    find_tag_dir,
    safe_torch_load,
    verify_pickles,
)
from lmstack.errors import LMStackError
from lmstack.model.lm import LM


def _resolve_tag_dir(path: Path) -> Path:
    if not path.exists():
        raise LMStackError(f"{path}: checkpoint not found")
    tag_dir = find_tag_dir(path)
    if tag_dir is None:
        raise LMStackError(f"{path}: expected a directory (run dir, checkpoints dir or checkpoint tag)")
    if tag_dir != path or (path / MODEL_FILE).is_file() or list(path.glob("*model_states.pt")):
        return tag_dir  # a tag named by `latest`, or a folder with weights: its files are read next
    raise LMStackError(
        f"{path}: no checkpoint found; expected a run directory (with checkpoints/latest), a checkpoints "
        f"directory (with latest), a checkpoint tag (with {MODEL_STATES}) or a model directory (with {MODEL_FILE})"
    )


def _load_run_config(tag_dir: Path):
    from lmstack.config import load_config

    for candidate in (tag_dir / CONFIG_FILE, tag_dir.parent.parent / CONFIG_FILE):
        if candidate.is_file():
            return load_config(candidate)
    raise LMStackError(f"{tag_dir}: config.yaml is missing (the trainer writes the run config there)")


def _deepspeed_state_dict(tag_dir: Path) -> dict[str, torch.Tensor]:
    verify_pickles(tag_dir)  # DeepSpeed's zero_to_fp32 below unpickles without restrictions
    zero_files = sorted(tag_dir.glob("*zero_pp_rank_*_optim_states.pt"))
    if zero_files:
        try:
            from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
        except ImportError as err:
            raise LMStackError(f"{tag_dir}: reading a ZeRO checkpoint needs deepspeed ({err})") from None
        try:
            return get_fp32_state_dict_from_zero_checkpoint(str(tag_dir.parent), tag=tag_dir.name)
        except (FileNotFoundError, ValueError) as err:
            raise LMStackError(f"{tag_dir}: cannot consolidate the ZeRO checkpoint: {err}") from None
    states = tag_dir / MODEL_STATES
    if not states.is_file():
        raise LMStackError(f"{tag_dir}: {MODEL_STATES} is missing")
    data = safe_torch_load(states)
    module = data.get("module") if isinstance(data, dict) else None
    if not module:
        raise LMStackError(f"{states}: no 'module' weights inside (is this a DeepSpeed checkpoint?)")
    return {k: v.float() if v.is_floating_point() else v for k, v in module.items()}


def _load_into(model: LM, state: dict[str, torch.Tensor], where: Path) -> None:
    state = {k.removeprefix("module."): v for k, v in state.items()}
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as err:
        first = next(
            (ln.strip() for ln in str(err).splitlines() if "size mismatch" in ln), str(err).splitlines()[0]
        )
        raise LMStackError(f"{where}: weights do not match the model in config.yaml ({first})") from None
    if model.config.tie_embeddings:
        missing = [k for k in missing if k != "lm_head.weight"]
    if missing or unexpected:
        raise LMStackError(
            f"{where}: weights do not match the model in config.yaml "
            f"(missing: {', '.join(missing[:5]) or '-'}; unexpected: {', '.join(unexpected[:5]) or '-'})"
        )


def load_checkpoint_model(path: str | Path):
    """-> (LM in eval mode with fp32 weights, RunConfig, tokenizer directory or None)."""
    tag_dir = _resolve_tag_dir(Path(path))
    run_config = _load_run_config(tag_dir)
    model = LM(run_config.model)
    if (tag_dir / MODEL_FILE).is_file():
        from safetensors.torch import load_file

        try:
            state = load_file(str(tag_dir / MODEL_FILE))
        except Exception as err:  # SafetensorError: truncated or not a safetensors file
            raise LMStackError(
                f"{tag_dir / MODEL_FILE}: cannot read the weights (corrupt or truncated?): {err}"
            ) from None
    else:
        state = _deepspeed_state_dict(tag_dir)
    _load_into(model, state, tag_dir)
    tokenizer_dir = tag_dir / TOKENIZER_DIR
    return model.float().eval(), run_config, (tokenizer_dir if tokenizer_dir.is_dir() else None)


def save_model_dir(
    model: LM, out_dir: str | Path, run_config=None, tokenizer_dir: str | Path | None = None
) -> Path:
    """Write a plain model directory that `load_checkpoint_model` (and so `lmstack export`) accepts:
    `config.yaml` (the run config, or defaults around `model.config`), `model.safetensors`, `tokenizer/`."""
    import shutil

    import yaml
    from safetensors.torch import save_file

    from lmstack.config import RunConfig

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if run_config is None:
        run_config = RunConfig(model=model.config)
    (out / CONFIG_FILE).write_text(yaml.safe_dump(dataclasses.asdict(run_config), sort_keys=False))
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    if model.config.tie_embeddings:
        state.pop("lm_head.weight", None)
    save_file(state, str(out / MODEL_FILE))
    if tokenizer_dir is not None:
        shutil.copytree(tokenizer_dir, out / TOKENIZER_DIR, dirs_exist_ok=True)
    return out
