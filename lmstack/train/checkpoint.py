"""Atomic, rotating DeepSpeed checkpoints under `RUN_DIR/checkpoints/`.

Layout (what `lmstack export` reads):

    checkpoints/
      latest                  # the tag of the newest complete checkpoint (DeepSpeed's convention)
      step_00000100/          # one tag per saved step
        mp_rank_00_model_states.pt, *optim_states.pt ...   # DeepSpeed's files (client_state inside)
        config.yaml           # the resolved run config
        tokenizer/            # copy of the data's Hugging Face tokenizer folder

Atomicity: every rank saves into a temporary tag `.tmp-step_XXXXXXXX`; after a barrier (all ranks'
files written), rank 0 adds config.yaml and tokenizer/, fsyncs, renames the folder to its final tag
and only then replaces `latest` (write to `latest.tmp`, fsync, `os.replace`). A process killed at any
point leaves `latest` naming a complete checkpoint; leftover temporary folders are removed by the
next save. The run directory must be on a file system shared by all nodes (as usual for DeepSpeed).
Only the newest `keep_last` complete checkpoints are kept.

Resuming (`Checkpointer.prepare_resume`, then `load`): the checkpoint folder is checked first (its
files complete, its model equal to the configured one, its ZeRO/precision layout loadable), each
mismatch a one-line LMStackError. Saved with another number of data-parallel ranks, ZeRO 1-3
optimizer shards are converted once by rank 0 with DeepSpeed's `ds_to_universal` into
`checkpoints/.tmp-universal-<tag>` (removed by the next save) and the engine loads that universal
checkpoint (`checkpoint.load_universal`), which re-partitions the fp32 master weights and Adam
moments over the new ranks. ZeRO 0 keeps whole optimizer states in `mp_rank_00_model_states.pt`, which
load at any world size as they are.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import re
import shutil
import signal
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lmstack.errors import LMStackError
from lmstack.train import distributed

TAG_RE = re.compile(r"^step_(\d+)$")
TMP_PREFIX = ".tmp-"
MODEL_STATES = "mp_rank_00_model_states.pt"
CONVERTED = "lmstack-universal-done"
# ZeRO 1-3 optimizer shards, one per data-parallel rank (bf16_ prefix: DeepSpeed's bf16 optimizer).
OPTIM_SHARD_RE = re.compile(r"^(bf16_)?zero_pp_rank_(\d+)_mp_rank_00_optim_states\.pt$")
ZERO3_MODEL_RE = re.compile(r"^zero_pp_rank_(\d+)_mp_rank_00_model_states\.pt$")


@dataclass
class SavedLayout:
    """How a checkpoint was partitioned, read from DeepSpeed's file names."""

    shards: int  # ZeRO optimizer shards (= data-parallel ranks at save time); 0: ZeRO 0
    zero3: bool
    bf16: bool


def saved_layout(tag_dir: Path) -> SavedLayout:
    """The layout of the checkpoint in `tag_dir`; LMStackError when its DeepSpeed files are incomplete."""
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
    if "config.yaml" not in names:
        raise LMStackError(f"--resume: checkpoint {tag_dir} is incomplete: config.yaml is missing")
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


def check_same_model(tag_dir: Path, config: Any) -> None:
    """LMStackError naming every `model.*` field in which `config` differs from the checkpoint's."""
    import dataclasses

    import yaml

    saved = (yaml.safe_load((tag_dir / "config.yaml").read_text()) or {}).get("model", {})
    now = dataclasses.asdict(config.model)
    diff = [
        f"model.{k}={now.get(k)!r} (checkpoint: {saved.get(k)!r})" for k in now if saved.get(k) != now.get(k)
    ]
    if diff:
        raise LMStackError(
            f"--resume: the configured model differs from checkpoint {tag_dir}: {', '.join(diff)}; resume "
            "with the checkpoint's model settings or start a new run_dir"
        )


def _to_universal(tag_dir: Path, out: Path) -> None:
    """DeepSpeed's ds_to_universal (ZeRO 1-3 shards -> one folder per parameter), quietly, in process."""
    from deepspeed.checkpoint import ds_to_universal

    shutil.rmtree(out, ignore_errors=True)
    args = argparse.Namespace(
        input_folder=str(tag_dir),
        output_folder=str(out),
        num_extract_workers=1,  # in-process: no worker pool (spawning one per step costs seconds)
        num_merge_workers=1,
        keep_temp_folder=False,
        strict=True,
        inject_missing_state=True,  # lmstack's checkpoints have no tensor/pipeline-parallel info to add
    )
    log = io.StringIO()
    try:
        with contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
            ds_to_universal.main(args)
        (out.parent / "latest_universal").unlink(missing_ok=True)  # we load the folder by name, not by tag
        (out / CONVERTED).write_text(str(tag_dir))  # tells the other ranks the conversion finished
    except Exception as err:
        raise LMStackError(
            f"--resume: cannot convert {tag_dir} to DeepSpeed's universal checkpoint for another number of "
            f"ranks ({type(err).__name__}: {err}); resume with the number of ranks it was saved with"
        ) from None


def tag_for(step: int) -> str:
    return f"step_{step:08d}"


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _fsync_tree(path: Path) -> None:
    for root, _, files in os.walk(path):
        for name in files:
            with open(os.path.join(root, name), "rb") as f:
                os.fsync(f.fileno())
        _fsync_dir(Path(root))


def fault(name: str, step: int) -> None:
    """Test hook: `LMSTACK_FAULT=name:step` (or `name@rank:step`, one rank only) makes this process
    SIGKILL itself at that point."""
    spec = os.environ.get("LMSTACK_FAULT", "")
    for item in spec.split(","):
        key, _, value = item.partition(":")
        key, _, rank = key.partition("@")
        if rank and int(rank) != int(os.environ.get("RANK", "0")):
            continue
        if key == name and value and int(value) == step:
            os.kill(os.getpid(), signal.SIGKILL)


def latest_tag(ckpt_dir: Path) -> str | None:
    """The tag named by `latest` if that folder exists, else None."""
    latest = ckpt_dir / "latest"
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


class Checkpointer:
    def __init__(self, run_dir: Path, keep_last: int, is_main: bool) -> None:
        self.dir = run_dir / "checkpoints"
        self.keep_last = keep_last
        self.is_main = is_main

    def save(
        self,
        engine: Any,
        step: int,
        client_state: dict[str, Any],
        config_yaml: str,
        tokenizer_dir: Path | None,
    ) -> str:
        """Save on every rank (collective). Returns the tag."""
        tag = tag_for(step)
        tmp_tag = TMP_PREFIX + tag
        if self.is_main:
            self.dir.mkdir(parents=True, exist_ok=True)
            for stale in self.dir.glob(TMP_PREFIX + "*"):
                shutil.rmtree(stale, ignore_errors=True)
        distributed.barrier()
        engine.save_checkpoint(str(self.dir), tag=tmp_tag, client_state=client_state, save_latest=False)
        distributed.barrier()  # every rank's shards are on disk
        if self.is_main:
            tmp = self.dir / tmp_tag
            (tmp / "config.yaml").write_text(config_yaml)
            if tokenizer_dir is not None and tokenizer_dir.is_dir():
                shutil.copytree(tokenizer_dir, tmp / "tokenizer", dirs_exist_ok=True)
            _fsync_tree(tmp)
            fault("kill_in_save", step)
            final = self.dir / tag
            if final.exists():  # the same step saved again (e.g. after a resume): move the old aside
                latest = self.dir / "latest"
                if latest.is_file() and latest.read_text().strip() == tag:
                    # `latest` must never name a folder that is moved aside: point it at the newest other
                    # complete checkpoint first (or drop it if there is none) until the new one is in place.
                    others = [t for t in complete_tags(self.dir) if t != tag]
                    if others:
                        self._write_latest(others[-1])
                    else:
                        latest.unlink()
                        _fsync_dir(self.dir)
                old = self.dir / (TMP_PREFIX + "old-" + tag)
                shutil.rmtree(old, ignore_errors=True)
                os.rename(final, old)
            os.rename(tmp, final)
            _fsync_dir(self.dir)
            self._write_latest(tag)
            shutil.rmtree(self.dir / (TMP_PREFIX + "old-" + tag), ignore_errors=True)
            self._prune(keep=tag)
        distributed.barrier()
        return tag

    def _write_latest(self, tag: str) -> None:
        """Atomically make `latest` name `tag` (write a temp file, fsync, rename, fsync the folder)."""
        latest_tmp = self.dir / "latest.tmp"
        with open(latest_tmp, "w") as f:
            f.write(tag)
            f.flush()
            os.fsync(f.fileno())
        os.replace(latest_tmp, self.dir / "latest")
        _fsync_dir(self.dir)

    def _prune(self, keep: str) -> None:
        tags = complete_tags(self.dir)
        for tag in tags[: max(len(tags) - self.keep_last, 0)]:
            if tag != keep:
                shutil.rmtree(self.dir / tag, ignore_errors=True)

    def prepare_resume(
        self, tag_dir: Path, config: Any, world: int, zero_stage: int, bf16: bool
    ) -> tuple[Path, bool]:
        """Check that `tag_dir` can be resumed by `config`'s model with `world` ranks at `zero_stage`
        (collective; call before the engine exists). Returns (folder to load, whether it is universal)."""
        layout = saved_layout(tag_dir)
        check_same_model(tag_dir, config)
        if self.is_main:  # the run directory is shared: one rank reads every file once
            verify_pickles(tag_dir)
        distributed.barrier()
        if (layout.shards > 0) != (zero_stage > 0) or layout.zero3 != (zero_stage == 3):
            saved = "0" if not layout.shards else ("3" if layout.zero3 else "1 or 2")
            raise LMStackError(
                f"train.zero_stage={zero_stage}: checkpoint {tag_dir} was saved with ZeRO stage {saved}; "
                "resume with that stage"
            )
        if layout.bf16 != bf16:
            raise LMStackError(
                f"train.precision: checkpoint {tag_dir} holds {'bf16' if layout.bf16 else 'fp32'} optimizer "
                f"states, this run is {'bf16' if bf16 else 'fp32'}; resume with the same precision"
            )
        if layout.shards in (0, world):
            return tag_dir, False
        universal = self.dir / f"{TMP_PREFIX}universal-{tag_dir.name}"
        if self.is_main:
            self.dir.mkdir(parents=True, exist_ok=True)
            try:
                _to_universal(tag_dir, universal)
            finally:
                distributed.barrier()  # the other ranks wait for the conversion (or its failure)
        else:
            distributed.barrier()
            if not (universal / CONVERTED).is_file():
                raise LMStackError(f"--resume: rank 0 could not convert {tag_dir} (see its error)")
        return universal, True

    def load(self, engine: Any, folder: Path, universal: bool = False) -> dict[str, Any]:
        """Load engine, optimizer and client state from the checkpoint `folder` (collective; `universal`:
        a folder made by `prepare_resume`). Returns the lmstack client state."""
        # DeepSpeed 0.19.8's ZeRO-3 universal load gives every parameter group the settings of group 0
        # (the no-decay group would get weight decay): the groups built for this run are put back. It
        # also hands one `step` tensor to every group's state, which Adam then advances once per group
        # per step (wrong bias correction from the next step on): each state gets its own copy.
        zero3 = universal and engine.zero_optimization_stage() == 3
        groups = [dict(g) for g in engine.optimizer.optimizer.param_groups] if zero3 else []
        path, client_state = engine.load_checkpoint(
            str(folder.parent), tag=folder.name, load_optimizer_states=True, load_lr_scheduler_states=False
        )
        for group, saved in zip(
            engine.optimizer.optimizer.param_groups if zero3 else [], groups, strict=True
        ):
            group.update(saved)
        for state in engine.optimizer.optimizer.state.values() if zero3 else []:
            if hasattr(state.get("step"), "clone"):
                state["step"] = state["step"].clone()
        if path is None or "lmstack" not in (client_state or {}):
            raise LMStackError(f"--resume: cannot load checkpoint {folder}")
        return client_state["lmstack"]
