"""prepare-data: sources, tokenizer, shards + index, re-runs."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from data_helpers import data_cfg, make_docs, shard_documents, write_jsonl

from lmstack.data import load_data_tokenizer, load_hf_tokenizer, load_index, prepare_data
from lmstack.data.prepare import split_of, val_period
from lmstack.data.shards import sha256_file
from lmstack.data.tokenizer import token_dtype
from lmstack.errors import LMStackError


def expected_split(docs: list[str], val_fraction: float) -> dict[str, list[str]]:
    period = val_period(val_fraction)
    out = {"train": [], "val": []}
    for i, d in enumerate(docs):
        out[split_of(i, period)].append(d)
    return out


def test_round_trip_on_the_embedded_corpus(tmp_path):
    """decode(encode(text)) == text for real corpus text, read back from the shards."""
    from lmstack.data.sources.default import DEFAULT_CORPUS
    from lmstack.data.sources.jsonl import iter_jsonl

    cfg = data_cfg(tmp_path / "d", max_documents=12, vocab_size=600, shard_mb=64, val_fraction=0.0)
    index = prepare_data(cfg, progress=False)
    tok = load_data_tokenizer(index.path)
    docs = [d for _, d in zip(range(12), iter_jsonl([DEFAULT_CORPUS]))]
    got = shard_documents(index, "train")
    assert len(got) == len(docs) == index.num_documents("train")
    for text, ids in zip(docs, got):
        assert ids[-1] == tok.eos_id and tok.eos_id not in ids[:-1]
        assert tok.decode(ids[:-1]) == text
    assert index.num_tokens("val") == 0 and index.shards("val") == []


def test_shards_agree_with_index_and_text(prepared, corpus_docs):
    cfg, index = prepared
    on_disk = load_index(cfg.path)
    assert on_disk.to_json() == index.to_json()
    itemsize = np.dtype(index.dtype).itemsize
    assert index.dtype == "uint16" and index.vocab_size <= 320
    want = expected_split(corpus_docs, cfg.val_fraction)
    tok = load_data_tokenizer(cfg.path)
    for split in ("train", "val"):
        shards = index.shards(split)
        assert len(shards) > 1, "the fixture is meant to have several shards per split"
        for info in shards:
            assert (index.path / info.bin_file).stat().st_size == info.num_tokens * itemsize
            assert (index.path / info.docs_file).stat().st_size == info.num_documents * 8
            assert sha256_file(index.path / info.bin_file) == info.sha256
            assert sha256_file(index.path / info.docs_file) == info.docs_sha256
            assert json.loads((index.path / info.meta_file).read_text())["sha256"] == info.sha256
        docs = shard_documents(index, split)
        assert len(docs) == index.num_documents(split) == len(want[split])
        assert sum(len(d) for d in docs) == index.num_tokens(split)
        assert [tok.decode(d[:-1]) for d in docs] == want[split]
    rec = index.tokenizer
    assert rec["add_bos"] is False and rec["eos_after_document"] is True
    assert rec["sha256"] == tok.sha256
    assert index.stats["shards_skipped"] == []


def test_workers_give_identical_shards(prepared, tmp_path):
    cfg, index = prepared
    shutil.copy(Path(cfg.path) / "tokenizer.json", tmp_path / "tok.json")
    # same tokenizer (BPE training is not guaranteed bit-identical), two worker processes
    cfg2 = data_cfg(
        tmp_path / "d2",
        "jsonl",
        cfg.source_options["jsonl"],
        num_workers=2,
        tokenizer=str(tmp_path / "tok.json"),
    )
    index2 = prepare_data(cfg2, progress=False)
    for split in ("train", "val"):
        assert [s.sha256 for s in index2.shards(split)] == [s.sha256 for s in index.shards(split)]
        assert [s.docs_sha256 for s in index2.shards(split)] == [s.docs_sha256 for s in index.shards(split)]
    assert index2.tokenizer["sha256"] == index.tokenizer["sha256"]


def test_rerun_skips_finished_and_redoes_half_written(prepared, tmp_path):
    cfg, index = prepared
    work = tmp_path / "copy"
    shutil.copytree(cfg.path, work)
    cfg2 = data_cfg(work, "jsonl", cfg.source_options["jsonl"])
    again = prepare_data(cfg2, progress=False)
    n_shards = len(index.shards("train")) + len(index.shards("val"))
    assert again.stats["shards_written"] == [] and len(again.stats["shards_skipped"]) == n_shards
    assert again.stats["tokenized_text_bytes"] == 0

    # an interrupted shard: renamed to .tmp and cut short, its record gone; another one corrupted
    victim = index.shards("train")[1]
    (work / victim.bin_file).rename(work / (victim.bin_file + ".tmp"))
    with open(work / (victim.bin_file + ".tmp"), "r+b") as f:
        f.truncate(10)
    (work / victim.meta_file).unlink()
    other = index.shards("val")[0]
    with open(work / other.bin_file, "r+b") as f:
        f.write(b"\xff\xff")
    third = prepare_data(cfg2, progress=False)
    assert sorted(third.stats["shards_written"]) == sorted([victim.name, other.name])
    for split in ("train", "val"):
        assert [s.sha256 for s in third.shards(split)] == [s.sha256 for s in index.shards(split)]
    assert not list(work.glob("*.tmp"))


def test_other_settings_into_same_folder_refused(prepared, tmp_path):
    cfg, _ = prepared
    work = tmp_path / "copy"
    shutil.copytree(cfg.path, work)
    with pytest.raises(LMStackError, match=r"other settings.*vocab_size"):
        prepare_data(data_cfg(work, "jsonl", cfg.source_options["jsonl"], vocab_size=400), progress=False)


def test_jsonl_zst_pile_subsets(tmp_path):
    docs = make_docs(60, seed=3)
    src = write_jsonl(tmp_path / "00.jsonl.zst", docs, subsets=["Pile-CC", "Wikipedia (en)", "ArXiv"])
    cfg = data_cfg(
        tmp_path / "d", "pile", {"inputs": [str(tmp_path)], "subsets": ["Wikipedia (en)"]}, val_fraction=0
    )
    index = prepare_data(cfg, progress=False)
    tok = load_data_tokenizer(index.path)
    want = docs[1::3]
    assert index.num_documents("train") == len(want) == 20
    assert [tok.decode(d[:-1]) for d in shard_documents(index, "train")] == want
    assert src.exists()


def test_plain_text_and_pretrained_tokenizer_with_bos(prepared, tmp_path):
    cfg, _ = prepared
    (tmp_path / "a.txt").write_text("First paragraph.\nStill first.\n\nSecond one — ok.\n\n\n")
    (tmp_path / "b.txt").write_text("Third: café.\n")
    tok_file = Path(cfg.path) / "tokenizer.json"
    out = data_cfg(
        tmp_path / "d",
        "text",
        {"inputs": [str(tmp_path / "*.txt")], "doc_split": "blank_lines"},
        tokenizer=str(tok_file),
        add_bos=True,
        val_fraction=0,
    )
    index = prepare_data(out, progress=False)
    tok = load_data_tokenizer(index.path)
    assert tok.kind == "pretrained" and index.tokenizer["add_bos"] and tok.bos_id == 1 and tok.eos_id == 0
    docs = shard_documents(index, "train")
    assert [tok.decode(d[1:-1]) for d in docs] == [
        "First paragraph.\nStill first.",
        "Second one — ok.",
        "Third: café.",
    ]
    assert all(d[0] == tok.bos_id and d[-1] == tok.eos_id for d in docs)
    hf = load_hf_tokenizer(index.path)  # the HF folder adds BOS like the training data
    ids = hf("Third: café.")["input_ids"]
    assert ids == list(docs[2][:-1]) and hf.eos_token_id == tok.eos_id


def test_datasets_source_local_file(tmp_path):
    docs = make_docs(30, seed=5)
    src = write_jsonl(tmp_path / "local.jsonl", docs)
    cfg = data_cfg(tmp_path / "d", "hf", {"inputs": [str(src)]}, val_fraction=0)
    index = prepare_data(cfg, progress=False)
    tok = load_data_tokenizer(index.path)
    assert [tok.decode(d[:-1]) for d in shard_documents(index, "train")] == docs


def test_token_dtype():
    assert token_dtype(50277) == np.uint16 and token_dtype(65536) == np.uint16
    assert token_dtype(65537) == np.uint32 and token_dtype(128256) == np.uint32


def test_bad_inputs_are_named(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"text": broken\n')
    with pytest.raises(LMStackError, match=r"bad\.jsonl:2: not a JSON line"):
        prepare_data(data_cfg(tmp_path / "d", "jsonl", {"inputs": [str(bad)]}), progress=False)
    with pytest.raises(LMStackError, match=r"data\.source_options\.jsonl\.inputs\[1\]: '.*nothing\*\.jsonl'"):
        prepare_data(
            data_cfg(tmp_path / "e", "jsonl", {"inputs": [str(bad), str(tmp_path / "nothing*.jsonl")]})
        )
    with pytest.raises(LMStackError, match=r"data\.tokenizer: '.*missing\.json': no such file"):
        prepare_data(
            data_cfg(
                tmp_path / "f", "jsonl", {"inputs": [str(bad)]}, tokenizer=str(tmp_path / "missing.json")
            )
        )


def test_large_vocab_gives_uint32_shards(tmp_path):
    """A tokenizer with ids above 65535 (a word-level one with 66,002 entries) writes uint32 shards."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<|endoftext|>": 0, "[UNK]": 1, **{f"w{i}": i + 2 for i in range(66000)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.save(str(tmp_path / "big.json"))
    docs = ["w1 w2 w3", "w65990 w7", "w65535 w65534 w0"]
    src = write_jsonl(tmp_path / "c.jsonl", docs)
    cfg = data_cfg(
        tmp_path / "d",
        "jsonl",
        {"inputs": [str(src)]},
        tokenizer=str(tmp_path / "big.json"),
        val_fraction=0,
    )
    index = prepare_data(cfg, progress=False)
    assert index.dtype == "uint32" and index.vocab_size == 66002
    data_tok = load_data_tokenizer(index.path)
    got = shard_documents(index, "train")
    assert got[1].tolist() == [65992, 9, 0] and got[2].tolist() == [65537, 65536, 2, 0]
    assert [data_tok.decode(d[:-1]) for d in got] == docs
