"""Checkpoints: SIGKILL + `--resume auto` continues exactly; a save killed half-way leaves the previous
checkpoint loadable; the last K are kept; export's files sit next to DeepSpeed's.

Every run here draws random numbers in each step (the `loss_noise` test hook scales each micro-batch's
loss by 1 + 0.1 u, u from torch's global RNG), so a resume that did not restore the RNG would give
other losses after the resume (checked: with `_set_rng_state` made a no-op the SIGKILL test fails
from step 4 on)."""

from __future__ import annotations

import signal

import pytest
from conftest import base_overrides, cli_train, losses, run_trainings

STEPS = 8
NOISE = "loss_noise:0.1"


@pytest.fixture(scope="module")
def reference(tiny_data, tmp_path_factory):
    """The uninterrupted run (ZeRO 1, 2 accumulation steps, checkpoints every 3 steps)."""
    run_dir = tmp_path_factory.mktemp("ref") / "run"
    res = run_trainings([{"overrides": overrides(tiny_data, run_dir)}], fault=NOISE)
    assert res.returncode == 0, res.stderr[-3000:]
    return run_dir


def overrides(data, run_dir, **extra):
    values = {"train.max_steps": STEPS, "train.save_every": 3, "train.keep_last": 2, "train.zero_stage": 1}
    values.update(extra)
    return base_overrides(data, run_dir, **values)


def test_sigkill_and_resume_gives_the_same_losses(tiny_data, tmp_path, reference):
    run_dir = tmp_path / "run"
    killed = cli_train(overrides(tiny_data, run_dir), fault=f"kill_at_step:5,{NOISE}")
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert (run_dir / "checkpoints" / "latest").read_text() == "step_00000003"
    assert max(losses(run_dir)) == 5  # steps 4 and 5 were done, then lost
    resumed = cli_train(overrides(tiny_data, run_dir), "--resume", "auto", fault=NOISE)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    expected, got = losses(reference), losses(run_dir)
    assert sorted(got) == list(range(1, STEPS + 1))
    assert got == expected  # exactly, step for step (fp32 on CPU)


def test_save_killed_half_way_leaves_previous_checkpoint(tiny_data, tmp_path, reference):
    run_dir = tmp_path / "run"
    ckpts = run_dir / "checkpoints"
    killed = cli_train(overrides(tiny_data, run_dir), fault=f"kill_in_save:6,{NOISE}")
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    # DeepSpeed's files of step 6 were written under a temporary tag, never renamed or made latest.
    assert (ckpts / ".tmp-step_00000006").is_dir()
    assert not (ckpts / "step_00000006").exists()
    assert (ckpts / "latest").read_text() == "step_00000003"
    # The previous checkpoint loads, and the run continues exactly.
    resumed = cli_train(overrides(tiny_data, run_dir), "--resume", "auto", fault=NOISE)
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
    monkeypatch.setattr(ckpt.distributed, "reduce_int", lambda value, op: int(value))

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


# -- what cannot be resumed: one line each, before anything is loaded ---------------------------------


def test_resume_with_another_model_names_the_field(tiny_data, tmp_path, reference):
    res = cli_train(
        overrides(tiny_data, tmp_path / "run", **{"model.n_layers": 3}),
        "--resume",
        str(reference / "checkpoints" / "step_00000006"),
    )
    assert res.returncode == 2, res.stderr[-3000:]
    line = res.stderr.strip().splitlines()[-1]
    assert line.startswith("lmstack train: error: --resume: the configured model differs from checkpoint")
    assert "model.n_layers=3 (checkpoint: 2)" in line and "Traceback" not in res.stderr


@pytest.fixture
def tag_copy(reference, tmp_path, monkeypatch):
    """A copy of the reference's last checkpoint (ZeRO 1, 1 rank), its config, and a Checkpointer
    whose collectives are no-ops (one process, no process group)."""
    import shutil

    from lmstack.config import load_config
    from lmstack.train import checkpoint as ckpt

    monkeypatch.setattr(ckpt.distributed, "barrier", lambda: None)
    tag = tmp_path / "checkpoints" / "step_00000006"
    shutil.copytree(reference / "checkpoints" / "step_00000006", tag)
    return tag, load_config(tag / "config.yaml"), ckpt.Checkpointer(tmp_path / "run", 2, is_main=True)


def test_a_complete_checkpoint_of_the_same_layout_loads_as_it_is(tag_copy):
    tag, config, saver = tag_copy
    assert saver.prepare_resume(tag, config, world=1, zero_stage=1, bf16=False) == (tag, False)


@pytest.mark.parametrize(
    "damage,message",
    [
        ("drop_model_states", "is incomplete: mp_rank_00_model_states.pt is missing"),
        ("drop_config", "is incomplete: config.yaml is missing"),
        ("shard_of_rank_1_only", "is incomplete: optimizer shards of ranks [1]"),
    ],
)
def test_incomplete_checkpoint(tag_copy, damage, message):
    from lmstack.errors import LMStackError

    tag, config, saver = tag_copy
    if damage == "drop_model_states":
        (tag / "mp_rank_00_model_states.pt").unlink()
    elif damage == "drop_config":
        (tag / "config.yaml").unlink()
    else:
        shard = tag / "zero_pp_rank_0_mp_rank_00_optim_states.pt"
        shard.rename(tag / "zero_pp_rank_1_mp_rank_00_optim_states.pt")
    with pytest.raises(LMStackError) as err:
        saver.prepare_resume(tag, config, world=1, zero_stage=1, bf16=False)
    assert message in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize(
    "zero,bf16,message",
    [
        (0, False, "train.zero_stage=0: checkpoint"),  # ZeRO 0 cannot take ZeRO shards
        (3, False, "train.zero_stage=3: checkpoint"),
        (1, True, "train.precision: checkpoint"),
    ],
)
def test_layouts_that_cannot_be_resumed(tag_copy, zero, bf16, message):
    from lmstack.errors import LMStackError

    tag, config, saver = tag_copy
    with pytest.raises(LMStackError, match=message):
        saver.prepare_resume(tag, config, world=2, zero_stage=zero, bf16=bf16)


# -- safe loading: a checkpoint whose pickle would run code is refused, the code never runs ------------


class Payload:
    """Unpickling this runs a shell command (what a tampered checkpoint could do)."""

    def __init__(self, marker) -> None:
        self.marker = marker

    def __reduce__(self):
        import os

        return (os.system, (f"touch {self.marker}",))


def _plant(tag, marker):
    import torch

    path = tag / "mp_rank_00_model_states.pt"
    state = torch.load(path, map_location="cpu", weights_only=False)  # our own file, trusted here
    state["module"]["payload"] = Payload(marker)
    torch.save(state, path)


def test_resume_refuses_a_pickle_that_runs_code(tag_copy, tmp_path):
    from lmstack.errors import LMStackError

    tag, config, saver = tag_copy
    marker = tmp_path / "pwned"
    _plant(tag, marker)
    with pytest.raises(
        LMStackError, match=r"mp_rank_00_model_states\.pt: refusing to load: its pickle calls \S*system"
    ):
        saver.prepare_resume(tag, config, world=1, zero_stage=1, bf16=False)
    assert not marker.exists()


def test_export_refuses_a_pickle_that_runs_code(tag_copy, tmp_path, capsys):
    from lmstack.cli import main

    tag, _, _ = tag_copy
    marker = tmp_path / "pwned"
    _plant(tag, marker)
    with pytest.raises(SystemExit) as exit_:
        main(["export", str(tag), str(tmp_path / "hf")])
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("lmstack export: error: ") and "refusing to load" in err and "\n" not in err
    assert not marker.exists() and not (tmp_path / "hf").exists()
