"""launch/slurm.sbatch under a real SLURM (launch/local_slurm.sh: slurmctld and slurmd on this machine).

One job of 2 CPU ranks is requeued mid-run (`scontrol requeue`: SIGTERM, then SIGKILL after KillWait)
and hits a 2-minute time limit once (SLURM's SIGUSR1 warning, `--signal`); each time every rank saves at the
step it stopped at and the job starts again with `--resume auto` (a requeued job waits ~2 minutes
before it is eligible again: the test, an impatient user, moves its start time to now). The job
finishes on its own, and the per-step losses of the whole run equal an uninterrupted run's."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import REPO, base_overrides, env, losses, records, run_trainings

LOCAL_SLURM = REPO / "launch" / "local_slurm.sh"
STEPS = 200
NOISE = "loss_noise:0.1"


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    """SLURM_CONF of a running local cluster (started here, and stopped again, unless one was up)."""
    was_up = subprocess.run(["bash", str(LOCAL_SLURM), "status"], capture_output=True).returncode == 0
    if not was_up:
        start = subprocess.run(["bash", str(LOCAL_SLURM), "start"], capture_output=True, text=True)
        if start.returncode != 0:
            pytest.skip(f"no local SLURM cluster: {start.stderr.strip().splitlines()[-1]}")
    conf = subprocess.run(["bash", str(LOCAL_SLURM), "env"], capture_output=True, text=True).stdout
    yield conf.strip().split("=", 1)[1]
    if not was_up:
        subprocess.run(["bash", str(LOCAL_SLURM), "stop"], capture_output=True)


def overrides(data, run_dir):
    return base_overrides(data, run_dir, **{"train.max_steps": STEPS, "train.save_every": 100})


def job_state(job: str, slurm_env) -> str:
    out = subprocess.run(
        ["scontrol", "show", "job", job], env=slurm_env, capture_output=True, text=True
    ).stdout
    return out.split("JobState=", 1)[1].split()[0] if "JobState=" in out else "GONE"


def steps_alive(job: str) -> bool:
    """Whether a process of the job's last start (its batch script or step) still runs: a job started
    again before they are gone is refused by slurmd ("Job credential revoked")."""
    found = subprocess.run(["pgrep", "-f", rf"slurmstepd: \[{job}\."], capture_output=True)
    return found.returncode == 0


def wait_until(predicate, what: str, log: Path, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.5)
    tail = log.read_text()[-3000:] if log.is_file() else "(no log)"
    raise AssertionError(f"{what}: not within {timeout} s; job log:\n{tail}")


def test_requeue_and_time_limit_continue_exactly(slurm, tiny_data, tmp_path):
    reference = tmp_path / "reference"
    res = run_trainings([{"overrides": overrides(tiny_data, reference)}], nproc=2, fault=NOISE)
    assert res.returncode == 0, res.stderr[-3000:]

    run_dir, logs = tmp_path / "run", tmp_path / "logs"
    logs.mkdir()
    slurm_env = dict(
        env(f"step_delay:0.5,{NOISE}"),
        SLURM_CONF=slurm,
        NPROC_PER_NODE="2",
        PATH=os.pathsep.join([str(Path(sys.executable).parent), os.environ["PATH"]]),
    )
    submit = [
        "sbatch", "--parsable", f"--output={logs}/%x-%j.out", "--cpus-per-task=2",
        # a 2-minute limit, its warning nominally 30 s before (SLURM may send it up to 60 s earlier)
        "--time=2", "--signal=USR1@30",
        "launch/slurm.sbatch", *overrides(tiny_data, run_dir),
    ]  # fmt: skip
    job = subprocess.run(
        submit, env=slurm_env, cwd=REPO, capture_output=True, text=True, check=True
    ).stdout.strip()
    log = logs / f"lmstack-{job}.out"

    def scontrol(*args):
        subprocess.run(["scontrol", *args], env=slurm_env, check=True, capture_output=True)

    def steps_done():  # the file may not exist yet, or hold no train record yet
        return max((r["step"] for r in records(run_dir, "train")), default=0)

    def stops():
        return records(run_dir, "stop")

    try:
        # 1. requeued by hand at step 3 or so: SIGTERM to every process of the job
        wait_until(lambda: steps_done() >= 3, "step 3 of the first start", log)
        scontrol("requeue", job)
        wait_until(lambda: job_state(job, slurm_env) == "PENDING", "the requeued job pending", log)
        assert [s["signal"] for s in stops()] == ["SIGTERM"]
        wait_until(lambda: not steps_alive(job), "the first start's processes gone", log)
        scontrol("update", f"JobId={job}", "StartTime=now")
        # 2. the second start hits the time limit: SIGUSR1, the ranks save, the script requeues
        wait_until(lambda: len(stops()) == 2, "the time limit's stop", log, timeout=180)
        wait_until(
            lambda: job_state(job, slurm_env) == "PENDING", "the job requeued after its time limit", log
        )
        wait_until(lambda: not steps_alive(job), "the second start's processes gone", log)
        scontrol("update", f"JobId={job}", "TimeLimit=10", "StartTime=now")
        # 3. the third start finishes the run
        wait_until(lambda: job_state(job, slurm_env) == "COMPLETED", "the job completed", log, timeout=300)
    finally:
        subprocess.run(["scancel", job], env=slurm_env, capture_output=True)

    text = log.read_text()
    assert [s["signal"] for s in stops()] == ["SIGTERM", "SIGUSR1"]
    assert all(f"lmstack: job {job} start {n} on" in text for n in range(3)), text[-3000:]
    assert f"trained {STEPS} steps" in text
    # every step once in the end (steps after a stop's save are never lost), the same losses
    assert losses(run_dir) == losses(reference)
    first, second = stops()
    assert 0 < first["step"] < second["step"] < STEPS
