"""The tokenizer of a prepared data set: a trained byte-level BPE or any Hugging Face tokenizer.

Documents are encoded without the tokenizer's own special tokens; the data pipeline appends EOS to
every document and, with `add_bos`, prepends BOS. That choice and the tokenizer itself are stored in
the data folder, so that training, export and evaluation all use the same ones:

    DATA/tokenizer.json      the `tokenizers` JSON (its sha256 is the tokenizer's identity)
    DATA/tokenizer/          the same as a Hugging Face folder (`AutoTokenizer.from_pretrained`),
                             with bos/eos/pad set; with add_bos its post-processor prepends BOS
    DATA/index.json          "tokenizer": {kind, source, sha256, vocab_size, eos/bos/pad tokens and ids,
                             add_bos, eos_after_document}
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lmstack.errors import LMStackError

TOKENIZER_FILE = "tokenizer.json"
HF_TOKENIZER_DIR = "tokenizer"

#: Special tokens of a trained BPE, in id order (0, 1, 2).
BPE_EOS, BPE_BOS, BPE_PAD = "<|endoftext|>", "<|bos|>", "<|pad|>"
#: EOS names tried, in order, when a loaded tokenizer does not say which one it uses.
USUAL_EOS = ("<|endoftext|>", "</s>", "<|end_of_text|>", "<eos>", "<|eot_id|>", "[SEP]")
USUAL_BOS = ("<|bos|>", "<|begin_of_text|>", "<s>", "<bos>", "[CLS]")
USUAL_PAD = ("<|pad|>", "<pad>", "[PAD]")


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 when every id fits (vocab_size <= 65536), else uint32."""
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.uint32)


@dataclass
class DataTokenizer:
    """A `tokenizers.Tokenizer` with the document framing of the data set."""

    json_str: str  # the tokenizer, serialised (tokenizer.json)
    kind: str  # "bpe" (trained here) or "pretrained"
    source: str  # "bpe" or the path / hub name it was loaded from
    eos_token: str
    bos_token: str | None
    pad_token: str | None
    add_bos: bool

    def __post_init__(self) -> None:
        from tokenizers import Tokenizer

        self.tokenizer = Tokenizer.from_str(self.json_str)
        self.eos_id = self._id(self.eos_token, "eos_token")
        self.bos_id = self._id(self.bos_token, "bos_token") if self.bos_token is not None else None
        self.pad_id = self._id(self.pad_token, "pad_token") if self.pad_token is not None else None
        if self.add_bos and self.bos_id is None:
            raise LMStackError(
                f"tokenizer '{self.source}': data.add_bos is set but it has no BOS token; set data.bos_token"
            )
        self.vocab_size = max(self.tokenizer.get_vocab(with_added_tokens=True).values()) + 1
        self.sha256 = hashlib.sha256(self.json_str.encode()).hexdigest()
        self.dtype = token_dtype(self.vocab_size)

    def _id(self, token: str, what: str) -> int:
        tid = self.tokenizer.token_to_id(token)
        if tid is None:
            raise LMStackError(
                f"tokenizer '{self.source}': {what} '{token}' is not in its vocabulary; set data.{what}"
            )
        return tid

    # -- encoding -------------------------------------------------------------------------------
    def encode_documents(self, docs: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """Token ids of `docs`, each framed as [BOS] text EOS, concatenated; and each one's length."""
        enc = getattr(self.tokenizer, "encode_batch_fast", self.tokenizer.encode_batch)
        encodings = enc(docs, add_special_tokens=False)
        flat: list[int] = []
        lengths = np.empty(len(docs), dtype=np.int64)
        bos, eos = (self.bos_id if self.add_bos else None), self.eos_id
        for i, e in enumerate(encodings):
            n = len(flat)
            if bos is not None:
                flat.append(bos)
            flat.extend(e.ids)
            flat.append(eos)
            lengths[i] = len(flat) - n
        return np.array(flat, dtype=self.dtype), lengths

    def encode(self, text: str) -> list[int]:
        """Token ids of `text` alone (no BOS/EOS)."""
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        return self.tokenizer.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    # -- the record and the files ---------------------------------------------------------------
    def record(self) -> dict:
        return {
            "kind": self.kind,
            "source": self.source,
            "sha256": self.sha256,
            "vocab_size": self.vocab_size,
            "file": TOKENIZER_FILE,
            "hf_dir": HF_TOKENIZER_DIR,
            "eos_token": self.eos_token,
            "eos_token_id": self.eos_id,
            "bos_token": self.bos_token,
            "bos_token_id": self.bos_id,
            "pad_token": self.pad_token,
            "pad_token_id": self.pad_id,
            "add_bos": self.add_bos,
            "eos_after_document": True,
        }

    def save(self, data_dir: Path) -> None:
        """Write DATA/tokenizer.json and the Hugging Face folder DATA/tokenizer/ (each atomically)."""
        data_dir = Path(data_dir)
        tmp = data_dir / (TOKENIZER_FILE + ".tmp")
        tmp.write_text(self.json_str, encoding="utf-8")
        os.replace(tmp, data_dir / TOKENIZER_FILE)

        from tokenizers import Tokenizer
        from tokenizers.processors import TemplateProcessing
        from transformers import PreTrainedTokenizerFast

        tok = Tokenizer.from_str(self.json_str)
        if self.add_bos:  # so that HF users (lm-eval) get BOS at the start like the training data
            tok.post_processor = TemplateProcessing(
                single=f"{self.bos_token} $A",
                pair=f"{self.bos_token} $A $B",
                special_tokens=[(self.bos_token, self.bos_id)],
            )
        hf = PreTrainedTokenizerFast(
            tokenizer_object=tok, eos_token=self.eos_token, bos_token=self.bos_token, pad_token=self.pad_token
        )
        tmp_dir = data_dir / (HF_TOKENIZER_DIR + ".tmp")
        shutil.rmtree(tmp_dir, ignore_errors=True)
        hf.save_pretrained(str(tmp_dir))
        final = data_dir / HF_TOKENIZER_DIR
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp_dir, final)


# ---------------------------------------------------------------------------------------------
def train_bpe(docs: Iterable[str], vocab_size: int, max_bytes: int | None = None) -> str:
    """Train a byte-level BPE (GPT-2 style, lossless on any UTF-8 text) on `docs` (at most
    `max_bytes` of them). Ids 0, 1, 2 are <|endoftext|>, <|bos|>, <|pad|>. Returns tokenizer.json."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[BPE_EOS, BPE_BOS, BPE_PAD],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )

    def limited() -> Iterator[str]:
        seen = 0
        for doc in docs:
            yield doc
            seen += len(doc.encode("utf-8"))
            if max_bytes is not None and seen >= max_bytes:
                return

    tok.train_from_iterator(limited(), trainer=trainer)
    return tok.to_str()


def _special_from_config(config: dict, key: str) -> str | None:
    value = config.get(key)
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def load_pretrained(spec: str) -> tuple[str, dict]:
    """tokenizer.json text and the special tokens named in tokenizer_config.json (if any) of a
    tokenizer.json file, a tokenizer folder or a hub name."""
    path = Path(os.path.expanduser(spec))
    config: dict = {}
    if path.is_file():
        json_path = path
        cfg_path = path.with_name("tokenizer_config.json")
    elif path.is_dir() and (path / TOKENIZER_FILE).is_file():
        json_path = path / TOKENIZER_FILE
        cfg_path = path / "tokenizer_config.json"
    else:
        if not path.exists() and (spec.startswith((".", "/", "~")) or spec.endswith(".json")):
            raise LMStackError(f"data.tokenizer: '{spec}': no such file or folder")
        try:  # a folder without tokenizer.json, or a hub name: let transformers resolve it
            from transformers import AutoTokenizer

            hf = AutoTokenizer.from_pretrained(spec)
        except Exception as err:
            raise LMStackError(
                f"data.tokenizer: cannot load '{spec}' (expected 'bpe', a tokenizer.json, a tokenizer folder or a "
                f"hub name): {type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
            ) from None
        backend = getattr(hf, "backend_tokenizer", None) or getattr(hf, "_tokenizer", None)
        if backend is None:
            raise LMStackError(
                f"data.tokenizer: '{spec}' has no fast (tokenizers) version; convert it to tokenizer.json"
            )
        for key in ("eos_token", "bos_token", "pad_token"):
            value = getattr(hf, key, None)
            if isinstance(value, str):
                config[key] = value
        return backend.to_str(), config
    try:
        text = json_path.read_text(encoding="utf-8")
        from tokenizers import Tokenizer

        Tokenizer.from_str(text)
    except Exception as err:
        raise LMStackError(f"{json_path}: not a loadable tokenizer.json: {err}") from None
    if cfg_path.is_file():
        try:
            config = json.loads(cfg_path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError):
            config = {}
    return text, {k: _special_from_config(config, k) for k in ("eos_token", "bos_token", "pad_token")}


def build_tokenizer(
    spec: str,
    *,
    vocab_size: int = 8192,
    train_docs: Iterable[str] | None = None,
    train_bytes: int | None = None,
    add_bos: bool = False,
    eos_token: str | None = None,
    bos_token: str | None = None,
) -> DataTokenizer:
    """`spec == "bpe"`: train on `train_docs`; otherwise load a pretrained tokenizer (see load_pretrained)."""
    if spec == "bpe":
        if train_docs is None:
            raise ValueError("train_docs is needed to train a BPE")
        json_str = train_bpe(train_docs, vocab_size, train_bytes)
        return DataTokenizer(
            json_str, "bpe", "bpe", eos_token or BPE_EOS, bos_token or BPE_BOS, BPE_PAD, add_bos
        )
    json_str, named = load_pretrained(spec)
    from tokenizers import Tokenizer

    vocab = Tokenizer.from_str(json_str).get_vocab(with_added_tokens=True)
    eos = eos_token or named.get("eos_token") or next((t for t in USUAL_EOS if t in vocab), None)
    if eos is None:
        raise LMStackError(
            f"data.tokenizer: '{spec}' names no EOS token and has none of {list(USUAL_EOS)}; set data.eos_token"
        )
    bos = bos_token or named.get("bos_token") or next((t for t in USUAL_BOS if t in vocab), None)
    if bos is None and add_bos:
        bos = eos  # GPT-2 / GPT-NeoX convention: one <|endoftext|> token for both
    pad = named.get("pad_token") or next((t for t in USUAL_PAD if t in vocab), None)
    if pad is not None and pad not in vocab:
        pad = None
    return DataTokenizer(json_str, "pretrained", spec, eos, bos, pad, add_bos)


def load_data_tokenizer(data_dir: str | Path, record: dict | None = None) -> DataTokenizer:
    """The tokenizer of a prepared data folder, as recorded in its index."""
    data_dir = Path(data_dir)
    if record is None:
        from lmstack.data.shards import load_index

        record = load_index(data_dir).tokenizer
    from lmstack.data.shards import check_tokenizer

    check_tokenizer(data_dir, record)  # before parsing: a truncated file gets the integrity error
    path = data_dir / record.get("file", TOKENIZER_FILE)
    try:
        json_str = path.read_text(encoding="utf-8")
    except OSError as err:
        raise LMStackError(f"{path}: cannot read the data set's tokenizer: {err}") from None
    tok = DataTokenizer(
        json_str,
        record["kind"],
        record["source"],
        record["eos_token"],
        record["bos_token"],
        record["pad_token"],
        record["add_bos"],
    )
    return tok


def load_hf_tokenizer(data_dir: str | Path):
    """The Hugging Face tokenizer of a prepared data folder (DATA/tokenizer/), for export and evaluation."""
    from transformers import AutoTokenizer

    path = Path(data_dir) / HF_TOKENIZER_DIR
    if not path.is_dir():
        raise LMStackError(f"{path}: not found; run `lmstack prepare-data` for this data folder first")
    return AutoTokenizer.from_pretrained(str(path))
