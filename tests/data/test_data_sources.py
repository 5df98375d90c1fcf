"""The data-source registry: every source registered, its config section, the old flat keys, each
source's documents against an independent read of the file, and a source that plugs in from a test."""

from __future__ import annotations

import dataclasses
import json
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml
import zstandard
from data_helpers import make_docs, shard_documents, write_jsonl

import lmstack.data.sources as sources
from lmstack.config import load_config
from lmstack.data import load_data_tokenizer, prepare_data
from lmstack.data.sources import (
    SOURCES,
    Source,
    describe_source,
    get_source,
    iter_documents,
    open_source,
    register,
)
from lmstack.data.sources.jsonl import JsonlOptions
from lmstack.errors import ConfigError, LMStackError

REGISTERED = ["default", "hf", "jsonl", "pile", "text"]
SMALL = ["data.vocab_size=300", "data.num_workers=1", "data.val_fraction=0"]


def data(overrides: list[str]):
    return load_config(None, overrides).data


def raises_one_line(overrides: list[str], message: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_config(None, overrides)
    assert str(err.value) == f"<defaults>: {message}"
    assert "\n" not in str(err.value)


# --- the registry ------------------------------------------------------------------------------
def test_every_source_module_registers_its_source():
    folder = Path(sources.__file__).parent
    modules = sorted(p.stem for p in folder.glob("*.py") if p.stem not in ("__init__", "base"))
    assert sorted(SOURCES) == modules == REGISTERED
    for name, cls in SOURCES.items():
        assert cls.name == name and cls.__module__ == f"lmstack.data.sources.{name}"
        assert get_source(name) is cls


def test_unknown_source_is_one_line_listing_the_registered():
    with pytest.raises(ConfigError) as err:
        get_source("piles")
    assert str(err.value) == "unknown data source 'piles'; registered: default, hf, jsonl, pile, text"
    raises_one_line(
        ["data.source=piles"],
        "data.source: unknown data source 'piles'; registered: default, hf, jsonl, pile, text",
    )
    raises_one_line(
        ["data.source=piles", "data.inputs=[a.jsonl]"],
        "data.source: unknown data source 'piles'; registered: default, hf, jsonl, pile, text",
    )
    raises_one_line(
        ["data.source_options.txt.inputs=[a]"],
        "data.source_options.txt: unknown data source 'txt'; registered: default, hf, jsonl, pile, text",
    )


def test_registering_a_name_twice_is_refused():
    with pytest.raises(ValueError, match="data source 'jsonl' is registered twice"):
        register("jsonl")(type("Again", (Source,), {}))
    assert SOURCES["jsonl"].__name__ == "JsonlSource"


# --- the config section and the old flat keys ---------------------------------------------------
# (source, old flat key, a value other than its default, the key in data.source_options.<source>)
FLAT = [
    ("jsonl", "inputs", ["a.jsonl"], "inputs"),
    ("jsonl", "text_key", "body", "text_key"),
    ("jsonl", "pile_subsets", ["ArXiv"], "subsets"),
    ("pile", "inputs", ["a.jsonl.zst"], "inputs"),
    ("pile", "text_key", "body", "text_key"),
    ("pile", "pile_subsets", ["Pile-CC", "ArXiv"], "subsets"),
    ("text", "inputs", ["*.txt"], "inputs"),
    ("text", "text_doc_split", "line", "doc_split"),
    ("hf", "inputs", ["some/data-set"], "inputs"),
    ("hf", "text_key", "body", "text_key"),
    ("hf", "hf_config", "wikitext-2-raw-v1", "config"),
    ("hf", "hf_split", "test", "split"),
    ("hf", "hf_streaming", True, "streaming"),
]


def _inputs(source: str, key: str) -> list[str]:
    return [] if key == "inputs" or source == "default" else [f"data.source_options.{source}.inputs=[x]"]


@pytest.mark.parametrize("source, flat, value, key", FLAT)
def test_old_flat_key_is_moved_onto_the_section(source, flat, value, key):
    old = data([f"data.source={source}", f"data.{flat}={json.dumps(value)}", *_inputs(source, flat)])
    new = data(
        [
            f"data.source={source}",
            f"data.source_options.{source}.{key}={json.dumps(value)}",
            *_inputs(source, flat),
        ]
    )
    assert old == new and old.source_options[source][key] == value
    assert not hasattr(old, flat)
    # the same value in both places is no conflict
    both = data(
        [
            f"data.source={source}",
            f"data.{flat}={json.dumps(value)}",
            f"data.source_options.{source}.{key}={json.dumps(value)}",
            *_inputs(source, flat),
        ]
    )
    assert both == new


@pytest.mark.parametrize("source, flat, value, key", FLAT)
def test_conflicting_old_and_new_key_is_refused_naming_the_new_key(source, flat, value, key):
    other = ["z.jsonl"] if isinstance(value, list) else False if value is True else "other"
    new = f"data.source_options.{source}.{key}"
    raises_one_line(
        [
            f"data.source={source}",
            f"data.{flat}={json.dumps(value)}",
            f"{new}={json.dumps(other)}",
            *_inputs(source, flat),
        ],
        f"data.{flat}: {value!r} conflicts with {new}: {other!r} (data.{flat} is the old form of {new}; "
        f"set only {new})",
    )


@pytest.mark.parametrize(
    "source, flat, value, new",
    [
        (
            "default",
            "inputs",
            ["a.jsonl"],
            "data.source_options.hf.inputs or data.source_options.jsonl.inputs or "
            "data.source_options.pile.inputs or data.source_options.text.inputs",
        ),
        (
            "text",
            "text_key",
            "body",
            "data.source_options.hf.text_key or data.source_options.jsonl.text_key or "
            "data.source_options.pile.text_key",
        ),
        ("pile", "text_doc_split", "line", "data.source_options.text.doc_split"),
        ("jsonl", "hf_split", "test", "data.source_options.hf.split"),
        (
            "hf",
            "pile_subsets",
            ["ArXiv"],
            "data.source_options.jsonl.subsets or data.source_options.pile.subsets",
        ),
    ],
)
def test_old_key_the_source_does_not_read_is_refused_unless_default(source, flat, value, new):
    inputs = [] if source == "default" else [f"data.source_options.{source}.inputs=[x]"]
    raises_one_line(
        [f"data.source={source}", f"data.{flat}={json.dumps(value)}", *inputs],
        f"data.{flat}: source '{source}' does not read it (it is now {new}); remove it or set data.source "
        "to a source that reads it",
    )


OLD_DUMP = """\
data:
  path: {path}
  seq_len: 2048
  seed: 1234
  source: pile
  inputs:
  - /path/to/pile/train
  text_key: text
  pile_subsets: null
  text_doc_split: file
  hf_config: null
  hf_split: train
  hf_streaming: false
  max_documents: null
  tokenizer: bpe
  vocab_size: 8192
  bpe_train_mb: 256.0
  add_bos: false
  eos_token: <|endoftext|>
  bos_token: null
  val_fraction: 0.0005
  shard_mb: 256.0
  num_workers: 0
  batch_docs: 256
"""


def test_a_config_yaml_written_before_the_registry_loads(tmp_path):
    """A run's or checkpoint's config.yaml holds every old flat field, the unused ones at their defaults."""
    old = tmp_path / "old.yaml"
    old.write_text(OLD_DUMP.format(path=tmp_path / "d"))
    cfg = load_config(old).data
    moved = {"inputs": ["/path/to/pile/train"], "text_key": "text", "subsets": None}
    assert cfg.source == "pile" and cfg.source_options == {"pile": moved}
    flat = (
        "  inputs:\n  - /path/to/pile/train\n  text_key: text\n  pile_subsets: null\n  text_doc_split: file\n"
    )
    flat += "  hf_config: null\n  hf_split: train\n  hf_streaming: false\n"
    assert flat in OLD_DUMP
    new = tmp_path / "new.yaml"
    new.write_text(
        OLD_DUMP.format(path=tmp_path / "d").replace(
            flat, "  source_options:\n    pile: {inputs: [/path/to/pile/train], subsets: null}\n"
        )
    )
    new_cfg = load_config(new).data
    assert new_cfg == dataclasses.replace(
        cfg, source_options={"pile": {"inputs": ["/path/to/pile/train"], "subsets": None}}
    )
    assert open_source(new_cfg).options == open_source(cfg).options == JsonlOptions(["/path/to/pile/train"])
    assert list(describe_source(cfg).items()) == [
        ("source", "pile"),
        ("inputs", ["/path/to/pile/train"]),
        ("max_documents", None),
        ("text_key", "text"),
        ("pile_subsets", None),
    ]
    assert describe_source(new_cfg) == describe_source(cfg)


def test_options_are_type_checked_and_validated_naming_the_field():
    raises_one_line(
        [
            "data.source=text",
            "data.source_options.text.inputs=[a]",
            "data.source_options.text.doc_split=para",
        ],
        "data.source_options.text.doc_split: expected one of ['file', 'blank_lines', 'line'], got 'para'",
    )
    raises_one_line(
        [
            "data.source=jsonl",
            "data.source_options.jsonl.inputs=[a]",
            "data.source_options.jsonl.text_keys=t",
        ],
        "data.source_options.jsonl.text_keys: unknown key; did you mean 'data.source_options.jsonl.text_key'?",
    )
    raises_one_line(
        ["data.source=hf", "data.source_options.hf.inputs=[a, b]"],
        "data.source_options.hf.inputs: source 'hf' takes exactly one data set name or path, got 2",
    )
    raises_one_line(
        ["data.source=pile"],
        "data.source_options.pile.inputs: source 'pile' needs at least one file, folder, pattern or data set",
    )
    # the section of a source not chosen is type-checked, not validated (it may lack its inputs)
    raises_one_line(
        ["data.source_options.hf.streaming=maybe"],
        "data.source_options.hf.streaming: expected true or false, got str 'maybe'",
    )
    assert data(["data.source_options.text.doc_split=line"]).source_options == {"text": {"doc_split": "line"}}


# --- every source reads a small local file as an independent read of it does -------------------
def _jsonl_lines(raw: bytes) -> list[dict]:
    return [json.loads(line) for line in raw.decode().splitlines() if line.strip()]


def test_default_reads_the_embedded_corpus():
    from lmstack.data.sources.default import DEFAULT_CORPUS

    with DEFAULT_CORPUS.open("rb") as f:
        raw = zstandard.ZstdDecompressor().stream_reader(f, read_across_frames=True).read()
    want = [obj["text"] for obj in _jsonl_lines(raw)]
    assert len(want) == 471  # the 42 works, in parts (corpus/README.md)
    assert list(iter_documents(data([]))) == want
    assert list(iter_documents(data(["data.max_documents=5"]))) == want[:5]
    assert describe_source(data([])) == {
        "source": "default",
        "corpus": "shakespeare.jsonl.zst",
        "max_documents": None,
    }


@pytest.mark.parametrize("name", ["c.jsonl", "c.jsonl.zst"])
@pytest.mark.parametrize("source", ["jsonl", "pile"])
def test_jsonl_and_pile_read_jsonl_and_zst(tmp_path, source, name):
    docs = make_docs(30, seed=7) + [""]  # an empty text is no document
    src = write_jsonl(tmp_path / name, docs, subsets=["Pile-CC", "ArXiv", "Wikipedia (en)"])
    raw = src.read_bytes()
    if name.endswith(".zst"):
        raw = zstandard.ZstdDecompressor().decompress(raw)
    lines = _jsonl_lines(raw)
    opts = f"data.source_options.{source}"
    cfg = data([f"data.source={source}", f"{opts}.inputs=[{tmp_path}]"])
    got = list(iter_documents(cfg))
    assert got == [o["text"] for o in lines if o["text"]] and len(got) == 30
    keep = ["ArXiv", "Pile-CC"]
    cfg = data([f"data.source={source}", f"{opts}.inputs=[{src}]", f"{opts}.subsets={json.dumps(keep)}"])
    got = list(iter_documents(cfg))
    assert (
        got == [o["text"] for o in lines if o["text"] and o["meta"]["pile_set_name"] in keep]
        and len(got) == 20
    )
    assert list(describe_source(cfg).items()) == [
        ("source", source),
        ("inputs", [str(src)]),
        ("max_documents", None),
        ("text_key", "text"),
        ("pile_subsets", keep),
    ]


def test_jsonl_reads_another_text_key(tmp_path):
    src = tmp_path / "c.jsonl"
    src.write_text('{"body": "one"}\n\n{"body": "two\\nlines"}\n')
    cfg = data(
        [
            "data.source=jsonl",
            f"data.source_options.jsonl.inputs=[{src}]",
            "data.source_options.jsonl.text_key=body",
        ]
    )
    assert list(iter_documents(cfg)) == ["one", "two\nlines"]


@pytest.mark.parametrize(
    "split, want",
    [
        ("file", ["A one.\nA two.\n\nB one.\n  \nC one.\n", "D one.\n"]),
        ("blank_lines", ["A one.\nA two.", "B one.", "C one.", "D one."]),
        ("line", ["A one.", "A two.", "B one.", "C one.", "D one."]),
    ],
)
def test_text_splits_files_paragraphs_lines(tmp_path, split, want):
    (tmp_path / "a.txt").write_text("A one.\nA two.\n\nB one.\n  \nC one.\n")
    (tmp_path / "b.txt.zst").write_bytes(zstandard.ZstdCompressor().compress(b"D one.\n"))
    (tmp_path / "skipped.json").write_text("not text")
    cfg = data(
        [
            "data.source=text",
            f"data.source_options.text.inputs=[{tmp_path}]",
            f"data.source_options.text.doc_split={split}",
        ]
    )
    assert list(iter_documents(cfg)) == want
    assert list(describe_source(cfg).items()) == [
        ("source", "text"),
        ("inputs", [str(tmp_path)]),
        ("max_documents", None),
        ("text_doc_split", split),
    ]


def test_hf_reads_a_local_json_file_and_a_saved_data_set(tmp_path):
    import datasets

    docs = make_docs(25, seed=8)
    src = write_jsonl(tmp_path / "local.jsonl", docs)
    want = [o["text"] for o in _jsonl_lines(src.read_bytes())]
    cfg = data(["data.source=hf", f"data.source_options.hf.inputs=[{src}]"])
    assert list(iter_documents(cfg)) == want == docs
    streamed = data(
        ["data.source=hf", f"data.source_options.hf.inputs=[{src}]", "data.source_options.hf.streaming=true"]
    )
    assert list(iter_documents(streamed)) == want
    assert describe_source(streamed) == describe_source(cfg)  # streaming reads the same documents
    assert list(describe_source(cfg).items()) == [
        ("source", "hf"),
        ("inputs", [str(src)]),
        ("max_documents", None),
        ("text_key", "text"),
        ("hf_config", None),
        ("hf_split", "train"),
    ]
    saved = tmp_path / "saved"
    datasets.DatasetDict({"test": datasets.Dataset.from_dict({"body": docs[:4]})}).save_to_disk(str(saved))
    opts = [
        "data.source=hf",
        f"data.source_options.hf.inputs=[{saved}]",
        "data.source_options.hf.text_key=body",
    ]
    with pytest.raises(
        LMStackError, match=r"no split 'train' \(has \['test'\]\); set data\.source_options\.hf\.split$"
    ):
        list(iter_documents(data(opts)))
    assert list(iter_documents(data([*opts, "data.source_options.hf.split=test"]))) == docs[:4]
    no_column = [*opts[:2], "data.source_options.hf.split=test"]  # the text is under "body"
    with pytest.raises(LMStackError, match=r"no column 'text' .*; set data\.source_options\.hf\.text_key$"):
        list(iter_documents(data(no_column)))


# --- prepared folders across the old and new config forms ----------------------------------------
def test_a_folder_prepared_from_the_new_form_is_reused_from_the_old(prepared, tmp_path):
    """The same documents under either form: same settings, every finished shard (checked against its
    checksums) skipped; another option is refused as other settings."""
    cfg, index = prepared
    work = tmp_path / "copy"
    shutil.copytree(cfg.path, work)
    raw = dataclasses.asdict(cfg)
    raw.update(path=str(work), inputs=raw.pop("source_options")["jsonl"]["inputs"])
    old = tmp_path / "old.yaml"
    old.write_text(yaml.safe_dump({"data": raw}))
    assert "source_options" not in old.read_text() and "inputs:" in old.read_text()
    old_cfg = load_config(old).data
    assert old_cfg == dataclasses.replace(cfg, path=str(work))
    again = prepare_data(old_cfg, progress=False)
    n_shards = len(index.shards("train")) + len(index.shards("val"))
    assert again.stats["shards_written"] == [] and len(again.stats["shards_skipped"]) == n_shards
    assert again.settings == index.settings
    with pytest.raises(
        LMStackError,
        match=r"already prepared with other settings \(source: .*'pile_subsets': None.* then, .*'pile_subsets': \['ArXiv'\].* now\)",
    ):
        prepare_data(load_config(old, ["data.pile_subsets=[ArXiv]"]).data, progress=False)


# --- a source that plugs in from outside ---------------------------------------------------------
@dataclass
class CountingOptions:
    # How many documents, and the word each one repeats.
    count: int = 3
    word: str = "tick"


class Counting(Source):
    """Documents "tick 1", "tick tick 2", ...: a source that reads no file."""

    Options = CountingOptions

    def validate(self) -> None:
        if self.options.count < 1:
            raise ConfigError(f"{self.where}count: expected a positive integer, got {self.options.count}")

    def documents(self) -> Iterator[str]:
        return (" ".join([self.options.word] * i + [str(i)]) for i in range(1, self.options.count + 1))

    def describe(self, max_documents: int | None) -> dict:
        return {**dataclasses.asdict(self.options), "max_documents": max_documents}


@pytest.fixture
def counting():
    register("counting")(Counting)
    yield
    del SOURCES["counting"]


def test_a_source_registered_in_a_test_plugs_in_through_the_config(counting, tmp_path):
    opts = "data.source_options.counting"
    cfg = data(
        [
            "data.source=counting",
            f"{opts}.count=40",
            f"{opts}.word=tock",
            f"data.path={tmp_path / 'd'}",
            *SMALL,
        ]
    )
    want = [" ".join(["tock"] * i + [str(i)]) for i in range(1, 41)]
    assert list(iter_documents(cfg)) == want
    index = prepare_data(cfg, progress=False)
    assert index.settings["source"] == {
        "source": "counting",
        "count": 40,
        "word": "tock",
        "max_documents": None,
    }
    assert index.num_documents("train") == 40
    tok = load_data_tokenizer(index.path)
    assert [tok.decode(d[:-1]) for d in shard_documents(index, "train")] == want
    raises_one_line(
        ["data.source=counting", f"{opts}.count=0"],
        "data.source_options.counting.count: expected a positive integer, got 0",
    )
    raises_one_line(
        ["data.source=counting", f"{opts}.words=x"],
        "data.source_options.counting.words: unknown key; did you mean 'data.source_options.counting.word'?",
    )
    raises_one_line(
        ["data.source=counting", "data.inputs=[a]"],
        "data.inputs: source 'counting' does not read it (it is now data.source_options.hf.inputs or "
        "data.source_options.jsonl.inputs or data.source_options.pile.inputs or data.source_options.text.inputs); "
        "remove it or set data.source to a source that reads it",
    )
    with pytest.raises(ConfigError, match=r"registered: counting, default, hf, jsonl, pile, text$"):
        get_source("nope")
