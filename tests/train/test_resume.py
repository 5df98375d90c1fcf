"""Checkpoints: SIGKILL + `--resume auto` continues exactly; a save killed half-way leaves the previous
checkpoint loadable; the last K are kept; export's files sit next to DeepSpeed's."""

from __future__ import annotations

import signal

import pytest
from conftest import base_overrides, cli_train, losses, run_trainings

STEPS = 8


@pytest.fixture(scope="module")
def reference(tiny_data, tmp_path_factory):
    """The uninterrupted run (ZeRO 1, 2 accumulation steps, checkpoints every 3 steps)."""
    run_dir = tmp_path_factory.mktemp("ref") / "run"
    res = run_trainings([{"overrides": overrides(tiny_data, run_dir)}])
    assert res.returncode == 0, res.stderr[-3000:]
    return run_dir


def overrides(data, run_dir, **extra):
    values = {"train.max_steps": STEPS, "train.save_every": 3, "train.keep_last": 2, "train.zero_stage": 1}
    values.update(extra)
    return base_overrides(data, run_dir, **values)


def test_sigkill_and_resume_gives_the_same_losses(tiny_data, tmp_path, reference):
    run_dir = tmp_path / "run"
    killed = cli_train(overrides(tiny_data, run_dir), fault="kill_at_step:5")
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert (run_dir / "checkpoints" / "latest").read_text() == "step_00000003"
    assert max(losses(run_dir)) == 5  # steps 4 and 5 were done, then lost
    resumed = cli_train(overrides(tiny_data, run_dir), "--resume", "auto")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    expected, got = losses(reference), losses(run_dir)
    assert sorted(got) == list(range(1, STEPS + 1))
    assert got == expected  # exactly, step for step (fp32 on CPU)


def test_save_killed_half_way_leaves_previous_checkpoint(tiny_data, tmp_path, reference):
    run_dir = tmp_path / "run"
    ckpts = run_dir / "checkpoints"
    killed = cli_train(overrides(tiny_data, run_dir), fault="kill_in_save:6")
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    # DeepSpeed's files of step 6 were written under a temporary tag, never renamed or made latest.
    assert (ckpts / ".tmp-step_00000006").is_dir()
    assert not (ckpts / "step_00000006").exists()
    assert (ckpts / "latest").read_text() == "step_00000003"
    # The previous checkpoint loads, and the run continues exactly.
    resumed = cli_train(overrides(tiny_data, run_dir), "--resume", "auto")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert losses(run_dir) == losses(reference)
    assert not list(ckpts.glob(".tmp-*"))
    # keep_last=2; export's files next to DeepSpeed's
    assert sorted(p.name for p in ckpts.iterdir() if p.is_dir()) == ["step_00000006", "step_00000008"]
    last = ckpts / "step_00000008"
    assert (last / "config.yaml").is_file() and (last / "tokenizer" / "tokenizer.json").is_file()
    assert (ckpts / "latest").read_text() == "step_00000008"


def test_refuses_to_overwrite_a_run_without_resume(tiny_data, reference):
    res = cli_train(overrides(tiny_data, reference))
    assert res.returncode == 2
    assert "already holds checkpoints" in res.stderr and "--resume auto" in res.stderr
    assert "Traceback" not in res.stderr


def test_resaving_the_latest_step_never_leaves_latest_dangling(tmp_path, monkeypatch):
    """Saving the step `latest` already names (after `--resume PATH` to an older tag): a kill between
    moving the old folder aside and renaming the new one in must leave `latest` naming a complete tag."""
    import os

    from lmstack.train import checkpoint as ckpt

    monkeypatch.setattr(ckpt.distributed, "barrier", lambda: None)

    class Engine:
        def save_checkpoint(self, directory, tag, client_state, save_latest):
            (ckpt.Path(directory) / tag).mkdir(parents=True)

    saver = ckpt.Checkpointer(tmp_path, keep_last=5, is_main=True)
    for step in (3, 6):
        saver.save(Engine(), step, {}, "x: 1\n", None)
    assert ckpt.latest_tag(saver.dir) == "step_00000006"

    real_rename, renames = os.rename, []

    def killed_after_move_aside(src, dst):
        renames.append(dst)
        if len(renames) == 2:
            raise KeyboardInterrupt  # stands in for the kill
        real_rename(src, dst)

    monkeypatch.setattr(ckpt.os, "rename", killed_after_move_aside)
    with pytest.raises(KeyboardInterrupt):
        saver.save(Engine(), 6, {}, "x: 1\n", None)
    tag = ckpt.latest_tag(saver.dir)  # raises if `latest` names a missing folder
    assert tag == "step_00000003" and (saver.dir / tag / "config.yaml").is_file()
