"""Checkpoint folders on disk, for the rooms that write and read them: training saves and resumes
(`lmstack.train.checkpoint`), export and evaluation load weights (`lmstack.export.checkpoint`).

Layout of a run directory (the trainer writes it; DeepSpeed's own file names inside each tag):

    RUN_DIR/checkpoints/
      latest                  # the tag of the newest complete checkpoint (DeepSpeed's convention)
      step_00000100/          # one tag per saved step
        mp_rank_00_model_states.pt                 # ZeRO 0-2: weights (+ ZeRO 0's optimizer state)
        zero_pp_rank_<r>_mp_rank_00_model_states.pt    # ZeRO 3: one per rank, weights in the shards
        [bf16_]zero_pp_rank_<r>_mp_rank_00_optim_states.pt  # ZeRO 1-3: one optimizer shard per rank
        config.yaml           # the resolved run config
        tokenizer/            # copy of the data's Hugging Face tokenizer folder
      .tmp-*                  # unfinished saves and conversions: never named by `latest`

A plain model directory (`lmstack.export.checkpoint.save_model_dir`) holds `model.safetensors`,
`config.yaml` and `tokenizer/`.

Loading is safe: `safe_torch_load` reads a `.pt` file with `torch.load(weights_only=True)` and only
the non-tensor types DeepSpeed and lmstack put there, so a tampered pickle is refused before
anything executes it; `verify_pickles` does so for a whole folder before code that unpickles
without restrictions (DeepSpeed's `load_checkpoint`, `zero_to_fp32`) sees it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lmstack.errors import LMStackError

LATEST = "latest"
CHECKPOINTS_DIR = "checkpoints"
CONFIG_FILE = "config.yaml"
TOKENIZER_DIR = "tokenizer"
MODEL_STATES = "mp_rank_00_model_states.pt"
MODEL_FILE = "model.safetensors"  # a plain model directory's weights
TMP_PREFIX = ".tmp-"
TAG_RE = re.compile(r"^step_(\d+)$")
# ZeRO 1-3 optimizer shards, one per data-parallel rank (bf16_ prefix: DeepSpeed's bf16 optimizer).
OPTIM_SHARD_RE = re.compile(r"^(bf16_)?zero_pp_rank_(\d+)_mp_rank_00_optim_states\.pt$")
ZERO3_MODEL_RE = re.compile(r"^zero_pp_rank_(\d+)_mp_rank_00_model_states\.pt$")


def tag_for(step: int) -> str:
    return f"step_{step:08d}"


def latest_tag(ckpt_dir: Path) -> str | None:
    """The tag named by `ckpt_dir/latest` (None without that file); LMStackError when it names a
    folder that does not exist."""
    latest = ckpt_dir / LATEST
    if not latest.is_file():
        return None
    tag = latest.read_text().strip()
    if not (ckpt_dir / tag).is_dir():
        raise LMStackError(f"{latest}: names checkpoint '{tag}', which does not exist in {ckpt_dir}")
    return tag


def complete_tags(ckpt_dir: Path) -> list[str]:
    """Finished checkpoint tags, oldest first."""
    if not ckpt_dir.is_dir():
        return []
    tags = [p.name for p in ckpt_dir.iterdir() if p.is_dir() and TAG_RE.match(p.name)]
    return sorted(tags, key=lambda t: int(TAG_RE.match(t).group(1)))


def find_tag_dir(path: Path) -> Path | None:
    """The checkpoint folder `path` names: a run directory (its `checkpoints/latest`), a checkpoints
    directory (its `latest`), or else the folder itself (a tag or a model directory, which the
    caller checks). None when `path` is not a directory."""
    if not path.is_dir():
        return None
    for ckpt_dir in (path / CHECKPOINTS_DIR, path):
        tag = latest_tag(ckpt_dir)
        if tag is not None:
            return ckpt_dir / tag
    return path


@dataclass(frozen=True)
class SavedLayout:
    """How a checkpoint was partitioned, read from DeepSpeed's file names."""

    shards: int  # ZeRO optimizer shards (= data-parallel ranks at save time); 0: ZeRO 0
    zero3: bool
    bf16: bool


def saved_layout(tag_dir: Path) -> SavedLayout:
    """The layout of the checkpoint in `tag_dir`; LMStackError when its files are incomplete."""
    names = {p.name for p in tag_dir.iterdir()} if tag_dir.is_dir() else set()
    shards = sorted((int(m.group(2)), bool(m.group(1))) for n in names if (m := OPTIM_SHARD_RE.match(n)))
    zero3_models = sorted(int(m.group(1)) for n in names if (m := ZERO3_MODEL_RE.match(n)))
    ranks = [r for r, _ in shards]
    if ranks != list(range(len(ranks))) or (zero3_models and zero3_models != ranks):
        raise LMStackError(
            f"--resume: checkpoint {tag_dir} is incomplete: optimizer shards of ranks {ranks} "
            f"(model shards {zero3_models or '-'}); expected every rank 0..N-1; resume from an earlier checkpoint"
        )
    if not zero3_models and MODEL_STATES not in names:
        raise LMStackError(
            f"--resume: checkpoint {tag_dir} is incomplete: {MODEL_STATES} is missing; resume from an "
            "earlier checkpoint"
        )
    if CONFIG_FILE not in names:
        raise LMStackError(f"--resume: checkpoint {tag_dir} is incomplete: {CONFIG_FILE} is missing")
    return SavedLayout(shards=len(ranks), zero3=bool(zero3_models), bf16=any(b for _, b in shards))


def _checkpoint_globals() -> list:
    """The non-tensor types a DeepSpeed checkpoint of lmstack pickles: DeepSpeed's loss scaler, ZeRO
    stage enum and fragment addresses (optimizer shards), numpy's array pieces (RNG states)."""
    import numpy as np
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    multiarray = getattr(np, "_core", None) or np.core  # numpy 2 / numpy 1
    numpy_rng = [np.ndarray, np.dtype, type(np.dtype(np.uint32)), multiarray.multiarray._reconstruct]
    return [LossScaler, ZeroStageEnum, fragment_address, *numpy_rng]


def safe_torch_load(path: Path) -> Any:
    """`torch.load` with `weights_only=True` and only the allow-listed types; anything else (e.g. a
    pickle that would call os.system) is refused, unexecuted, with a one-line LMStackError."""
    import torch

    allowed = _checkpoint_globals()
    with torch.serialization.safe_globals(allowed):
        try:
            return torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:  # UnpicklingError (a refused global), or a truncated / foreign file
            try:
                names = set(
                    torch.serialization.get_unsafe_globals_in_checkpoint(path)
                )  # a scan, no execution
            except Exception:
                names = set()
            names -= {f"{g.__module__}.{g.__qualname__}" for g in allowed}
            if names:
                raise LMStackError(
                    f"{path}: refusing to load: its pickle calls {', '.join(sorted(names))}, which no lmstack/"
                    "DeepSpeed checkpoint holds (a tampered or foreign file?)"
                ) from None
            raise LMStackError(
                f"{path}: cannot read the checkpoint file (corrupt or truncated?): {err}"
            ) from None


def verify_pickles(tag_dir: Path) -> None:
    """Load every `.pt` file of a checkpoint folder safely before code that loads them unrestricted
    (DeepSpeed's `load_checkpoint` and `zero_to_fp32` use `weights_only=False`) sees them."""
    for path in sorted(tag_dir.glob("*.pt")):
        safe_torch_load(path)
