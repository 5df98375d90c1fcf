"""prepare-data split over parts (`--part I/N`, merge), blocks of inputs, parallel readers."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from data_helpers import data_cfg, make_docs, shard_documents, write_jsonl

from lmstack.cli import main
from lmstack.data import load_data_tokenizer, load_index, prepare_data
from lmstack.data.prepare import Task, block_owner, deal, merge_parts, part_tasks, prepare_tokenizer
from lmstack.errors import LMStackError

REPO = Path(__file__).resolve().parents[2]
BLOCK_DOCS = 25
VAL_FRACTION = 0.1  # every 10th document of an input goes to val


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, prepared):
    """Three inputs of 70, 18 and 55 documents (one compressed), and a tokenizer.json to share."""
    root = tmp_path_factory.mktemp("parts_inputs")
    docs = [make_docs(70, seed=11), make_docs(18, seed=12), make_docs(55, seed=13)]
    files = [
        write_jsonl(root / "a.jsonl", docs[0]),
        write_jsonl(root / "b.jsonl.zst", docs[1]),
        write_jsonl(root / "c.jsonl", docs[2]),
    ]
    tok = shutil.copy(Path(prepared[0].path) / "tokenizer.json", root / "tok.json")
    return files, docs, tok


def cfg_for(inputs, path, **kw):
    files, _, tok = inputs
    return data_cfg(
        path,
        "jsonl",
        {"inputs": [str(f) for f in files]},
        tokenizer=str(tok),
        block_docs=BLOCK_DOCS,
        val_fraction=VAL_FRACTION,
        **kw,
    )


def index_body(index) -> dict:
    """The index without what depends on how the folder was prepared (timings, counts of runs)."""
    body = index.to_json()
    return {k: v for k, v in body.items() if k not in ("stats", "checksum")}


def shard_bytes(index) -> dict[str, bytes]:
    return {
        f: (index.path / f).read_bytes()
        for split in ("train", "val")
        for info in index.shards(split)
        for f in (info.bin_file, info.docs_file)
    }


def assert_same_folder(got, want) -> None:
    assert index_body(got) == index_body(want)
    assert index_body(load_index(got.path)) == index_body(want)
    for split in ("train", "val"):
        assert got.fingerprint(split) == want.fingerprint(split)
        assert [d.tolist() for d in shard_documents(got, split)] == [
            d.tolist() for d in shard_documents(want, split)
        ]
    assert shard_bytes(got) == shard_bytes(want)
    assert load_index(got.path).verify(full=True) == []


@pytest.fixture(scope="module")
def one_go(inputs, tmp_path_factory):
    """The reference: all inputs prepared in one go by two worker processes."""
    return prepare_data(
        cfg_for(inputs, tmp_path_factory.mktemp("one_go") / "d", num_workers=2), progress=False
    )


def test_one_go_layout_follows_inputs_and_blocks(inputs, one_go):
    """Independent of the implementation's rule: document k of each input goes to val when k % 10 == 9,
    inputs in order; every shard holds the documents of one block of one input."""
    _, docs, _ = inputs
    want = {"train": [], "val": []}
    for input_docs in docs:
        for k, d in enumerate(input_docs):
            want["val" if k % 10 == 9 else "train"].append(d)
    tok = load_data_tokenizer(one_go.path)
    for split in ("train", "val"):
        assert [tok.decode(d[:-1]) for d in shard_documents(one_go, split)] == want[split]
    blocks = {tuple(int(x) for x in s.name.split("-")[1:3]) for s in one_go.shards("train")}
    assert blocks == {(0, 0), (0, 1), (0, 2), (1, 0), (2, 0), (2, 1), (2, 2)}  # ceil(70/25), 1, ceil(55/25)
    assert one_go.num_documents("train") + one_go.num_documents("val") == sum(len(d) for d in docs)


@pytest.mark.parametrize("parts", [2, 5])  # fewer parts than inputs, and more (blocks dealt over parts)
def test_parts_merged_equal_one_go(inputs, one_go, tmp_path, parts):
    cfg = cfg_for(inputs, tmp_path / "d")
    tok = prepare_tokenizer(cfg, progress=False)
    assert tok.sha256 == one_go.tokenizer["sha256"]
    for i in range(1, parts + 1):
        assert not (tmp_path / "d" / "index.json").exists()
        index = prepare_data(cfg, part=(i, parts), progress=False)
        assert (index is None) == (i < parts)  # the last part to finish merges
    assert_same_folder(index, one_go)
    assert index.stats["parts"] == parts
    assert index.stats["documents"] == one_go.stats["documents"]
    again = merge_parts(cfg, parts, progress=False)  # merging by hand gives the same index
    assert again.to_json() == index.to_json()


def test_deal_covers_every_block_once():
    for n_inputs in (1, 2, 3, 5):
        for parts in (1, 2, 3, 4, 7, 12):
            shares = [part_tasks(n_inputs, p, parts) for p in range(1, parts + 1)]
            for workers in (1, 2, 3):  # and a part's tasks over its worker processes
                for i in range(n_inputs):
                    for b in range(30):
                        owners = [
                            (p, w)
                            for p, share in enumerate(shares, 1)
                            for w, tasks in enumerate(deal(share, workers))
                            for t in tasks
                            if t.input == i and t.covers(b)
                        ]
                        assert len(owners) == 1, (n_inputs, parts, workers, i, b, owners)
                        assert block_owner(n_inputs, i, b, parts) == owners[0][0]
    # more parts than inputs: every part gets work, an input's blocks are dealt over several parts
    assert deal([Task(0), Task(1)], 5) == [
        [Task(0, 0, 3)],
        [Task(1, 0, 2)],
        [Task(0, 1, 3)],
        [Task(1, 1, 2)],
        [Task(0, 2, 3)],
    ]


KILL_SCRIPT = """
import json, os, sys
from lmstack.config import DataConfig
from lmstack.data import prepare_data, shards
from lmstack.model.schema import from_dict

calls = 0
add = shards.ShardWriter.add
def add_then_die(self, *args):
    global calls
    add(self, *args)
    calls += 1
    if calls == int(sys.argv[2]):
        os._exit(3)  # killed: no cleanup, a shard left half-written
shards.ShardWriter.add = add_then_die
prepare_data(from_dict(DataConfig, json.loads(sys.argv[1]), prefix="data."), part=(1, 2), progress=False)
"""


def test_killed_part_reruns_to_the_same_folder(inputs, one_go, tmp_path):
    cfg = cfg_for(inputs, tmp_path / "d")
    prepare_tokenizer(cfg, progress=False)
    fields = {k: getattr(cfg, k) for k in cfg.__dataclass_fields__}
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    res = subprocess.run(
        [sys.executable, "-c", KILL_SCRIPT, json.dumps(fields), "9"], env=env, capture_output=True, text=True
    )
    assert res.returncode == 3, res.stderr
    out = tmp_path / "d"
    assert list(out.glob("*.tmp")), "the kill was meant to leave a half-written shard"
    assert not (out / "parts" / "part-1-of-2.json").exists() and not (out / "index.json").exists()
    finished = {p.stem for p in out.glob("train-*.json")} | {p.stem for p in out.glob("val-*.json")}
    assert finished

    assert prepare_data(cfg, part=(2, 2), progress=False) is None  # part 1 is not finished: no merge
    with pytest.raises(LMStackError, match=r"part 1/2 has not finished"):
        merge_parts(cfg, 2, progress=False)
    rerun = prepare_data(cfg, part=(1, 2), progress=False)
    assert finished <= set(rerun.stats["shards_skipped"])  # the rerun kept what was finished
    assert_same_folder(rerun, one_go)
    assert not list(out.glob("*.tmp"))


def test_merge_names_the_missing_part(inputs, tmp_path, capsys):
    cfg = cfg_for(inputs, tmp_path / "d")
    prepare_tokenizer(cfg, progress=False)
    assert prepare_data(cfg, part=(1, 3), progress=False) is None
    assert prepare_data(cfg, part=(3, 3), progress=False) is None
    assert not (tmp_path / "d" / "index.json").exists()
    argv = ["prepare-data", *cli_overrides(cfg), "--merge", "3"]
    code, err = run_cli(argv, capsys)
    assert code == 2 and len(err) == 1 and "part 2/3 has not finished" in err[0], err

    prepare_data(cfg, part=(2, 3), progress=False)
    # a block record lost afterwards: the merge names the part that prepares it (input i: part i+1)
    (tmp_path / "d" / "parts" / "00001-00000.json").unlink()
    with pytest.raises(LMStackError, match=r"00001-00000.json: missing: block 0 of input 1 .*part 2/3"):
        merge_parts(cfg, 3, progress=False)


def test_part_needs_the_shared_tokenizer(inputs, tmp_path, capsys):
    cfg = cfg_for(inputs, tmp_path / "d")
    with pytest.raises(LMStackError, match=r"tokenizer.json: no tokenizer to share .*--tokenizer-only"):
        prepare_data(cfg, part=(1, 2), progress=False)
    assert not (tmp_path / "d" / "tokenizer.json").exists()
    for bad in ("0/2", "3/2", "x", "1/2/3", "-1/2"):
        code, err = run_cli(["prepare-data", *cli_overrides(cfg), f"--part={bad}"], capsys)
        assert code == 2 and len(err) == 1, err
        assert (
            err[0]
            == f"lmstack prepare-data: error: --part: expected I/N with 1 <= I <= N (e.g. 2/8), got '{bad}'"
        )


def test_inputs_are_read_in_parallel(inputs, one_go, tmp_path, monkeypatch):
    """Two workers, three inputs: the inputs are read by the worker processes, not by this one."""
    from lmstack.data.sources import jsonl

    log = tmp_path / "readers.log"
    read = jsonl.iter_jsonl

    def logged(files, *args):
        with open(log, "a") as f:
            f.write(f"{os.getpid()} {files[0].name}\n")
        return read(files, *args)

    monkeypatch.setattr(jsonl, "iter_jsonl", logged)
    index = prepare_data(cfg_for(inputs, tmp_path / "d", num_workers=2), progress=False)
    readers = [line.split() for line in log.read_text().splitlines()]
    assert sorted(name for _, name in readers) == ["a.jsonl", "b.jsonl.zst", "c.jsonl"]
    pids = {int(pid) for pid, _ in readers}
    assert len(pids) == 2 and os.getpid() not in pids
    assert_same_folder(index, one_go)


def cli_overrides(cfg) -> list[str]:
    files = ",".join(cfg.source_options["jsonl"]["inputs"])
    return [
        f"data.path={cfg.path}",
        "data.source=jsonl",
        f"data.source_options.jsonl.inputs=[{files}]",
        f"data.tokenizer={cfg.tokenizer}",
        f"data.block_docs={cfg.block_docs}",
        f"data.val_fraction={cfg.val_fraction}",
        f"data.shard_mb={cfg.shard_mb}",
        "data.num_workers=1",
    ]


def run_cli(argv, capsys) -> tuple[int, list[str]]:
    with pytest.raises(SystemExit) as exc:
        main(argv)
    return exc.value.code, capsys.readouterr().err.strip().splitlines()


def test_sbatch_script_runs_tokenizer_then_parts(inputs, one_go, tmp_path):
    """launch/prepare_data.sbatch as SLURM runs it (SLURM's variables set by hand): the job without
    --array makes the tokenizer, array task I of N prepares part I/N, and the last one merges."""
    cfg = cfg_for(inputs, tmp_path / "d")
    config = tmp_path / "data.yaml"
    config.write_text("data: {}\n")
    lmstack = tmp_path / "lmstack"
    lmstack.write_text(
        f'#!/bin/sh\nexec {sys.executable} -c "import sys; from lmstack.cli import main; main()" "$@"\n'
    )
    lmstack.chmod(0o755)
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
        "LMSTACK": str(lmstack),
        "SLURM_CPUS_PER_TASK": "1",
    }
    env.pop("SLURM_ARRAY_TASK_ID", None)
    script = REPO / "launch" / "prepare_data.sbatch"
    args = ["bash", str(script), str(config), *cli_overrides(cfg)[:-1]]
    res = subprocess.run(args, env=env, capture_output=True, text=True, cwd=tmp_path)
    assert res.returncode == 0 and "tokenizer ready" in res.stdout, res.stderr
    said = []
    for i in (2, 1):
        task = {"SLURM_ARRAY_TASK_ID": str(i), "SLURM_ARRAY_TASK_COUNT": "2"}
        res = subprocess.run(args, env={**env, **task}, capture_output=True, text=True, cwd=tmp_path)
        assert res.returncode == 0, res.stderr
        said.append(res.stdout.strip().splitlines()[-1])
    assert said[0].startswith("prepared part 2/2 of ") and said[1].startswith(
        f"prepared {tmp_path / 'd'}: train"
    )
    assert_same_folder(load_index(tmp_path / "d"), one_go)
