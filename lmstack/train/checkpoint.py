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
"""

from __future__ import annotations

import os
import re
import shutil
import signal
from pathlib import Path
from typing import Any

from lmstack.errors import LMStackError
from lmstack.train import distributed

TAG_RE = re.compile(r"^step_(\d+)$")
TMP_PREFIX = ".tmp-"


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

    def load(self, engine: Any, tag: str, directory: Path | None = None) -> dict[str, Any]:
        """Load engine, optimizer and client state from `tag` under `directory` (default: this run's
        checkpoints; collective). Returns the lmstack client state."""
        directory = self.dir if directory is None else Path(directory)
        path, client_state = engine.load_checkpoint(
            str(directory), tag=tag, load_optimizer_states=True, load_lr_scheduler_states=False
        )
        if path is None or "lmstack" not in (client_state or {}):
            raise LMStackError(f"--resume: cannot load checkpoint {directory / tag}")
        return client_state["lmstack"]
