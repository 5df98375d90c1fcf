"""Stopping on a signal (lmstack.train.stop), one writer per run directory, failed saves.

A stop signal makes every rank finish its step and save at the same step; the process exits 75 and
`--resume auto` continues as if nothing happened: the losses equal an uninterrupted run's, step for
step (every run draws random numbers in each step, `loss_noise`, so a resume that lost any RNG or
reader state would differ)."""

from __future__ import annotations

import json
import os
import random
import signal
import socket
import subprocess
import sys
import time

import pytest
from conftest import REPO, base_overrides, cli_train, env, losses, records, run_trainings

from lmstack.checkpoint import complete_tags, tag_for
from lmstack.train.stop import EXIT_STOPPED

NOISE = "loss_noise:0.1"
STEPS = 16


def overrides(data, run_dir, **extra):
    values = {"train.max_steps": STEPS, "train.save_every": 100, "train.zero_stage": 1}
    values.update(extra)
    return base_overrides(data, run_dir, **values)


def wait_for_step(run_dir, step, proc, timeout=120):
    """Block until `run_dir`'s metrics hold a train record of `step` (the run still going)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, "the run ended before the signal"
        if any(r["step"] >= step for r in records(run_dir, "train")):
            return
        time.sleep(0.02)
    raise AssertionError(f"no train record of step {step} within {timeout} s")


def launch(args, run_dir, fault=None, **extra_env):
    """launch/torchrun.sh with 2 processes on one node, as a user runs it."""
    cmd = ["bash", str(REPO / "launch" / "torchrun.sh"), *args]
    proc_env = {**env(fault), "NPROC_PER_NODE": "2", **extra_env}
    return subprocess.Popen(
        cmd,
        env=proc_env,
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # its own process group, signalled as a whole below
    )


@pytest.fixture(scope="module")
def reference_2ranks(tiny_data, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("ref2") / "run"
    res = run_trainings([{"overrides": overrides(tiny_data, run_dir)}], nproc=2, fault=NOISE)
    assert res.returncode == 0, res.stderr[-3000:]
    return run_dir


@pytest.fixture(scope="module")
def reference_1rank(tiny_data, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("ref1") / "run"
    res = run_trainings(
        [{"overrides": overrides(tiny_data, run_dir, **{"train.save_every": 3})}], fault=NOISE
    )
    assert res.returncode == 0, res.stderr[-3000:]
    return run_dir


def test_sigterm_to_torchrun_saves_at_that_step_and_resumes_exactly(tiny_data, tmp_path, reference_2ranks):
    run_dir = tmp_path / "run"
    at = random.Random().randint(2, STEPS - 6)  # seen in the assertion messages when it fails
    proc = launch(overrides(tiny_data, run_dir), run_dir, fault=f"step_delay:1.0,{NOISE}")
    wait_for_step(run_dir, at, proc)
    torchrun = subprocess.run(
        ["pgrep", "-P", str(proc.pid), "-f", "torchrun"], capture_output=True, text=True
    )
    os.kill(int(torchrun.stdout.split()[0]), signal.SIGTERM)
    for _ in range(3):  # then, as SLURM and srun do, to the script and torchrun again, repeatedly
        time.sleep(0.3)
        os.killpg(proc.pid, signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == EXIT_STOPPED, f"signal after step {at}: {err[-3000:]}"
    # The ranks stopped after the step in flight when the signal came (no scheduled save is due).
    stopped = max(losses(run_dir))
    assert stopped in (at, at + 1), f"signal after step {at}, stopped at {stopped}"
    ckpts = run_dir / "checkpoints"
    assert (ckpts / "latest").read_text() == tag_for(stopped)
    assert complete_tags(ckpts) == [tag_for(stopped)] and not list(ckpts.glob(".tmp-*"))
    (stop,) = records(run_dir, "stop")
    assert stop["step"] == stopped and stop["signal"] == "SIGTERM"
    assert f"SIGTERM: stopped at step {stopped} (checkpoint {tag_for(stopped)})" in out

    resumed = launch(overrides(tiny_data, run_dir), run_dir, fault=NOISE)
    out, err = resumed.communicate(timeout=180)
    assert resumed.returncode == 0, err[-3000:]
    assert losses(run_dir) == losses(reference_2ranks)  # exactly, step for step


def test_a_signal_during_a_scheduled_save_stops_at_that_save(tiny_data, tmp_path, reference_1rank):
    """The signal arrives inside the save of step 3: that save completes and is the stop's checkpoint
    (the state it holds is the one the run stops at: nothing is saved twice)."""
    run_dir = tmp_path / "run"
    ov = overrides(tiny_data, run_dir, **{"train.save_every": 3})
    res = cli_train(ov, fault=f"term_in_save:3,{NOISE}")
    assert res.returncode == EXIT_STOPPED, res.stderr[-3000:]
    assert max(losses(run_dir)) == 3 and (run_dir / "checkpoints" / "latest").read_text() == tag_for(3)
    assert [r["step"] for r in records(run_dir, "stop")] == [3]
    assert not list((run_dir / "checkpoints").glob(".tmp-*"))
    resumed = cli_train(ov, "--resume", "auto", fault=NOISE)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert losses(run_dir) == losses(reference_1rank)


def test_a_second_signal_during_the_stop_save_changes_nothing(tiny_data, tmp_path, reference_1rank):
    run_dir = tmp_path / "run"
    ov = overrides(tiny_data, run_dir, **{"train.save_every": 3})
    res = cli_train(ov, fault=f"term_at_step:5,term_in_save:5,{NOISE}")
    assert res.returncode == EXIT_STOPPED, res.stderr[-3000:]
    ckpts = run_dir / "checkpoints"
    assert (ckpts / "latest").read_text() == tag_for(5)
    assert (ckpts / tag_for(5) / "config.yaml").is_file() and not list(ckpts.glob(".tmp-*"))
    resumed = cli_train(ov, "--resume", "auto", fault=NOISE)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert losses(run_dir) == losses(reference_1rank)


def test_a_signal_during_the_last_step_still_reports_a_stop(tiny_data, tmp_path):
    """Training is complete, but the launcher was told to stop: exit 75 (torchrun would exit 1 after
    the signal in any case), and the next start finds nothing left to do."""
    run_dir = tmp_path / "run"
    ov = overrides(tiny_data, run_dir, **{"train.max_steps": 4})
    res = cli_train(ov, fault="term_at_step:4")
    assert res.returncode == EXIT_STOPPED, res.stderr[-3000:]
    assert [r["step"] for r in records(run_dir, "stop")] == [4]
    assert complete_tags(run_dir / "checkpoints") == [tag_for(4)]
    again = cli_train(ov, "--resume", "auto")
    assert again.returncode == 0 and "trained 4 steps" in again.stdout, again.stderr[-3000:]
    assert complete_tags(run_dir / "checkpoints") == [tag_for(4)] and max(losses(run_dir)) == 4


def test_a_signal_before_the_first_step_stops_cleanly(tiny_data, tmp_path):
    run_dir = tmp_path / "run"
    res = run_trainings([{"overrides": overrides(tiny_data, run_dir), "source": "term_at_start"}])
    assert res.returncode == 0, res.stderr[-3000:]
    summary = json.loads(res.stdout.split("SUMMARY ", 1)[1].splitlines()[0])
    assert summary["stopped_by"] == "SIGTERM" and summary["step"] == 0 and summary["checkpoint"] is None
    assert not (run_dir / "checkpoints").exists() and not records(run_dir, "train")


def test_stop_signals_can_be_turned_off(tiny_data, tmp_path):
    """With train.stop_signals=[] a SIGTERM keeps its default action: the process dies at once."""
    res = cli_train(
        overrides(tiny_data, tmp_path / "run", **{"train.stop_signals": []}), fault="term_at_step:2"
    )
    assert res.returncode == -signal.SIGTERM, res.stderr[-2000:]


def test_a_second_training_on_a_live_run_dir_is_refused(tiny_data, tmp_path):
    run_dir = tmp_path / "run"
    ov = overrides(tiny_data, run_dir, **{"train.save_every": 2})
    first = subprocess.Popen(
        [sys.executable, "-m", "lmstack.cli", "train", *ov],
        env=env("step_delay:0.5"),
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_for_step(run_dir, 2, first)
        second = cli_train(ov, "--resume", "auto")
        assert second.returncode == 2
        line = second.stderr.strip().splitlines()[-1]
        assert line.startswith(
            f"lmstack train: error: train.run_dir: '{run_dir}' is being written by another training "
            f"(pid {first.pid} on host {socket.gethostname()}, since "
        ), second.stderr
    finally:
        first.kill()  # SIGKILL: the lock goes with the process
        first.wait()
    third = cli_train(ov, "--resume", "auto")
    assert third.returncode == 0, third.stderr[-3000:]
    assert max(losses(run_dir)) == STEPS


def test_a_save_that_fails_stops_the_run_and_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    """Disk full in DeepSpeed's writes (any rank) or in rank 0's publishing: one line naming the
    folder and the reason; `latest` keeps naming the previous checkpoint, the unfinished folder goes."""
    import errno

    from lmstack.errors import LMStackError
    from lmstack.train import checkpoint as ckpt

    monkeypatch.setattr(ckpt.distributed, "barrier", lambda: None)
    monkeypatch.setattr(ckpt.distributed, "reduce_int", lambda value, op: int(value))

    class Engine:
        full = False

        def save_checkpoint(self, directory, tag, client_state, save_latest):
            (ckpt.Path(directory) / tag).mkdir(parents=True)
            if self.full:
                raise OSError(errno.ENOSPC, "No space left on device")

    saver = ckpt.Checkpointer(tmp_path, keep_last=5, is_main=True)
    engine = Engine()
    saver.save(engine, 3, {}, "x: 1\n", None)
    engine.full = True
    with pytest.raises(LMStackError) as err:
        saver.save(engine, 6, {}, "x: 1\n", None)
    message = str(err.value)
    assert message.startswith(
        f"train.run_dir: cannot save checkpoint .tmp-step_00000006 in '{saver.dir}': No space left on device ("
    )
    assert (
        message.endswith(f"the latest checkpoint is still {saver.dir / 'step_00000003'}")
        and "\n" not in message
    )
    assert sorted(p.name for p in saver.dir.iterdir()) == ["latest", "step_00000003"]  # nothing else

    engine.full = False  # now the tokenizer copy of rank 0's publishing phase fails
    with pytest.raises(LMStackError, match="cannot save checkpoint .tmp-step_00000009 .*: Permission denied"):
        monkeypatch.setattr(
            ckpt.shutil, "copytree", _raise(PermissionError(errno.EACCES, "Permission denied"))
        )
        saver.save(engine, 9, {}, "x: 1\n", tmp_path)
    assert ckpt.latest_tag(saver.dir) == "step_00000003" and not list(saver.dir.glob(".tmp-*"))


def _raise(error):
    def fail(*args, **kwargs):
        raise error

    return fail


@pytest.fixture
def small_disk(tmp_path):
    """A 1 MiB tmpfs: room for one checkpoint of the tiny model, not two (needs root)."""
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs to fill needs root")
    mount = tmp_path / "disk"
    mount.mkdir()
    res = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount)], capture_output=True)
    if res.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {res.stderr.decode().strip()}")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


def test_disk_full_during_a_save_on_two_ranks(tiny_data, small_disk):
    run_dir = small_disk / "run"
    ov = overrides(tiny_data, run_dir, **{"train.save_every": 2, "train.keep_last": 3})
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone",
           "-m", "lmstack.cli", "train", *ov]  # fmt: skip
    res = subprocess.run(cmd, env=env(), capture_output=True, text=True, timeout=180, cwd=REPO)
    assert res.returncode != 0
    (line,) = [line for line in res.stderr.splitlines() if "cannot save checkpoint" in line][:1]
    assert "the disk is full" in line or "No space left on device" in line, res.stderr[-3000:]
    ckpts = run_dir / "checkpoints"
    latest = (ckpts / "latest").read_text()
    assert line.rstrip().endswith(str(ckpts / latest)) and not list(ckpts.glob(".tmp-*"))
    assert (ckpts / latest / "config.yaml").is_file()


def test_a_signal_to_one_of_two_nodes_stops_both_at_one_step(tiny_data, tmp_path):
    """Two launch/torchrun.sh "nodes" of one rank each (c10d rendezvous on localhost), one sequence-
    parallel group across them: SIGUSR1 to one node's torchrun only; both nodes stop at the same step
    (the agreement is a collective), both exit 75, and the resumed run equals an uninterrupted one."""
    sp = {"parallel.sequence_parallel_size": 2}
    reference = tmp_path / "reference"
    res = run_trainings([{"overrides": overrides(tiny_data, reference, **sp)}], nproc=2, fault=NOISE)
    assert res.returncode == 0, res.stderr[-3000:]

    run_dir = tmp_path / "run"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = str(s.getsockname()[1])

    def two_nodes(fault):
        nodes = dict(NNODES="2", NPROC_PER_NODE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
        return [launch(overrides(tiny_data, run_dir, **sp), run_dir, fault, **nodes) for _ in range(2)]

    first, second = two_nodes(f"step_delay:1.0,{NOISE}")
    wait_for_step(run_dir, 3, first)
    torchrun = subprocess.run(
        ["pgrep", "-P", str(first.pid), "-f", "torchrun"], capture_output=True, text=True
    )
    os.kill(int(torchrun.stdout.split()[0]), signal.SIGUSR1)
    for node in (first, second):
        _, err = node.communicate(timeout=120)
        assert node.returncode == EXIT_STOPPED, err[-3000:]
    stopped = max(losses(run_dir))
    assert [r["step"] for r in records(run_dir, "stop")] == [stopped]
    assert complete_tags(run_dir / "checkpoints") == [tag_for(stopped)]

    for node in two_nodes(NOISE):
        _, err = node.communicate(timeout=180)
        assert node.returncode == 0, err[-3000:]
    assert losses(run_dir) == losses(reference)
