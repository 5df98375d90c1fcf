"""Fixtures of the data tests: a tiny prepared corpus shared by the session."""

from __future__ import annotations

import pytest
from data_helpers import data_cfg, make_docs, write_jsonl


@pytest.fixture(scope="session")
def corpus_docs() -> list[str]:
    return make_docs(240, seed=1)


@pytest.fixture(scope="session")
def prepared(tmp_path_factory, corpus_docs):
    """(config, index) of a prepared tiny jsonl corpus with several shards per split."""
    from lmstack.data import prepare_data

    root = tmp_path_factory.mktemp("prepared")
    src = write_jsonl(root / "corpus.jsonl", corpus_docs)
    cfg = data_cfg(root / "data", "jsonl", {"inputs": [str(src)]})
    index = prepare_data(cfg, progress=False)
    return cfg, index
