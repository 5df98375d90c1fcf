"""`lmstack prepare-data` from the command line."""

from __future__ import annotations

import json

import pytest
from data_helpers import make_docs, write_jsonl

from lmstack.cli import main


def run(argv, capsys):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    return exc.value.code, capsys.readouterr()


def test_prepare_data_cli(tmp_path, capsys):
    src = write_jsonl(tmp_path / "c.jsonl.zst", make_docs(40, seed=2))
    cfg = tmp_path / "run.yaml"
    cfg.write_text(
        f"data:\n  source: pile\n  source_options: {{pile: {{inputs: [{src}]}}}}\n  path: {tmp_path / 'd'}\n"
        "  vocab_size: 300\n"
    )
    main(["prepare-data", str(cfg), "data.num_workers=1", "data.val_fraction=0.1", "-q"])
    out = capsys.readouterr().out
    assert out.startswith(f"prepared {tmp_path / 'd'}: train ") and "vocab 300 (uint16)" in out
    index = json.loads((tmp_path / "d" / "index.json").read_text())
    assert index["splits"]["val"]["num_documents"] == 4
    main(["prepare-data", str(cfg), "data.num_workers=1", "data.val_fraction=0.1", "-q"])
    assert "0 shards written, 2 skipped" in capsys.readouterr().out


@pytest.mark.parametrize(
    "args, message, alone",
    [
        (
            ["data.source=pile", "data.inputs=[{tmp}/nope.jsonl.zst]"],  # the old flat key names the new one
            "data.source_options.pile.inputs[0]: '{tmp}/nope.jsonl.zst': no such file",
            1,
        ),
        (["data.source=pile"], "data.source_options.pile.inputs: source 'pile' needs at least one file", 1),
        (["data.vocab_size=100"], "data.vocab_size: a byte-level BPE needs 260 <= vocab_size, got 100", 1),
        (
            ["data.source=piles"],
            "data.source: unknown data source 'piles'; registered: default, hf, jsonl,",
            1,
        ),
        (
            ["data.source=text", "data.inputs=[a.txt]", "data.source_options.text.inputs=[b.txt]"],
            "data.inputs: ['a.txt'] conflicts with data.source_options.text.inputs: ['b.txt']",
            1,
        ),
        (["data.hf_split=test"], "data.hf_split: source 'default' does not read it", 1),
        # found while reading, after the log line that BPE training started
        (
            ["data.source=jsonl", "data.source_options.jsonl.inputs=[{tmp}/bad.jsonl]"],
            "{tmp}/bad.jsonl:2: not a JSON line",
            0,
        ),
    ],
)
def test_prepare_data_bad_input_is_one_line(tmp_path, capsys, args, message, alone):
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n{"text": oops}\n')
    argv = ["prepare-data", *(a.format(tmp=tmp_path) for a in args), f"data.path={tmp_path / 'd'}"]
    code, captured = run(argv, capsys)
    lines = captured.err.strip().splitlines()
    assert code == 2 and "Traceback" not in captured.err, captured.err
    assert lines[-1].startswith("lmstack prepare-data: error: ") and message.format(tmp=tmp_path) in lines[-1]
    if alone:
        assert len(lines) == 1, captured.err
    assert not (tmp_path / "d" / "index.json").exists()
