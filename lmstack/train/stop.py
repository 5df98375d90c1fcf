"""Stopping on a signal (a preemption, a scheduler's time-limit warning) without losing a step.

`StopRequest` installs handlers for `train.stop_signals` (default SIGTERM and SIGUSR1) that only
note the signal. Before every step and after the last the ranks agree, with one all-reduce (MAX) of the signal number,
whether any of them has seen one: one rank may see the signal a step later than another, or alone,
so the stop is decided by a collective, never by a race. Every rank then leaves the loop at that same
step and saves a checkpoint exactly like a scheduled one (unless that very state was just saved), and
the process exits with `EXIT_STOPPED` (75, sysexits' EX_TEMPFAIL: "try again later"), which a launcher
takes as "requeue me". More signals change nothing (the note is taken once), so a second SIGTERM
during the save does not interrupt it, and as saves are atomic even a SIGKILL then leaves `latest`
naming a complete checkpoint (lmstack.train.checkpoint). A signal before the first step stops the
run before it trains: there is nothing new to save.

Under torchrun every worker exits 75, but torchrun itself exits 1 after it has forwarded a signal.
So a launcher that wants the distinction sets `LMSTACK_STOP_FILE` to a path: local rank 0 of every
node writes the stop record (JSON: step, signal, iteration, checkpoint) there after the save.
launch/torchrun.sh does so and exits 75 itself when the record is there; launch/slurm.sbatch runs it on
every node and requeues the job when the first node's record is there.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
from pathlib import Path
from typing import Any

from lmstack.train import distributed

EXIT_STOPPED = 75
STOP_FILE_ENV = "LMSTACK_STOP_FILE"


class StopRequest:
    """Notes the first of `signal_names` this process receives (while installed: use as a context
    manager, which restores the previous handlers on exit). Outside the main thread, where Python
    cannot install handlers, nothing is installed and no stop is ever requested."""

    def __init__(self, signal_names: list[str]) -> None:
        self.names = list(signal_names)
        self.seen: int = 0  # the signal number noted here, 0: none
        self._previous: dict[signal.Signals, Any] = {}

    def __enter__(self) -> StopRequest:
        if threading.current_thread() is threading.main_thread():
            for name in self.names:
                sig = signal.Signals[name]
                self._previous[sig] = signal.signal(sig, self._note)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _note(self, signum: int, frame: Any) -> None:
        if not self.seen:
            self.seen = signum

    def agreed(self) -> str | None:
        """Collective (every rank, the same step): the name of a signal some rank has seen, or None.
        Without stop signals configured (the same on every rank) there is nothing to agree on."""
        if not self.names:
            return None
        seen = distributed.reduce_int(self.seen, "max")
        return signal.Signals(seen).name if seen else None


def ignore_signals(signal_names: list[str]) -> None:
    """For a process on its way out with EXIT_STOPPED (`lmstack train`): a signal repeated now (a
    launcher's second SIGTERM) must not turn that exit into a death by signal. Ignored, not noted:
    Python resets its own handlers to the default when the interpreter shuts down, SIG_IGN it keeps."""
    for name in signal_names:
        signal.signal(signal.Signals[name], signal.SIG_IGN)


def write_stop_record(record: dict[str, Any]) -> None:
    """On local rank 0 of each node, when a launcher asked for it (`LMSTACK_STOP_FILE`): the stop
    record, written whole (temporary file, then rename) so that a launcher never reads half of it."""
    path = os.environ.get(STOP_FILE_ENV)
    if not path or os.environ.get("LOCAL_RANK", "0") != "0":
        return
    target = Path(path)
    tmp = target.with_name(target.name + ".tmp")
    try:
        tmp.write_text(json.dumps(record) + "\n")
        os.replace(tmp, target)
    except OSError as err:  # the checkpoint is saved: only the launcher's hint is lost
        print(
            f"lmstack train: warning: {STOP_FILE_ENV}={path}: cannot write the stop record: {err}",
            file=sys.stderr,
        )
