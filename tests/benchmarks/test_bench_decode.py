"""benchmarks/bench_decode.py --quick: its own check (cached decoding through the HF export's
generate() equals the full forward) passes for every mixer, and its JSON says what it measured."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "benchmarks"))

import bench_decode  # noqa: E402

from lmstack.model import MIXERS  # noqa: E402

LINEAR = ("lightning", "gla", "deltanet")
KV_CACHE = ("attention", "moh")  # every past key and value is kept (moh: for every head)


@pytest.fixture(scope="module")
def quick(tmp_path_factory) -> tuple[dict, Path]:
    out = tmp_path_factory.mktemp("decode") / "decode.json"
    bench_decode.main(["--quick", "--out", str(out)])
    return json.loads(out.read_text()), out


def test_cached_decoding_equals_the_full_forward_for_every_mixer(quick) -> None:
    result, _ = quick
    assert result["mixers"] == [m for m in MIXERS if m != "shortconv"]
    assert result["failures"] == []
    lengths = bench_decode.QUICK["lengths"]
    assert [(r["mixer"], r["L"]) for r in result["results"]] == [
        (m, L) for m in result["mixers"] for L in lengths
    ]
    for r in result["results"]:
        assert r["greedy_tokens_equal"] and r["max_abs_logit_diff"] <= result["tolerance"], r
        assert r["decoded_tokens"] == bench_decode.QUICK["new_tokens"] - 1
        assert r["cache_tokens"] == r["L"]


def test_cache_bytes_grow_for_kv_caches_and_not_for_recurrent_states(quick) -> None:
    result, _ = quick
    s = result["shape"]
    rows = {(r["mixer"], r["L"]): r for r in result["results"]}
    short, long = bench_decode.QUICK["lengths"]
    for mixer in KV_CACHE:
        # keys and values, fp32, every layer: 2 x L x d_model x 4 bytes x n_layers
        for L in (short, long):
            assert rows[mixer, L]["cache_bytes"] == 2 * L * s["d_model"] * 4 * s["n_layers"]
    for mixer in LINEAR:
        assert rows[mixer, short]["cache_bytes"] == rows[mixer, long]["cache_bytes"] > 0


def test_json_records_device_versions_and_the_compare_key(quick) -> None:
    result, out = quick
    assert result["quick"] is True and result["device"].startswith("cpu") and result["torch"]
    assert result["transformers"] and result["date_utc"] and out.with_suffix(".png").stat().st_size > 0
    for mixer in result["mixers"]:
        per_length = result["decode_ms_per_token"][mixer]
        assert list(per_length) == [str(L) for L in bench_decode.QUICK["lengths"]]
        assert all(v > 0 for v in per_length.values())


def test_into_puts_the_result_under_decode_of_an_existing_file(tmp_path) -> None:
    target = tmp_path / "step.json"
    target.write_text(json.dumps({"step": "x", "failures": ["earlier"]}))
    bench_decode.main(["--quick", "--mixers", "lightning", "--lengths", "16", "--into", str(target)])
    data = json.loads(target.read_text())
    assert data["step"] == "x" and data["failures"] == ["earlier"]
    assert [r["L"] for r in data["decode"]["results"]] == [16] and not list(tmp_path.glob("*.png"))


def test_run_dir_writes_the_decode_json_that_compare_reads(tmp_path) -> None:
    from types import SimpleNamespace

    import torch

    from lmstack.eval.compare import decode_ms_per_token, long_context_columns
    from lmstack.export.exporter import export_model
    from lmstack.model import LM, ModelConfig

    torch.manual_seed(0)
    model = LM(ModelConfig(vocab_size=256, d_model=32, n_layers=2, n_heads=2, max_seq_len=64, mixer="gla"))
    export_model(model, tmp_path / "run" / "hf")  # as `lmstack export RUN RUN/hf` leaves it
    result = bench_decode.main(
        ["--run-dir", str(tmp_path / "run"), "--lengths", "16,48", "--new-tokens", "3"]
    )
    assert result["failures"] == [] and result["mixers"] == ["gla"]
    assert result["shape"]["d_model"] == 32 and result["results"][0]["params"] == model.num_params()
    written = json.loads((tmp_path / "run" / "decode.json").read_text())
    assert list(written["decode_ms_per_token"]) == ["16", "48"]
    run = SimpleNamespace(run_dir=tmp_path / "run")
    assert decode_ms_per_token(run, 48) == written["decode_ms_per_token"]["48"] > 0
    measured = {"decode_ms_per_token_8k": decode_ms_per_token(run, 48)}
    assert [title for title, _ in long_context_columns([measured])] == ["decode ms/token @8K"]
