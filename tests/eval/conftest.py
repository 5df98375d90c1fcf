"""Fixtures of the evaluation tests: a prepared corpus of held-out verse, a tiny model trained on it
with a plain torch loop, an untrained twin, and both exported as Hugging Face folders."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[2]
TASKS = REPO / "evals" / "tasks"


@pytest.fixture(scope="session", autouse=True)
def _one_thread():
    """These models are tiny: one thread is as fast, and on a busy machine a second one only spin-waits."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def training_docs() -> list[str]:
    """Early-modern English verse (Milton, from the task pack's multiple-choice file): text of the
    same kind as the LAMBADA-style items (King James Bible) without containing them."""
    docs = []
    with open(TASKS / "lmstack_mc.jsonl", encoding="utf-8") as f:
        for line in f:
            item = json.loads(line)
            docs.append(item["context"] + "\n" + item["choices"][item["label"]] + "\n")
    return docs


@pytest.fixture(scope="session")
def prepared(tmp_path_factory):
    """A prepared data folder (trained BPE, 10% validation split)."""
    from lmstack.config import DataConfig
    from lmstack.data import prepare_data
    from lmstack.model.schema import from_dict

    root = tmp_path_factory.mktemp("eval_data")
    src = root / "verse.jsonl"
    src.write_text("".join(json.dumps({"text": d}) + "\n" for d in training_docs() * 3), encoding="utf-8")
    cfg = from_dict(
        DataConfig,
        {
            "path": str(root / "data"),
            "source": "jsonl",
            "source_options": {"jsonl": {"inputs": [str(src)]}},
            "tokenizer": "bpe",
            "vocab_size": 512,
            "num_workers": 1,
            "val_fraction": 0.1,
            "seq_len": 64,
        },
        prefix="data.",
    )
    index = prepare_data(cfg, progress=False)
    return cfg, index


def tiny_lm(vocab_size: int, seed: int = 0):
    from lmstack.model import LM, ModelConfig

    torch.manual_seed(seed)
    cfg = ModelConfig(
        vocab_size=vocab_size,
        d_model=64,
        n_layers=2,
        n_heads=4,
        max_seq_len=128,
        mlp_hidden=128,
        eos_token_id=0,
    )
    return LM(cfg)


@pytest.fixture(scope="session")
def models(prepared):
    """(untrained, trained) LMs; the trained one saw ~150 steps of the training split."""
    from lmstack.data import TrainReader
    from lmstack.model import BatchContext

    cfg, index = prepared
    untrained = tiny_lm(index.vocab_size).eval()
    model = tiny_lm(index.vocab_size)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    reader = TrainReader(cfg.path, seq_len=64, batch_size=16, seed=0)
    model.train()
    losses = []
    for _ in range(150):
        batch = next(reader)
        logits = model(batch.input_ids, BatchContext.from_doc_ids(batch.doc_ids)).logits
        loss = F.cross_entropy(logits.flatten(0, 1), batch.labels.flatten(), ignore_index=-100)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert sum(losses[-10:]) < sum(losses[:10]), "the tiny model did not learn"
    return untrained, model.eval()


@pytest.fixture(scope="session")
def exported(tmp_path_factory, prepared, models):
    """{"untrained": dir, "trained": dir}: Hugging Face export folders with the data's tokenizer."""
    from lmstack.export.exporter import export_model

    cfg, _ = prepared
    root = tmp_path_factory.mktemp("eval_exports")
    out = {}
    for name, model in zip(("untrained", "trained"), models):
        out[name] = export_model(model, root / name, tokenizer_dir=Path(cfg.path) / "tokenizer").out_dir
    return out


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory, prepared):
    """A DeepSpeed (ZeRO 0) checkpoint of a one-step-trained model on the prepared data, laid out as
    the trainer does, and its export: {"run", "tag", "export", "reference" (the engine's own weights,
    fp32), "config"}."""
    import dataclasses
    import os
    import shutil
    import socket
    import subprocess
    import sys

    import yaml

    from lmstack.config import RunConfig
    from lmstack.export.exporter import export_checkpoint

    cfg, index = prepared
    root = tmp_path_factory.mktemp("eval_checkpoint")
    run_config = RunConfig(model=tiny_lm(index.vocab_size).config, data=cfg)
    (root / "config.yaml").write_text(yaml.safe_dump(dataclasses.asdict(run_config), sort_keys=False))
    shutil.copytree(Path(cfg.path) / "tokenizer", root / "tokenizer")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = str(s.getsockname()[1])
    script = REPO / "tests" / "export" / "make_ds_checkpoint.py"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    proc = subprocess.run(
        [sys.executable, str(script), str(root), port, "0"],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    run = root / "stage0"
    export = export_checkpoint(run, root / "hf").out_dir
    reference = torch.load(run / "reference.pt")
    tag = run / "checkpoints" / "step_00000001"
    return {"run": run, "tag": tag, "export": export, "reference": reference, "config": run_config}
