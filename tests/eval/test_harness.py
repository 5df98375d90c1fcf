"""lm-eval offline on exported tiny models with the local task pack (both task kinds)."""

from __future__ import annotations

import json
import math

import pytest

from lmstack.errors import LMStackError
from lmstack.eval import harness
from lmstack.eval.loading import load_model, training_add_bos


def test_expand_tasks_presets_and_commas():
    assert harness.expand_tasks(["paper"]) == [
        "wikitext",
        "lambada_openai",
        "piqa",
        "hellaswag",
        "winogrande",
        "arc_easy",
        "arc_challenge",
    ]
    ext = harness.expand_tasks(["extended"])
    assert ext[:7] == harness.PRESETS["paper"] and ext[7:] == ["boolq", "sciq", "openbookqa", "copa"]
    assert harness.expand_tasks(["offline,piqa", "piqa"]) == ["lmstack_lambada", "lmstack_mc", "piqa"]
    with pytest.raises(LMStackError):
        harness.expand_tasks([" , "])


def test_conventional_metrics():
    res = {"acc,none": 0.5, "acc_stderr,none": 0.01, "acc_norm,none": 0.6, "acc_norm_stderr,none": 0.02}
    assert [(r["metric"], r["value"]) for r in harness.headline("hellaswag", res)] == [("acc_norm", 0.6)]
    assert [(r["metric"], r["value"]) for r in harness.headline("arc_challenge", res)] == [("acc_norm", 0.6)]
    assert [(r["metric"], r["value"]) for r in harness.headline("piqa", res)] == [
        ("acc", 0.5),
        ("acc_norm", 0.6),
    ]
    no_norm = {"acc,none": 0.5, "acc_stderr,none": 0.01}
    assert [(r["metric"], r["value"]) for r in harness.headline("piqa", no_norm)] == [("acc", 0.5)]
    wiki = {"word_perplexity,none": 30.0, "byte_perplexity,none": 2.0, "bits_per_byte,none": 1.0}
    (row,) = harness.headline("wikitext", wiki)
    assert row["metric"] == "word ppl" and row["value"] == 30.0 and not row["higher_is_better"]
    lmb = {"perplexity,none": 20.0, "perplexity_stderr,none": 1.0, "acc,none": 0.4, "acc_stderr,none": 0.01}
    assert [r["metric"] for r in harness.headline("lambada_openai", lmb)] == ["ppl", "acc"]


GHOST_TASK = """
task: ghost_mc
dataset_path: lmstack-tests/no-such-dataset
dataset_name: main
output_type: multiple_choice
test_split: test
doc_to_text: "{{q}}"
doc_to_choice: "{{choices}}"
doc_to_target: 0
"""


def test_missing_hub_dataset_is_explained(tmp_path):
    (tmp_path / "ghost.yaml").write_text(GHOST_TASK)
    with pytest.raises(LMStackError) as err:
        harness.load_task_dict(["ghost_mc", "lmstack_mc"], extra_include=[str(tmp_path)])
    msg = str(err.value)
    assert "ghost_mc: data set 'lmstack-tests/no-such-dataset' (config 'main') not available" in msg
    assert "lmstack_mc:" not in msg  # the local task loaded fine
    assert "HF_HOME" in msg and "--include-path" in msg and "--tasks offline" in msg


@pytest.mark.slow
def test_paper_preset_without_hub_data_names_every_task():
    with pytest.raises(LMStackError) as err:
        harness.load_task_dict(harness.expand_tasks(["paper"]))
    msg = str(err.value)
    for task in harness.PRESETS["paper"]:
        assert f"  {task}: data set" in msg


@pytest.mark.slow
def test_unknown_task_is_named():
    with pytest.raises(LMStackError, match="no_such_task"):
        harness.load_task_dict(["no_such_task"])


def test_task_pack_loads_from_any_cwd(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    tasks = harness.load_task_dict(harness.expand_tasks(["offline"]))
    assert set(tasks) == {"lmstack_lambada", "lmstack_mc"}
    assert len(list(tasks["lmstack_lambada"].eval_docs)) >= 200
    assert len(list(tasks["lmstack_mc"].eval_docs)) >= 200


def test_bos_follows_training(exported):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(exported["trained"]))
    assert training_add_bos(tok) is False  # data prepared with add_bos: false


def test_harness_offline_both_task_kinds(exported, tmp_path):
    rep = harness.run_harness(
        str(exported["trained"]),
        ["offline"],
        batch_size=16,
        limit=40,
        output=str(tmp_path),
        log=lambda m: None,
    )
    assert set(rep["results"]) == {"lmstack_lambada", "lmstack_mc"}
    assert rep["n_samples"]["lmstack_mc"]["effective"] == 40
    rows = {(r["task"], r["metric"]): r for r in rep["summary"]}
    assert set(rows) == {
        ("lmstack_lambada", "ppl"),
        ("lmstack_lambada", "acc"),
        ("lmstack_mc", "acc"),
        ("lmstack_mc", "acc_norm"),
    }
    assert rows[("lmstack_mc", "acc_norm")]["value"] == rep["results"]["lmstack_mc"]["acc_norm,none"]
    assert rows[("lmstack_lambada", "ppl")]["value"] > 1 and math.isfinite(
        rows[("lmstack_lambada", "ppl")]["value"]
    )
    assert 0 <= rows[("lmstack_mc", "acc")]["value"] <= 1
    assert rep["settings"]["add_bos_token"] is False
    saved = json.loads((tmp_path / "harness.json").read_text())
    assert saved["summary"] == rep["summary"]
    md = (tmp_path / "harness.md").read_text()
    assert "| lmstack_lambada | ppl |" in md and "| lmstack_mc | acc (%) |" in md
    assert "| lmstack_mc | acc_norm (%) |" in md


def test_trained_beats_untrained_on_lambada_style_task(exported):
    tasks = harness.load_task_dict(["lmstack_lambada"])
    scores = {}
    for name in ("untrained", "trained"):
        loaded = load_model(exported[name])
        lm = harness.make_lm(loaded.model, loaded.tokenizer, loaded.add_bos, batch_size=32)
        res = harness.evaluate(lm, tasks)["results"]["lmstack_lambada"]
        scores[name] = (res["perplexity,none"], res["acc,none"])
    (ppl_u, acc_u), (ppl_t, acc_t) = scores["untrained"], scores["trained"]
    assert ppl_t < ppl_u / 10, scores
    assert acc_t >= acc_u, scores


@pytest.mark.parametrize("add_bos", [False, True])
def test_lm_eval_framing_matches_training(tmp_path, add_bos):
    """BOS before every input exactly when the data was prepared with add_bos; text with no context
    is conditioned on BOS (add_bos) or on EOS, which precedes every document in training otherwise."""
    from transformers import AutoTokenizer

    from lmstack.config import DataConfig
    from lmstack.data import prepare_data
    from lmstack.model import LM, ModelConfig
    from lmstack.model.schema import from_dict

    src = tmp_path / "t.jsonl"
    src.write_text("".join(json.dumps({"text": f"line {i} of the text"}) + "\n" for i in range(50)))
    cfg = from_dict(
        DataConfig,
        {
            "path": str(tmp_path / "d"),
            "source": "jsonl",
            "source_options": {"jsonl": {"inputs": [str(src)]}},
            "vocab_size": 300,
            "num_workers": 1,
            "add_bos": add_bos,
        },
    )
    index = prepare_data(cfg, progress=False)
    tok = AutoTokenizer.from_pretrained(str(tmp_path / "d" / "tokenizer"))
    assert training_add_bos(tok) is add_bos
    from lmstack.export.hf import LMStackConfig, LMStackForCausalLM

    model = LMStackForCausalLM(
        LMStackConfig.from_model_config(
            ModelConfig(vocab_size=index.vocab_size, d_model=32, n_layers=1, n_heads=2)
        )
    )
    assert isinstance(model.model, LM)
    lm = harness.make_lm(model, tok, add_bos)
    ids = lm.tok_encode("line 3")
    bos, eos = index.tokenizer["bos_token_id"], index.tokenizer["eos_token_id"]
    assert (ids[0] == bos) is add_bos
    assert lm.prefix_token_id == (bos if add_bos else eos)


@pytest.fixture(scope="module")
def mc_requests():
    """(context, continuation) pairs of the offline multiple-choice task: 12 items x 4 choices."""
    pairs = []
    with open(harness.TASK_PACK / "lmstack_mc.jsonl", encoding="utf-8") as f:
        for line, _ in zip(f, range(12)):
            item = json.loads(line)
            pairs += [(item["context"], " " + choice) for choice in item["choices"]]
    return pairs


@pytest.mark.parametrize("batch_size", [1, 16])
def test_harness_loglikelihoods_equal_direct_log_softmax_sums(exported, mc_requests, batch_size):
    """lm-eval's per-request log-likelihoods (batched, right-padded by lm-eval) equal the sum of the
    continuation tokens' log-softmax from one plain forward of the lmstack LM per request."""
    import torch
    import torch.nn.functional as F
    from lm_eval.api.instance import Instance

    loaded = load_model(exported["trained"])
    lm = harness.make_lm(loaded.model, loaded.tokenizer, loaded.add_bos, batch_size=batch_size)
    requests = [
        Instance(request_type="loglikelihood", doc={}, arguments=pair, idx=i)
        for i, pair in enumerate(mc_requests)
    ]
    got = [logp for logp, _ in lm.loglikelihood(requests, disable_tqdm=True)]
    tok, model = loaded.tokenizer, loaded.model.model
    for (context, continuation), value in zip(mc_requests, got):
        ids = tok(context + continuation, add_special_tokens=False)["input_ids"]
        n_ctx = len(tok(context, add_special_tokens=False)["input_ids"])
        with torch.no_grad():
            logp = F.log_softmax(model(torch.tensor([ids])).logits[0].double(), -1)
        direct = sum(logp[t - 1, ids[t]].item() for t in range(n_ctx, len(ids)))
        assert value == pytest.approx(direct, rel=1e-5, abs=1e-4), (context[-30:], continuation)


def test_lm_eval_generate_until_is_the_same_at_batch_1_and_8(exported, mc_requests):
    """lm-eval's generate_until left-pads a batch of contexts and decodes with the cache: the
    continuations equal those generated one context at a time."""
    from lm_eval.api.instance import Instance

    loaded = load_model(exported["trained"])
    until = {"until": ["\n\n"], "max_gen_toks": 8, "do_sample": False}
    # contexts of different lengths, so that the batch holds padding
    contexts = [context[: 40 + 23 * i] for i, (context, _) in enumerate(mc_requests[::4][:8])]
    outputs = {}
    for batch_size in (1, 8):
        lm = harness.make_lm(loaded.model, loaded.tokenizer, loaded.add_bos, batch_size=batch_size)
        requests = [
            Instance(request_type="generate_until", doc={}, arguments=(c, dict(until)), idx=i)
            for i, c in enumerate(contexts)
        ]
        outputs[batch_size] = lm.generate_until(requests, disable_tqdm=True)
    assert outputs[8] == outputs[1] and len(set(outputs[1])) > 1
