"""The run directory: writable, and written by one training at a time.

A second `lmstack train` on a run directory that a live training is writing (a double submission, a
requeue while the old job is still saving) would write the same checkpoints and metrics as the
first. `RunDirLock` prevents it: global rank 0 holds an exclusive `flock` on `RUN_DIR/.lmstack-train.lock`
for the whole run and writes its owner there (host, pid, SLURM job); a second training is refused
with one line naming that owner. The kernel drops the lock when its process ends in any way
(SIGKILL included), so a job that died never blocks its requeue; on NFS the server does so when the
dead client's lease expires (NFSv4: about 90 s). On a file system without `flock` support (some
Lustre mounts) training goes on without the lock, saying so.
"""

from __future__ import annotations

import errno
import json
import os
import socket
import sys
import time
from pathlib import Path

from lmstack.errors import LMStackError

LOCK_FILE = ".lmstack-train.lock"


def check_run_dir(run_dir: Path, rank: int) -> None:
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        probe = run_dir / f".write-test-{rank}-{os.getpid()}"
        probe.write_text("ok")
        probe.unlink()
    except OSError as err:
        raise LMStackError(f"train.run_dir: cannot write to '{run_dir}': {err.strerror or err}") from None


def _owner() -> dict[str, object]:
    owner: dict[str, object] = {"host": socket.gethostname(), "pid": os.getpid(), "since": time.time()}
    if "SLURM_JOB_ID" in os.environ:
        owner["slurm_job"] = os.environ["SLURM_JOB_ID"]
    return owner


def describe_owner(text: str) -> str:
    """'pid 1234 on host node7 (SLURM job 88), since 2026-12-02 10:00:05 UTC' from a lock file's text."""
    try:
        owner = json.loads(text)
        since = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(float(owner["since"])))
        job = f" (SLURM job {owner['slurm_job']})" if "slurm_job" in owner else ""
        return f"pid {owner['pid']} on host {owner['host']}{job}, since {since}"
    except (ValueError, KeyError, TypeError):
        return "owner unknown"


class RunDirLock:
    """Held by global rank `rank` 0 for the life of the `with` block (other ranks hold nothing)."""

    def __init__(self, run_dir: Path, rank: int) -> None:
        self.run_dir, self.rank = run_dir, rank
        self.path = run_dir / LOCK_FILE
        self._fd: int | None = None

    def __enter__(self) -> RunDirLock:
        import fcntl

        check_run_dir(self.run_dir, self.rank)
        if self.rank != 0:
            return self
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            text = os.pread(fd, 4096, 0).decode(errors="replace")
            os.close(fd)
            raise LMStackError(
                f"train.run_dir: '{self.run_dir}' is being written by another training ({describe_owner(text)}); "
                "wait for it to end or stop it, or choose another run_dir"
            ) from None
        except OSError as err:
            os.close(fd)
            if err.errno not in (errno.ENOLCK, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):
                raise
            print(
                f"lmstack train: warning: {self.path}: the file system does not support locks "
                f"({err.strerror}); nothing stops a second training from writing this run directory",
                file=sys.stderr,
            )
            return self
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(_owner()).encode(), 0)
        self._fd = fd
        return self

    def __exit__(self, *exc: object) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the only descriptor releases the flock
            self._fd = None
