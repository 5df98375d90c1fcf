"""Schemas of the run sections other than `model` (which lives with the model so it can travel)."""

from __future__ import annotations

import signal
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from lmstack.errors import ConfigError
from lmstack.model.config import ModelConfig
from lmstack.model.schema import from_dict

# Signal names `train.stop_signals` accepts: every one this platform has but SIGKILL and SIGSTOP (which
# no process can catch), those that report the process's own faults, and SIGCHLD and SIGCONT (sent
# by the system in normal operation: SLURM sends SIGCONT before every SIGTERM).
_NOT_STOP_SIGNALS = (
    "SIGKILL",
    "SIGSTOP",
    "SIGSEGV",
    "SIGBUS",
    "SIGFPE",
    "SIGILL",
    "SIGABRT",
    "SIGCHLD",
    "SIGCONT",
)
STOP_SIGNAL_NAMES = frozenset(s.name for s in signal.Signals if s.name not in _NOT_STOP_SIGNALS)


def _is_name(name: str) -> bool:
    """A name that can go into a metric's key (val/<name>/loss, data/tokens/<name>)."""
    return bool(name) and all(c.isalnum() or c in "_.-" for c in name)


@dataclass
class MixtureSource:
    """One prepared folder of `data.mixture`: its samples make up `weight` / (sum of the weights) of
    the training positions; `name` (default: the folder's name) keys its metrics."""

    path: str = ""
    weight: float = 1.0
    name: str | None = None

    def __post_init__(self) -> None:
        if self.name is None:
            self.name = Path(self.path).name

    def validate(self, prefix: str = "") -> None:
        if not self.path:
            raise ConfigError(f"{prefix}path: expected a prepared data folder, got an empty string")
        if not self.weight > 0:
            raise ConfigError(f"{prefix}weight: expected a positive number, got {self.weight}")
        if not _is_name(self.name):
            raise ConfigError(f"{prefix}name: expected letters, digits and '_.-', got {self.name!r}")


@dataclass
class DataConfig:
    """Where training tokens come from: `lmstack prepare-data` turns text into token shards under
    `path`; the trainer reads packed `seq_len` samples from there, or from the weighted folders of
    `mixture` (see lmstack.data)."""

    # Folder of prepared, memory-mapped token shards (`lmstack prepare-data` writes it).
    path: str = "data/default"
    # train: instead of data.path, several prepared folders (same tokenizer), samples drawn by weight
    # (normalised), e.g. [{path: data/pile, weight: 0.9}, {path: data/code, weight: 0.1, name: code}];
    # each source's tokens are logged as data/tokens/<name>, its val split as val/<name>/loss.
    mixture: list[MixtureSource] = field(default_factory=list)
    seq_len: int = 256
    # Seed of the shuffled order of training samples (independent of the model's init seed).
    seed: int = 1234

    # --- prepare-data: the text ---------------------------------------------------------------
    # A registered data source (lmstack.data.sources): default (the Shakespeare corpus shipped in
    # lmstack/data/corpus), jsonl, pile, text or hf; its options go under source_options.<name>.
    source: str = "default"
    # Options per source, e.g. {pile: {inputs: [...], subsets: [...]}}; sources not chosen are only
    # type-checked.
    source_options: dict[str, dict[str, Any]] = field(default_factory=dict)
    # Stop after this many documents (null: all); handy for quick runs and benchmarks.
    max_documents: int | None = None

    # --- prepare-data: the tokenizer -----------------------------------------------------------
    # "bpe": train a byte-level BPE on the corpus; otherwise a tokenizer.json file, a tokenizer folder
    # or a Hugging Face hub name (e.g. the GPT-NeoX-20B tokenizer for the Pile).
    tokenizer: str = "bpe"
    # Vocabulary size of a trained BPE (special tokens included).
    vocab_size: int = 8192
    # Megabytes of training-split text the BPE is trained on (the first ones of the stream).
    bpe_train_mb: float = 256.0
    # Every document ends with EOS; with add_bos it also starts with BOS.
    add_bos: bool = False
    # Special-token strings of a loaded tokenizer (null: from its tokenizer_config.json or usual names).
    eos_token: str | None = None
    bos_token: str | None = None

    # --- prepare-data: the output --------------------------------------------------------------
    # Every round(1 / val_fraction)-th document goes to the held-out validation split (0: none).
    val_fraction: float = 0.02
    # train: named prepared folders evaluated besides data.path's val split, each logged as
    # val/<name>/loss and val/<name>/ppl, e.g. {pile: data/pile_val} (the official Pile val.jsonl.zst
    # prepared with data.val_fraction=0 and data.tokenizer=<data.path>/tokenizer.json).
    val_path: dict[str, str] = field(default_factory=dict)
    # A shard closes once it holds this many megabytes of text.
    shard_mb: float = 64.0
    # Each input file is prepared in blocks of this many documents, each with its own shards: the
    # unit that worker processes and `prepare-data --part I/N` share out (the layout does not
    # depend on how many of them there are).
    block_docs: int = 50000
    # Tokenizer worker processes (0: one per CPU core; 1: tokenize in this process).
    num_workers: int = 0
    # Documents per tokenization task sent to a worker.
    batch_docs: int = 128

    def validate(self, prefix: str = "") -> None:
        def fail(name: str, msg: str) -> None:
            raise ConfigError(f"{prefix}{name}: {msg}")

        if not self.path:
            fail("path", "expected a folder for the prepared data, got an empty string")
        self._validate_mixture(prefix)
        if self.seq_len < 1:
            fail("seq_len", f"expected a positive integer, got {self.seq_len}")
        self._validate_source(prefix)
        if self.max_documents is not None and self.max_documents < 1:
            fail("max_documents", f"expected a positive integer or null, got {self.max_documents}")
        if not self.tokenizer:
            fail("tokenizer", "expected 'bpe' or a tokenizer file, folder or hub name")
        if self.tokenizer == "bpe" and not 260 <= self.vocab_size <= 2**32 - 1:
            fail("vocab_size", f"a byte-level BPE needs 260 <= vocab_size, got {self.vocab_size}")
        if self.bpe_train_mb <= 0:
            fail("bpe_train_mb", f"expected a positive number, got {self.bpe_train_mb}")
        if not 0.0 <= self.val_fraction <= 0.5:
            fail("val_fraction", f"expected a number in [0, 0.5], got {self.val_fraction}")
        for name, folder in self.val_path.items():
            if not _is_name(name) or not folder:
                fail(
                    f"val_path.{name}",
                    f"expected a name of letters, digits, '_.-' and a folder, got {folder!r}",
                )
            if name in (s.name for s in self.mixture):
                fail(
                    f"val_path.{name}",
                    "a data.mixture source's val split is logged under that name; rename one",
                )
        if self.shard_mb <= 0:
            fail("shard_mb", f"expected a positive number, got {self.shard_mb}")
        if self.block_docs < 1:
            fail("block_docs", f"expected a positive integer, got {self.block_docs}")
        if self.num_workers < 0:
            fail("num_workers", f"expected 0 (one per core) or a positive integer, got {self.num_workers}")
        if self.batch_docs < 1:
            fail("batch_docs", f"expected a positive integer, got {self.batch_docs}")

    def _validate_mixture(self, prefix: str) -> None:
        if not self.mixture:
            return
        if self.path != DataConfig.path:
            raise ConfigError(f"{prefix}mixture: set data.path ({self.path!r}) or data.mixture, not both")
        names = [s.name for s in self.mixture]
        for i, name in enumerate(names):
            if name in names[:i]:
                raise ConfigError(
                    f"{prefix}mixture[{i}].name: '{name}' names two sources (the default is the folder's "
                    "name); give each its own name"
                )

    def _validate_source(self, prefix: str) -> None:
        from lmstack.data.sources import get_source, open_source

        names = {"source": self.source, **{f"source_options.{n}": n for n in self.source_options}}
        for where, name in names.items():
            try:
                cls = get_source(name)
            except ConfigError as err:
                raise ConfigError(f"{prefix}{where}: {err}") from None
            from_dict(cls.Options, self.source_options.get(name, {}), f"{prefix}source_options.{name}.")
        open_source(self, prefix).validate()


def move_flat_source_keys(data: dict[str, Any], prefix: str = "data.") -> None:
    """Move the flat source fields of configs written before the source registry (`data.inputs`,
    `data.hf_split`, ...: each source's `flat_keys`) onto `data.source_options.<source>`, in place.
    Refused, naming the new key: a flat value that differs from one set there too, and a value other
    than the default for a key the chosen source does not read (dropped when it is the default)."""
    from lmstack.data.sources import SOURCES, get_source

    readers: dict[str, list[tuple[str, str]]] = {}
    for src, cls in SOURCES.items():
        for flat, key in cls.flat_keys.items():
            readers.setdefault(flat, []).append((src, key))
    name = data.get("source", DataConfig.source)
    options = data.get("source_options", {})
    flat_keys = [k for k in data if k in readers]
    if not flat_keys or not isinstance(name, str) or not isinstance(options, dict):
        return  # nothing to move, or from_dict names the wrong type
    try:
        own = get_source(name).flat_keys
    except ConfigError as err:
        raise ConfigError(f"{prefix}source: {err}") from None
    for flat in flat_keys:
        value = data.pop(flat)
        if flat in own:
            key, new = own[flat], f"{prefix}source_options.{name}.{own[flat]}"
            section = options.setdefault(name, {})
            if not isinstance(section, dict):
                raise ConfigError(f"{prefix}source_options.{name}: expected a mapping, got {section!r}")
            if key in section and section[key] != value:
                raise ConfigError(
                    f"{prefix}{flat}: {value!r} conflicts with {new}: {section[key]!r} "
                    f"({prefix}{flat} is the old form of {new}; set only {new})"
                )
            section[key] = value
            data["source_options"] = options
        elif value != getattr(SOURCES[readers[flat][0][0]].Options(), readers[flat][0][1]):
            new = " or ".join(f"{prefix}source_options.{s}.{k}" for s, k in sorted(readers[flat]))
            raise ConfigError(
                f"{prefix}{flat}: source '{name}' does not read it (it is now {new}); remove it or "
                f"set {prefix}source to a source that reads it"
            )


@dataclass
class TrainConfig:
    """Optimisation and run settings (`lmstack train`; see lmstack/train/__init__.py).

    Batch: `global_batch_size` sequences of `data.seq_len` tokens per optimizer step, split as
    micro_batch_size x grad_accum x data-parallel ranks (grad_accum is derived when null and checked
    when given). Length: `max_tokens` when set (rounded up to whole steps), else `max_steps`.
    """

    run_dir: str = "runs/default"
    seed: int = 0
    # Length of the run in optimizer steps, or in tokens (when set, max_tokens wins; rounded up to steps).
    max_steps: int | None = 200
    max_tokens: int | None = None
    # Batch, in sequences of data.seq_len tokens.
    global_batch_size: int = 16
    micro_batch_size: int = 8
    grad_accum: int | None = None
    # AdamW (decoupled weight decay; never applied to norms, biases and embeddings).
    lr: float = 3.0e-4
    min_lr: float = 3.0e-5
    warmup_steps: int = 20
    # Cosine decay from lr to min_lr over this many steps after warm-up (null: to the end of the run).
    decay_steps: int | None = None
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1.0e-8
    grad_clip: float = 1.0
    # DeepSpeed ZeRO stage: 0 (plain data parallel), 1 (optimizer states), 2 (+ gradients), 3 (+ weights).
    zero_stage: int = 0
    # auto: bf16 (fp32 master weights and gradient accumulation) on CUDA, fp32 on CPU. bf16 runs
    # use at least ZeRO stage 1 (DeepSpeed's fp32 master weights live in its ZeRO optimizers).
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    activation_checkpointing: bool = False
    # torch.compile each block; null: on with CUDA, off on CPU.
    compile: bool | None = None
    # The LM head and cross-entropy fused, chunked over tokens (lmstack/model/loss.py): the micro-batch's
    # [B, T, V] logits are never held. false: the plain head + cross-entropy. ZeRO stage 3 (partitioned
    # head weight) always takes the plain path. Equal to the plain path within fp32 rounding (the
    # training curve differs in its last digits).
    fused_loss: bool = True
    # Logging, evaluation, checkpoints (in optimizer steps).
    log_every: int = 10
    eval_every: int = 100
    # Validation micro-batches per evaluation, over all ranks (null: the whole validation split; 0: none).
    eval_batches: int | None = 16
    save_every: int = 100
    keep_last: int = 3
    tensorboard: bool = True
    progress_bar: bool = True
    # Steps with a non-finite gradient norm tolerated in a row (each is skipped) before the run stops.
    max_nan_skips: int = 10
    # Collective timeout: a dead rank makes the others fail after at most this long.
    dist_timeout_s: int = 600
    # Signals that stop the run cleanly (preemption, a time limit's warning): every rank finishes its
    # step, all save a checkpoint at the same step, and the process exits with code 75 (lmstack.train.stop).
    # [] leaves every signal its default action.
    stop_signals: list[str] = field(default_factory=lambda: ["SIGTERM", "SIGUSR1"])
    # Peak FLOP/s of one device for MFU; null: looked up by device name (none on CPU: MFU not reported).
    peak_flops: float | None = None
    # Coefficients of the mixers' auxiliary losses by name (e.g. moh_balance: 0.01); unset names keep
    # the default the mixer declares. The loss adds coefficient x (sum over layers) per micro-batch.
    aux_loss_weights: dict[str, float] = field(default_factory=dict)

    def validate(self, prefix: str = "") -> None:
        def fail(name: str, msg: str) -> None:
            raise ConfigError(f"{prefix}{name}: {msg}")

        if self.max_steps is None and self.max_tokens is None:
            fail("max_steps", "set max_steps or max_tokens (the length of the run)")
        positive = ["global_batch_size", "micro_batch_size", "log_every", "eval_every", "save_every"]
        positive += ["keep_last", "dist_timeout_s"]
        positive += [
            n
            for n in ("max_steps", "max_tokens", "grad_accum", "decay_steps")
            if getattr(self, n) is not None
        ]
        for name in positive:
            if getattr(self, name) <= 0:
                fail(name, f"expected a positive integer, got {getattr(self, name)}")
        for name in ("warmup_steps", "eval_batches", "max_nan_skips"):
            if getattr(self, name) is not None and getattr(self, name) < 0:
                fail(name, f"expected a non-negative integer, got {getattr(self, name)}")
        if self.lr <= 0:
            fail("lr", f"expected a positive number, got {self.lr}")
        if not 0 <= self.min_lr <= self.lr:
            fail("min_lr", f"expected 0 <= min_lr <= lr={self.lr}, got {self.min_lr}")
        for name in ("beta1", "beta2"):
            if not 0 <= getattr(self, name) < 1:
                fail(name, f"expected a number in [0, 1), got {getattr(self, name)}")
        for name in ("weight_decay", "grad_clip"):
            if getattr(self, name) < 0:
                fail(name, f"expected a number >= 0, got {getattr(self, name)}")
        if self.eps <= 0:
            fail("eps", f"expected a positive number, got {self.eps}")
        if self.zero_stage not in (0, 1, 2, 3):
            fail("zero_stage", f"expected 0, 1, 2 or 3, got {self.zero_stage}")
        if self.global_batch_size % self.micro_batch_size:
            fail(
                "global_batch_size",
                f"{self.global_batch_size} is not a multiple of micro_batch_size={self.micro_batch_size}",
            )
        if self.grad_accum is not None and self.global_batch_size % (self.micro_batch_size * self.grad_accum):
            fail(
                "grad_accum",
                f"global_batch_size={self.global_batch_size} is not a multiple of micro_batch_size x "
                f"grad_accum = {self.micro_batch_size} x {self.grad_accum}",
            )
        if self.peak_flops is not None and self.peak_flops <= 0:
            fail("peak_flops", f"expected a positive number, got {self.peak_flops}")
        for i, name in enumerate(self.stop_signals):
            if name not in STOP_SIGNAL_NAMES:
                fail(
                    f"stop_signals[{i}]",
                    f"expected a signal a process can catch, e.g. SIGTERM or SIGUSR1, got {name!r}",
                )


@dataclass
class ParallelConfig:
    """How the ranks share the work beyond data parallelism (see lmstack.parallel).

    `sequence_parallel_size` S ranks share every sequence, each holding one contiguous slice of
    data.seq_len / S tokens (LASP-2 for linear mixers, LASP-2H for attention); the world splits into
    world / S data-parallel replicas, so the world size must be a multiple of S (checked at start).
    """

    sequence_parallel_size: int = 1

    def validate(self, prefix: str = "") -> None:
        if self.sequence_parallel_size < 1:
            raise ConfigError(
                f"{prefix}sequence_parallel_size: expected a positive integer, got {self.sequence_parallel_size}"
            )


@dataclass
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)

    def validate(self, prefix: str = "") -> None:
        """Checks across sections (each section has validated its own fields)."""
        from lmstack.model.mixers import get_mixer

        sp = self.parallel.sequence_parallel_size
        if sp == 1:
            return
        if self.data.seq_len % sp:
            raise ConfigError(
                f"{prefix}parallel.sequence_parallel_size: {sp} does not divide data.seq_len={self.data.seq_len}"
            )
        for i in range(self.model.n_layers):
            name = self.model.mixer_for_layer(i)
            if not get_mixer(name).supports_sequence_parallel:
                raise ConfigError(
                    f"{prefix}parallel.sequence_parallel_size: mixer '{name}' (layer {i}) does not support "
                    f"sequence parallelism; use 1"
                )
