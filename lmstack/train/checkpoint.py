"""Atomic, rotating DeepSpeed checkpoints under `RUN_DIR/checkpoints/` (the folder layout, the file
names and safe loading: `lmstack.checkpoint`), and resuming from them.

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
from collections.abc import Callable
from pathlib import Path
from typing import Any

from lmstack.checkpoint import (
    CHECKPOINTS_DIR,
    CONFIG_FILE,
    LATEST,
    TMP_PREFIX,
    TOKENIZER_DIR,
    complete_tags,
    find_tag_dir,
    latest_tag,
    saved_layout,
    tag_for,
    verify_pickles,
)
from lmstack.errors import LMStackError
from lmstack.train import distributed

CONVERTED = "lmstack-universal-done"  # written last into a universal conversion: it finished


def check_same_model(tag_dir: Path, config: Any) -> None:
    """LMStackError naming every `model.*` field in which `config` differs from the checkpoint's."""
    import dataclasses

    import yaml

    saved = (yaml.safe_load((tag_dir / CONFIG_FILE).read_text()) or {}).get("model", {})
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


def _attempt(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> OSError | RuntimeError | None:
    """Run `fn`; the OSError or RuntimeError (torch.save's disk-full error) it raised, else None."""
    try:
        fn(*args, **kwargs)
    except (OSError, RuntimeError) as err:
        return err
    return None


def resolve_resume(resume: str | None, ckpt_dir: Path) -> Path | None:
    """The checkpoint folder that `--resume` names, before anything is built. None (the default):
    start, refusing a run directory that already holds checkpoints; `auto`: the latest checkpoint in
    `ckpt_dir` if there is one; a path: a run directory, a checkpoints directory or one tag."""
    run_dir = ckpt_dir.parent
    if resume in (None, "none"):
        tag = latest_tag(ckpt_dir)
        if tag is not None:
            raise LMStackError(
                f"train.run_dir: '{run_dir}' already holds checkpoints (latest: {tag}); pass "
                f"--resume auto to continue that run, or choose another run_dir"
            )
        return None
    if resume == "auto":
        tag = latest_tag(ckpt_dir)
        return ckpt_dir / tag if tag is not None else None
    tag_dir = find_tag_dir(Path(resume))
    if tag_dir is None:
        raise LMStackError(f"--resume: '{resume}' is neither 'auto', a run directory nor a checkpoint folder")
    return tag_dir


class Checkpointer:
    """Saves checkpoints of a run into `RUN_DIR/checkpoints` and loads one back (every method is a
    collective: every rank calls it). `before_publish(step)`, if given, runs on rank 0 once a save's
    files are all written, before they are renamed into place (a fault-injection point of
    lmstack.train.faults)."""

    def __init__(
        self,
        run_dir: Path,
        keep_last: int,
        is_main: bool,
        before_publish: Callable[[int], None] | None = None,
    ) -> None:
        self.dir = run_dir / CHECKPOINTS_DIR
        self.keep_last = keep_last
        self.is_main = is_main
        self.before_publish = before_publish or (lambda step: None)

    def save(
        self,
        engine: Any,
        step: int,
        client_state: dict[str, Any],
        config_yaml: str,
        tokenizer_dir: Path | None,
    ) -> str:
        """Save on every rank (collective). Returns the tag. A save that fails on any rank (disk full,
        permission) fails on every rank with one LMStackError; `latest` still names the previous
        checkpoint and the unfinished folder is removed."""
        tag = tag_for(step)
        tmp = self.dir / (TMP_PREFIX + tag)
        self._agree_saved(_attempt(self._clear_leftovers) if self.is_main else None, tmp)
        error = _attempt(
            engine.save_checkpoint, str(self.dir), tag=tmp.name, client_state=client_state, save_latest=False
        )
        if error is not None:
            # DeepSpeed's save ends in a barrier, which the other ranks may be waiting in: meet them there.
            distributed.barrier()
        self._agree_saved(error, tmp)  # every rank's shards are on disk
        error = None
        if self.is_main:
            error = _attempt(self._finish, tmp, tag, step, config_yaml, tokenizer_dir)
        self._agree_saved(error, tmp)
        return tag

    def _clear_leftovers(self) -> None:
        """Rank 0, before a save: the checkpoints folder exists, without unfinished saves in it."""
        self.dir.mkdir(parents=True, exist_ok=True)
        for stale in self.dir.glob(TMP_PREFIX + "*"):
            shutil.rmtree(stale, ignore_errors=True)

    def _finish(self, tmp: Path, tag: str, step: int, config_yaml: str, tokenizer_dir: Path | None) -> None:
        """Rank 0: complete the folder every rank has written and publish it."""
        (tmp / CONFIG_FILE).write_text(config_yaml)
        if tokenizer_dir is not None and tokenizer_dir.is_dir():
            shutil.copytree(tokenizer_dir, tmp / TOKENIZER_DIR, dirs_exist_ok=True)
        _fsync_tree(tmp)
        self.before_publish(step)
        self._publish(tmp, tag)
        self._prune(keep=tag)

    def _agree_saved(self, error: OSError | RuntimeError | None, tmp: Path) -> None:
        """Collective: go on if every rank's part of the save succeeded; else remove the unfinished
        folder and raise on every rank, naming the failure (on the ranks where it happened)."""
        if distributed.reduce_int(error is None, "min"):
            return
        if self.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
        latest = latest_tag(self.dir)
        kept = (
            f"the latest checkpoint is still {self.dir / latest}"
            if latest
            else "no checkpoint was saved before"
        )
        if error is None:
            raise LMStackError(
                f"train.run_dir: another rank could not save checkpoint {tmp.name} (see its error); {kept}"
            )
        free = shutil.disk_usage(self.dir).free if self.dir.exists() else 0
        if isinstance(error, OSError):
            reason = error.strerror or str(error)
        else:  # torch.save's writer reports a short write as "[enforce fail at ...] . unexpected pos ..."
            reason = re.sub(r"^\[enforce fail at [^\]]*\][\s.]*", "", str(error).splitlines()[0])
            if free < 2**20:
                reason = f"the disk is full (torch.save: {reason})"
        raise LMStackError(
            f"train.run_dir: cannot save checkpoint {tmp.name} in '{self.dir}': {reason} "
            f"({free / 2**20:,.1f} MiB free there); {kept}"
        )

    def _publish(self, tmp: Path, tag: str) -> None:
        """Rename the finished folder `tmp` to `tag` and point `latest` at it; at no moment does
        `latest` name a missing or unfinished folder."""
        final = self.dir / tag
        old = self.dir / (TMP_PREFIX + "old-" + tag)
        if final.exists():  # the same step saved again (e.g. after a resume): move the old aside
            latest = self.dir / LATEST
            if latest.is_file() and latest.read_text().strip() == tag:
                # `latest` must never name a folder that is moved aside: point it at the newest other
                # complete checkpoint first (or drop it if there is none) until the new one is in place.
                others = [t for t in complete_tags(self.dir) if t != tag]
                if others:
                    self._write_latest(others[-1])
                else:
                    latest.unlink()
                    _fsync_dir(self.dir)
            shutil.rmtree(old, ignore_errors=True)
            os.rename(final, old)
        os.rename(tmp, final)
        _fsync_dir(self.dir)
        self._write_latest(tag)
        shutil.rmtree(old, ignore_errors=True)

    def _write_latest(self, tag: str) -> None:
        """Atomically make `latest` name `tag` (write a temp file, fsync, rename, fsync the folder)."""
        latest_tmp = self.dir / (LATEST + ".tmp")
        with open(latest_tmp, "w") as f:
            f.write(tag)
            f.flush()
            os.fsync(f.fileno())
        os.replace(latest_tmp, self.dir / LATEST)
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
