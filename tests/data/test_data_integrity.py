"""Shard and index integrity: a changed byte (same size) is named by `lmstack verify-data` and by the
reader before the shard's tokens are used; an edited index or one written before index checksums
existed is refused with what to do."""

from __future__ import annotations

import dataclasses
import json
import shutil

import pytest

from lmstack.cli import main
from lmstack.data import TrainReader, load_index, prepare_data
from lmstack.errors import LMStackError


@pytest.fixture
def copy(prepared, tmp_path):
    cfg, _ = prepared
    work = tmp_path / "data"
    shutil.copytree(cfg.path, work)
    return work


def _flip_byte(path, offset=5):
    with open(path, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)
        f.seek(offset)
        f.write(bytes([byte[0] ^ 0x01]))


def test_verify_data_passes_on_prepared_data(copy, capsys):
    main(["verify-data", str(copy)])
    out = capsys.readouterr().out
    n = sum(len(v) for v in load_index(copy).splits.values())
    assert out.startswith(f"verified {copy}: the index and {n} shards")


def test_a_changed_byte_is_named(copy, capsys):
    info = load_index(copy).shards("train")[1]
    size = (copy / info.bin_file).stat().st_size
    _flip_byte(copy / info.bin_file)
    assert (copy / info.bin_file).stat().st_size == size
    with pytest.raises(SystemExit) as exit_:
        main(["verify-data", str(copy)])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert f"{info.bin_file}: corrupted shard: sha256 differs" in err
    assert "1 of " in err and "failed verification" in err
    # the reader: refused before any token of that shard is returned
    reader = TrainReader(copy, 16, 2)
    with pytest.raises(LMStackError, match=rf"{info.bin_file}: corrupted shard"):
        for _ in range(10_000):
            batch = next(reader)
            assert not set(batch.sample_ids.tolist()) & _samples_in(reader, 1), (
                "a bad shard's tokens were used"
            )


def _samples_in(reader, shard):
    """Sample numbers whose tokens overlap shard `shard` of the train split."""
    T, starts = reader.seq_len, reader.stream.tok_starts
    first, end = int(starts[shard]), int(starts[shard + 1])
    return set(range(max(first - T, 0) // T, end // T + 1))


def test_edited_index_is_refused(copy):
    path = copy / "index.json"
    raw = json.loads(path.read_text())
    raw["splits"]["train"]["shards"][0]["num_tokens"] += 1
    path.write_text(json.dumps(raw))
    with pytest.raises(LMStackError, match=r"index\.json: the index's checksum does not match its content"):
        load_index(copy)


def test_old_index_without_checksum_says_what_to_do(prepared, copy, capsys):
    path = copy / "index.json"
    raw = json.loads(path.read_text())
    del raw["checksum"]
    path.write_text(json.dumps(raw))
    with pytest.raises(SystemExit) as exit_:
        main(["verify-data", str(copy)])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "written by an older lmstack, without an index checksum" in err
    assert f"re-run `lmstack prepare-data` with data.path={copy}" in err and "Traceback" not in err
    # doing so keeps the shards and rewrites the index with its checksum
    index = prepare_data(dataclasses.replace(prepared[0], path=str(copy)), progress=False)
    assert index.stats["shards_written"] == [] and load_index(copy).num_tokens("train") > 0


def test_a_truncated_tokenizer_is_refused_wherever_read(copy, capsys):
    """tokenizer.json cut in half: verify-data, the training and validation readers (training, eval ppl,
    mixture sources) and the tokenizer loader (export's source, prepare's reuse) all name it."""
    from lmstack.data import ValReader, load_data_tokenizer

    path = copy / "tokenizer.json"
    text = path.read_bytes()
    path.write_bytes(text[: len(text) // 2])
    message = rf"{path}: corrupted tokenizer: sha256 differs from the index"
    with pytest.raises(SystemExit) as exit_:
        main(["verify-data", str(copy)])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert f"{path}: corrupted tokenizer: sha256 differs from the index" in err and "Traceback" not in err
    for read in (
        lambda: TrainReader(copy, 16, 2),
        lambda: ValReader(copy, 16, 2),
        lambda: load_data_tokenizer(copy),
    ):
        with pytest.raises(LMStackError, match=message):
            read()
    path.unlink()
    with pytest.raises(LMStackError, match=rf"{path}: missing tokenizer file listed in"):
        TrainReader(copy, 16, 2)
