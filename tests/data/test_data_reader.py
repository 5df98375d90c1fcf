"""The packed readers: order, rank sharding, resume, document boundaries, damaged shards."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch

from lmstack.data import Batch, TrainReader, ValReader, load_data_tokenizer, model_token_ids
from lmstack.data.reader import IGNORE_INDEX, Permutation, TokenStream
from lmstack.errors import LMStackError

T = 16


def reader(cfg, batch_size=4, **kw) -> TrainReader:
    return TrainReader(cfg.path, T, batch_size, seed=kw.pop("seed", 7), **kw)


@pytest.mark.parametrize("n", [1, 2, 3, 5, 64, 1000, 1023, 1025, 4097])
def test_permutation_is_a_bijection(n):
    perm = Permutation(n, seed=3, epoch=1)
    out = perm(np.arange(n))
    assert sorted(out.tolist()) == list(range(n))
    if n >= 64:
        assert not np.array_equal(out, np.arange(n))
        assert not np.array_equal(out, Permutation(n, seed=4, epoch=1)(np.arange(n)))
        assert not np.array_equal(out, Permutation(n, seed=3, epoch=2)(np.arange(n)))


def test_batches_are_packed_windows_of_the_stream(prepared):
    cfg, index = prepared
    r = reader(cfg)
    stream = TokenStream(index, "train")
    assert r.num_samples == (index.num_tokens("train") - 1) // T
    for _ in range(3):
        b = r.next_batch()
        assert b.input_ids.shape == b.labels.shape == b.doc_ids.shape == (4, T)
        assert b.input_ids.dtype == b.labels.dtype == b.doc_ids.dtype == torch.int64
        for row, j in enumerate(b.sample_ids.tolist()):
            tokens, _ = stream.read(j * T, T + 1)
            assert b.input_ids[row].tolist() == tokens[:T].tolist()
            assert b.labels[row].tolist() == tokens[1:].tolist()


def test_same_seed_same_order_other_seed_other_order(prepared):
    cfg, _ = prepared

    def ids(seed):
        r = reader(cfg, seed=seed)
        return torch.cat([r.next_batch().sample_ids for _ in range(5)]).tolist()

    assert ids(7) == ids(7)
    assert ids(7) != ids(8)
    first = reader(cfg, seed=7)
    assert torch.equal(first.next_batch().input_ids, reader(cfg, seed=7).next_batch().input_ids)


@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_ranks_cover_the_dataset_without_overlap(prepared, world_size):
    cfg, _ = prepared
    B = 3
    readers = [reader(cfg, B, rank=r, world_size=world_size) for r in range(world_size)]
    S = readers[0].num_samples
    steps = -(-S // (B * world_size))
    seen: list[int] = []
    rows: dict[int, list[int]] = {}
    for _ in range(steps):
        for rd in readers:
            b = rd.next_batch()
            for j, row in zip(b.sample_ids.tolist(), b.input_ids.tolist()):
                rows.setdefault(j, row)
                assert rows[j] == row
            seen.extend(b.sample_ids.tolist())
    first_epoch = seen[:S]  # positions 0..S-1 in global order (ranks interleave by batch)
    assert sorted(first_epoch) == list(range(S)), "no overlap, no gap within an epoch"
    assert len(set(first_epoch)) == S
    # the ranks' positions are disjoint slices of the global order
    one = reader(cfg, B * world_size)
    assert torch.cat([one.next_batch().sample_ids for _ in range(steps)]).tolist() == seen


def test_resume_continues_with_the_exact_next_batch(prepared):
    cfg, _ = prepared
    a = reader(cfg, 4)
    for _ in range(7):
        a.next_batch()
    state = a.state_dict()
    expected = [a.next_batch() for _ in range(3)]
    b = reader(cfg, 4)
    b.load_state_dict(state)
    for want in expected:
        got = b.next_batch()
        for name in ("input_ids", "labels", "doc_ids", "sample_ids"):
            assert torch.equal(getattr(got, name), getattr(want, name)), name


def test_resume_from_two_ranks_to_one(prepared):
    cfg, _ = prepared
    B = 2
    r0, r1 = reader(cfg, B, rank=0, world_size=2), reader(cfg, B, rank=1, world_size=2)
    for _ in range(5):
        r0.next_batch(), r1.next_batch()
    assert r0.state_dict() == r1.state_dict()
    state = r0.state_dict()
    before = {int(j) for rd in (reader(cfg, 2 * B),) for _ in range(5) for j in rd.next_batch().sample_ids}
    nxt0, nxt1 = r0.next_batch(), r1.next_batch()
    single = reader(cfg, 2 * B)
    single.load_state_dict(state)
    got = single.next_batch()
    assert torch.equal(got.input_ids, torch.cat([nxt0.input_ids, nxt1.input_ids]))
    assert torch.equal(got.sample_ids, torch.cat([nxt0.sample_ids, nxt1.sample_ids]))
    assert not before & set(got.sample_ids.tolist()), "no sample repeated after the switch"
    # and back to three ranks with another micro-batch size: still the next positions
    r3 = [reader(cfg, 1, rank=r, world_size=3) for r in range(3)]
    for rd in r3:
        rd.load_state_dict(single.state_dict())
    follow = reader(cfg, 3)
    follow.load_state_dict(single.state_dict())
    assert (
        torch.cat([rd.next_batch().sample_ids for rd in r3]).tolist()
        == follow.next_batch().sample_ids.tolist()
    )


def test_resume_refuses_other_seed_or_seq_len(prepared):
    cfg, _ = prepared
    state = reader(cfg).state_dict()
    with pytest.raises(LMStackError, match="seed 7 then, 8 now"):
        reader(cfg, seed=8).load_state_dict(state)
    with pytest.raises(LMStackError, match="seq_len"):
        TrainReader(cfg.path, T * 2, 4, seed=7).load_state_dict(state)


def test_bad_reader_arguments_name_the_argument(prepared):
    cfg, _ = prepared
    with pytest.raises(LMStackError, match="batch_size: expected a positive integer, got 0"):
        TrainReader(cfg.path, T, 0, seed=7)
    with pytest.raises(LMStackError, match="seq_len: expected a positive integer, got 0"):
        TrainReader(cfg.path, 0, 4, seed=7)


def test_documents_reported_at_the_right_offsets(prepared):
    cfg, index = prepared
    tok = load_data_tokenizer(cfg.path)
    # global document starts of the train stream, from the index files
    starts, base = [], 0
    for info in index.shards("train"):
        starts.extend((np.fromfile(index.path / info.docs_file, dtype="<i8") + base).tolist())
        base += info.num_tokens
    starts_set = set(starts)
    r = reader(cfg, 8)
    n_boundaries = 0
    for _ in range(4):
        b = r.next_batch()
        for row in range(8):
            s = int(b.sample_ids[row]) * T
            ids = b.doc_ids[row].tolist()
            assert ids[0] == 0 and all(y - x in (0, 1) for x, y in zip(ids, ids[1:]))
            for t in range(1, T):
                is_start = (s + t) in starts_set
                assert (ids[t] != ids[t - 1]) == is_start, (row, t)
                if is_start:  # the previous token closes its document
                    assert int(b.input_ids[row, t - 1]) == tok.eos_id
                    n_boundaries += 1
    assert n_boundaries > 0
    from lmstack.model.mixers.base import BatchContext

    seg = BatchContext.from_doc_ids(b.doc_ids)
    assert (seg.positions[b.doc_ids != torch.roll(b.doc_ids, 1, 1)] == 0).all()


def test_damaged_shards_are_refused(prepared, tmp_path):
    cfg, index = prepared
    info = index.shards("train")[1]

    def fresh():
        work = tmp_path / f"copy{len(list(tmp_path.iterdir()))}"
        shutil.copytree(cfg.path, work)
        return work

    half = fresh()
    (half / info.bin_file).rename(half / (info.bin_file + ".tmp"))
    with pytest.raises(LMStackError, match=rf"{info.bin_file}: half-written shard"):
        TrainReader(half, T, 2)

    short = fresh()
    with open(short / info.bin_file, "r+b") as f:
        f.truncate(info.num_tokens * 2 - 6)
    with pytest.raises(
        LMStackError, match=rf"{info.bin_file}: truncated or corrupted shard: \d+ bytes, the index expects"
    ):
        TrainReader(short, T, 2)
    with pytest.raises(LMStackError, match=rf"{info.bin_file}: truncated"):
        ValReader(short, T, 2, split="train")

    flipped = fresh()
    with open(flipped / info.bin_file, "r+b") as f:
        f.seek(4)
        f.write(b"\x13\x37")
    TrainReader(flipped, T, 2, verify="size")  # sizes are fine: only a checksum reads the bytes
    with pytest.raises(LMStackError, match=rf"{info.bin_file}: corrupted shard: sha256"):
        TrainReader(flipped, T, 2, verify="full")
    reader = TrainReader(flipped, T, 2)  # the default checks each shard before its first read
    with pytest.raises(LMStackError, match=rf"{info.bin_file}: corrupted shard: sha256"):
        for _ in range(len(index.shards("train")) * 100):
            next(reader)

    unprepared = fresh()
    (unprepared / "index.json").unlink()
    with pytest.raises(LMStackError, match=r"index\.json: no prepared data here"):
        TrainReader(unprepared, T, 2)


@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_val_reader_covers_every_prediction_once(prepared, world_size):
    cfg, index = prepared
    N = index.num_tokens("val")
    stream = TokenStream(index, "val")
    all_tokens, _ = stream.read(0, N)
    readers = [ValReader(cfg.path, T, 2, rank=r, world_size=world_size) for r in range(world_size)]
    assert len({len(r) for r in readers}) == 1
    got = {}
    for rd in readers:
        batches = list(rd)
        assert len(batches) == len(rd)
        for b in batches:
            for row in range(b.input_ids.shape[0]):
                j = int(b.sample_ids[row])
                if j < 0:
                    assert (b.labels[row] == IGNORE_INDEX).all()
                    continue
                assert j not in got
                got[j] = b
                mask = b.labels[row] != IGNORE_INDEX
                n = int(mask.sum())
                assert b.input_ids[row, :n].tolist() == all_tokens[j * T : j * T + n].tolist()
                assert b.labels[row, :n].tolist() == all_tokens[j * T + 1 : j * T + n + 1].tolist()
                assert mask[:n].all() and not mask[n:].any()
    assert sorted(got) == list(range(readers[0].num_samples))
    total = sum(int((b.labels != IGNORE_INDEX).sum()) for rd in readers for b in rd)
    assert total == N - 1
    assert list(ValReader(cfg.path, T, 2)) and all(
        torch.equal(a.input_ids, b.input_ids)
        for a, b in zip(ValReader(cfg.path, T, 2), ValReader(cfg.path, T, 2))
    )


def test_seq_slice_and_model_ids(prepared):
    cfg, index = prepared
    b = reader(cfg).next_batch()
    parts = [b.seq_slice(r, 4) for r in range(4)]
    assert torch.equal(torch.cat([p.input_ids for p in parts], 1), b.input_ids)
    assert [p.seq_offset for p in parts] == [0, 4, 8, 12]
    assert isinstance(b.to("cpu"), Batch)
    ids = model_token_ids(cfg.path)
    assert ids == {"vocab_size": index.vocab_size, "bos_token_id": None, "eos_token_id": 0, "pad_token_id": 2}


def test_reader_refuses_too_short_data(prepared):
    cfg, index = prepared
    with pytest.raises(LMStackError, match="fewer than seq_len"):
        TrainReader(cfg.path, index.num_tokens("train"), 1)


def test_seq_slice_doc_offsets_match_the_slice_context():
    """Each slice records how far its first document reaches back (also for a slice of a slice): the
    positions a batch context gets from the offsets equal those of the full rows."""
    from lmstack.model import BatchContext

    doc_ids = torch.tensor([[0] * 5 + [1] * 9 + [2] * 2, [0] * 8 + [1] * 8, [0] * 16])
    full = Batch(doc_ids, doc_ids, doc_ids, torch.arange(3))
    full_positions = BatchContext.from_doc_ids(doc_ids).positions
    for size in (2, 4):
        for r in range(size):
            part = full.seq_slice(r, size)
            ctx = BatchContext.from_doc_ids(part.doc_ids, offsets=part.doc_offsets)
            assert torch.equal(
                ctx.positions, full_positions[:, part.seq_offset : part.seq_offset + 16 // size]
            )
    quarter = full.seq_slice(1, 2).seq_slice(1, 2)  # columns 12..15
    assert quarter.doc_offsets.tolist() == [7, 4, 12] and quarter.seq_offset == 12
