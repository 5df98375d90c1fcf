"""data.mixture: samples drawn from weighted prepared folders (lmstack.data.mixture), reproducible from
the seed, split over ranks and resumed exactly like one folder's; sources with other tokenizers refused."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from data_helpers import data_cfg, make_docs, write_jsonl

from lmstack.config import load_config
from lmstack.data import MixtureReader, TrainReader, prepare_data
from lmstack.errors import ConfigError, LMStackError

T = 16


@pytest.fixture(scope="session")
def folders(prepared, tmp_path_factory):
    """{name: folder}: `a` (the shared tiny corpus), `b` (other documents, a's tokenizer) and `other`
    (b's documents with a tokenizer of its own)."""
    cfg_a, _ = prepared
    root = tmp_path_factory.mktemp("mixture")
    src = write_jsonl(root / "b.jsonl", make_docs(80, seed=7))
    b = data_cfg(root / "b", "jsonl", {"inputs": [str(src)]}, tokenizer=f"{cfg_a.path}/tokenizer.json")
    other = data_cfg(root / "other", "jsonl", {"inputs": [str(src)]}, vocab_size=300)
    for cfg in (b, other):
        prepare_data(cfg, progress=False)
    return {"a": cfg_a.path, "b": b.path, "other": other.path}


def mixture(folders, weights=(("a", 3.0), ("b", 1.0)), batch_size=4, **kw) -> MixtureReader:
    return MixtureReader([(n, folders[n], w) for n, w in weights], T, batch_size, **kw)


def take(reader, steps: int) -> list[torch.Tensor]:
    return [next(reader).input_ids for _ in range(steps)]


def test_sample_counts_follow_the_weights(folders):
    """Over N = 4000 positions each source's count is binomial(N, w): within 4 sigma of N w
    (a 6e-5 chance per source of failing by bad luck; a fixed seed makes it deterministic anyway)."""
    weights = (("a", 5.0), ("b", 3.0), ("a_again", 2.0))  # normalised: 0.5, 0.3, 0.2
    named = {**folders, "a_again": folders["a"]}
    # 8 ranks x 25 rows: 200 positions a step, this rank reads 25 of them
    reader = mixture(named, weights, batch_size=25, rank=3, world_size=8, seed=11)
    for _ in range(20):
        next(reader)
    n = reader.consumed_samples
    assert n == 4000
    for (name, w), count in zip(weights, reader.consumed_per_source):
        p = w / 10.0
        assert abs(count - n * p) <= 4 * math.sqrt(n * p * (1 - p)), (name, count, n * p)
    assert reader.tokens_per_source() == {
        name: c * T for (name, _), c in zip(weights, reader.consumed_per_source)
    }


def test_rows_are_each_sources_own_order(folders):
    """Row by row, the samples a source gives a mixture are those the source's own reader gives alone,
    in the same order (its shuffled epochs included)."""
    reader = mixture(folders, (("a", 1.0), ("b", 3.0)), batch_size=8, seed=5)
    alone = {n: TrainReader(folders[n], T, 1, seed=5) for n in ("a", "b")}
    steps = math.ceil(1.2 * alone["b"].num_samples / 6)  # b (3/4 of 8 rows a step) goes past its first epoch
    for _ in range(steps):
        batch = next(reader)
        first = reader.consumed_samples - 8
        for row, s in enumerate(reader.sources_at(np.arange(first, first + 8))):
            expected = next(alone[reader.names[s]])
            assert torch.equal(batch.input_ids[row], expected.input_ids[0])
            assert torch.equal(batch.labels[row], expected.labels[0])
            assert torch.equal(batch.doc_ids[row], expected.doc_ids[0])
            assert batch.sample_ids[row] == expected.sample_ids[0]
    assert alone["b"].epoch >= 1


def test_same_seed_same_batches_other_seed_others(folders):
    first, again, other = (mixture(folders, seed=s) for s in (1, 1, 2))
    batches = take(first, 6)
    assert all(torch.equal(x, y) for x, y in zip(batches, take(again, 6)))
    assert not all(torch.equal(x, y) for x, y in zip(batches, take(other, 6)))
    positions = np.arange(1000)
    assert (first.sources_at(positions) != other.sources_at(positions)).any()


@pytest.mark.parametrize("world_size", [2, 4])
def test_ranks_split_the_global_batch(folders, world_size):
    whole = mixture(folders, batch_size=8, seed=3)
    ranks = [
        mixture(folders, batch_size=8 // world_size, rank=r, world_size=world_size, seed=3)
        for r in range(world_size)
    ]
    for _ in range(4):
        expected = next(whole).input_ids
        assert torch.equal(torch.cat([next(r).input_ids for r in ranks]), expected)
    assert all(r.state_dict()["consumed_per_source"] == whole.consumed_per_source for r in ranks)


def test_resume_gives_the_exact_next_batches_also_on_another_rank_count(folders):
    """Saved by 2 ranks of 2 rows after 3 steps; resumed on 1 rank of 4 rows (and on 4 of 1): the
    batches of an uninterrupted 1-rank run, steps 4 to 6."""
    reference = take(mixture(folders, seed=9), 6)
    saved = [mixture(folders, batch_size=2, rank=r, world_size=2, seed=9) for r in (0, 1)]
    for r in saved:
        take(r, 3)
    state = json.loads(json.dumps(saved[0].state_dict()))  # checkpoints hold plain values
    assert state == saved[1].state_dict()
    one = mixture(folders, seed=9)
    one.load_state_dict(state)
    assert all(torch.equal(x, y) for x, y in zip(take(one, 3), reference[3:]))
    four = [mixture(folders, batch_size=1, rank=r, world_size=4, seed=9) for r in range(4)]
    for r in four:
        r.load_state_dict(state)
    for expected in reference[3:]:
        assert torch.equal(torch.cat([next(r).input_ids for r in four]), expected)


@pytest.mark.parametrize(
    "change,message",
    [
        ({"seed": 10}, "seed 9 then, 10 now"),
        ({"weights": (("a", 1.0), ("b", 1.0))}, "source 'a' had the normalised weight 0.75, now 0.5"),
        ({"weights": (("b", 1.0), ("a", 3.0))}, "sources were ['a', 'b'], now ['b', 'a']"),
        ({"weights": (("a", 3.0),)}, "sources were ['a', 'b'], now ['a']"),
    ],
)
def test_resume_refuses_another_mixture(folders, change, message):
    saved = mixture(folders, seed=9)
    take(saved, 2)
    kw = {"seed": 9, **change}
    resumed = mixture(folders, kw.pop("weights", (("a", 3.0), ("b", 1.0))), **kw)
    with pytest.raises(LMStackError) as err:
        resumed.load_state_dict(saved.state_dict())
    assert message in str(err.value) and "\n" not in str(err.value)


def test_resume_refuses_another_seq_len_or_a_one_folder_state(folders):
    saved = mixture(folders)
    take(saved, 1)
    longer = MixtureReader([("a", folders["a"], 3.0), ("b", folders["b"], 1.0)], T * 2, 4)
    with pytest.raises(LMStackError, match=f"seq_len {T} then, {2 * T} now"):
        longer.load_state_dict(saved.state_dict())
    with pytest.raises(LMStackError, match="not trained on a data.mixture"):
        saved.load_state_dict(TrainReader(folders["a"], T, 4).state_dict())


def test_a_source_with_another_tokenizer_is_refused_by_name(folders):
    with pytest.raises(LMStackError) as err:
        mixture(folders, (("a", 1.0), ("b", 1.0), ("other", 1.0)))
    msg = str(err.value)
    assert msg.startswith(
        f"data.mixture source 'other' ({folders['other']}): prepared with another tokenizer"
    )
    assert "than source 'a'" in msg and "sha256" in msg and "\n" not in msg


# -- the config: data.mixture or data.path, positive weights, one name per source ----------------------


def test_mixture_config_names_and_weights(folders):
    cfg = load_config(
        None, [f"data.mixture=[{{path: {folders['a']}, weight: 0.9}}, {{path: x/code, name: py}}]"]
    )
    assert [(s.name, s.weight) for s in cfg.data.mixture] == [("data", 0.9), ("py", 1.0)]


@pytest.mark.parametrize(
    "overrides,message",
    [
        (
            ["data.path=data/pile", "data.mixture=[{path: a}]"],
            "data.mixture: set data.path ('data/pile') or data.mixture, not both",
        ),
        (
            ["data.mixture=[{path: a, weight: 0}]"],
            "data.mixture[0].weight: expected a positive number, got 0.0",
        ),
        (
            ["data.mixture=[{path: a}, {path: b, weight: -1}]"],
            "data.mixture[1].weight: expected a positive number",
        ),
        (["data.mixture=[{path: x/a}, {path: y/a}]"], "data.mixture[1].name: 'a' names two sources"),
        (["data.mixture=[{path: a}, {path: b, seq_len: 64}]"], "data.mixture[1].seq_len: unknown key"),
        (
            ["data.mixture=[{path: a}]", "data.val_path={a: v}"],
            "data.val_path.a: a data.mixture source's val split",
        ),
        (["data.mixture=[{path: ''}]"], "data.mixture[0].path: expected a prepared data folder"),
    ],
)
def test_mixture_config_errors_are_one_line(overrides, message):
    with pytest.raises(ConfigError) as err:
        load_config(None, overrides)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_an_unprepared_source_and_prepare_data_of_a_mixture_are_refused(folders, tmp_path, capsys):
    from lmstack.cli import main
    from lmstack.train.data import check_train_folders

    config = load_config(None, [f"data.mixture=[{{path: {folders['a']}}}, {{path: {tmp_path / 'none'}}}]"])
    with pytest.raises(LMStackError, match=r"^data.mixture\[1\].path: no prepared data in"):
        check_train_folders(config)
    with pytest.raises(SystemExit) as exit_:
        main(["prepare-data", f"data.mixture=[{{path: {folders['a']}}}]"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip()
    assert "data.mixture: prepare-data writes one folder (data.path)" in err and "\n" not in err
