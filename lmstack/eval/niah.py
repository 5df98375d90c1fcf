"""Single-needle retrieval (`lmstack eval niah`): RULER's NIAH-single tasks, generated offline.

lm-eval ships RULER (`lm_eval/tasks/ruler`), but its NIAH tasks cannot run offline: `prepare_niah.py`
imports `wonderwords` (not installed, it draws the needle keys) and `nltk`, the essay haystack is
`datasets.load_dataset("baber/paul_graham_essays")` from the Hugging Face hub, and prompts are sized
with `AutoTokenizer.from_pretrained(<hub name>)`. This module keeps RULER's prompt format (its
`TEMPLATE`, needle sentence and answer prefix, copied below) and its three single-needle forms:

- `passkey` (niah_single_1): a 7-digit number in RULER's repeated filler sentences;
- `number` (niah_single_2): a 7-digit number in natural text, the held-out split of the prepared data;
  (`digits` sets the numbers' length: RULER's is 7, fewer make a task small models can learn);
- `uuid` (niah_single_3): a UUID in that natural text.

Prompts are built in token ids of the model's own tokenizer, deterministically from (seed, form,
length, depth): the needle sentence starts at `depth` of the haystack, and the whole prompt is
exactly `length` tokens. A sample is scored by greedy decoding (the prompt prefilled through the
normal forward, then the cache): correct when the answer, read as the first word after the answer
prefix, equals the needle's value exactly.
"""

from __future__ import annotations

import random
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from lmstack.errors import LMStackError
from lmstack.eval import write_report

# RULER's single-needle prompt (lm_eval/tasks/ruler/niah_utils.py TEMPLATE, prepare_niah.py).
TEMPLATE_HEAD = (
    "Some special magic {kind} are hidden within the following text. Make sure to memorize it. "
    "I will quiz you about the {kind} afterwards.\n"
)
TEMPLATE_QUESTION = "\nWhat are all the special magic {kind} for {key} mentioned in the provided text?"
ANSWER_PREFIX = " The special magic {kind_one} for {key} mentioned in the provided text is"
NEEDLE = " One of the special magic {kind} for {key} is: {value}."
REPEAT_FILLER = " The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
#: Needle keys (RULER draws them with wonderwords; a fixed list keeps generation offline).
KEYS = (
    "amber", "anchor", "badger", "banjo", "basil", "beacon", "cactus", "canyon", "cobalt", "comet",
    "copper", "cricket", "dagger", "dune", "ember", "falcon", "fern", "glacier", "granite", "harbor",
    "hazel", "island", "jasmine", "kettle", "lantern", "lemon", "marble", "meadow", "nectar", "orchid",
    "otter", "pebble", "pepper", "quartz", "raven", "ribbon", "saffron", "sparrow", "thistle", "tulip",
    "velvet", "walnut", "willow", "zephyr",
)  # fmt: skip
FORMS = ("passkey", "number", "uuid")


@dataclass
class NeedleSample:
    form: str
    length: int
    depth: float
    key: str
    value: str
    input_ids: list[int]  # the whole prompt, `length` tokens, ending with the answer prefix
    needle_start: int  # token index of the needle sentence's first token in input_ids
    needle_ids: list[int]


def needle_value(form: str, rng: random.Random, digits: int = 7) -> str:
    if form == "uuid":
        return str(uuid.UUID(int=rng.getrandbits(128), version=4))
    return str(rng.randint(10 ** (digits - 1), 10**digits - 1))


class HaystackSource:
    """Haystack token ids: RULER's repeated filler, or a run of the prepared data's held-out split
    (special tokens, i.e. document separators, left out) starting at a seeded offset."""

    def __init__(self, tokenizer, data_dir: str | Path | None = None, split: str = "val") -> None:
        self.tokenizer = tokenizer
        self.filler = tokenizer.encode(REPEAT_FILLER)
        self.text = None
        if data_dir is not None:
            from lmstack.data.reader import TokenStream
            from lmstack.data.shards import load_index

            stream = TokenStream(load_index(data_dir), split)
            tokens = stream.read(0, stream.num_tokens)[0]
            special = {tokenizer.eos_id, tokenizer.bos_id}
            self.text = [int(t) for t in tokens if int(t) not in special]

    def take(self, form: str, n: int, rng: random.Random) -> list[int]:
        if form == "passkey":
            return (self.filler * (n // len(self.filler) + 1))[:n]
        if self.text is None:
            raise LMStackError(f"niah form '{form}': needs --data (its natural-text haystack)")
        if n > len(self.text):
            raise LMStackError(
                f"niah form '{form}': a haystack of {n} tokens exceeds the data's {len(self.text)}"
            )
        start = rng.randrange(len(self.text) - n + 1)
        return self.text[start : start + n]


def make_sample(
    source: HaystackSource, form: str, length: int, depth: float, seed: int, digits: int = 7
) -> NeedleSample:
    """The prompt of `length` tokens with the needle at `depth` (0: first haystack token, 1: last);
    `digits`: the length of the passkey and number forms' value."""
    if form not in FORMS:
        raise LMStackError(f"--forms: unknown form '{form}', expected one of {', '.join(FORMS)}")
    if not 0.0 <= depth <= 1.0:
        raise LMStackError(f"--depths: expected fractions in [0, 1], got {depth}")
    if digits < 1:
        raise LMStackError(f"--digits: expected a positive integer, got {digits}")
    rng = random.Random(f"{seed}/{form}/{length}/{depth}")
    key, value = rng.choice(KEYS), needle_value(form, rng, digits)
    kind = "uuids" if form == "uuid" else "numbers"
    enc = source.tokenizer.encode
    head = enc(TEMPLATE_HEAD.format(kind=kind))
    tail = enc(TEMPLATE_QUESTION.format(kind=kind, key=key)) + enc(
        ANSWER_PREFIX.format(kind_one=kind[:-1], key=key)
    )
    needle = enc(NEEDLE.format(kind=kind, key=key, value=value))
    n_hay = length - len(head) - len(tail) - len(needle)
    if n_hay < 1:
        raise LMStackError(
            f"--lengths: {length} tokens leave no room for a haystack (the rest takes {length - n_hay})"
        )
    hay = source.take(form, n_hay, rng)
    at = round(depth * n_hay)
    ids = head + hay[:at] + needle + hay[at:] + tail
    return NeedleSample(form, length, depth, key, value, ids, len(head) + at, needle)


def extract_answer(text: str) -> str:
    """The first word of the continuation after the answer prefix (`: 1234567.` -> `1234567`)."""
    words = text.strip().lstrip(":").split()
    return words[0].rstrip(".,;:!?\"'") if words else ""


def is_correct(generated: str, value: str) -> bool:
    return extract_answer(generated) == value


@torch.no_grad()
def greedy_generate(model, input_ids: list[int], max_new_tokens: int, device) -> list[int]:
    """Greedy continuation: the prompt through the normal (chunked) forward, then one token at a time
    from the cache."""
    ids = torch.tensor([input_ids], device=device)
    out = model(ids, use_cache=True)
    generated = []
    for _ in range(max_new_tokens):
        token = out.logits[0, -1].argmax()
        generated.append(int(token))
        out = model(token.view(1, 1), cache=out.cache, use_cache=True)
    return generated


def evaluate(
    model,
    tokenizer,
    source: HaystackSource,
    forms,
    lengths,
    depths,
    samples: int = 1,
    seed: int = 0,
    device="cpu",
    digits: int = 7,
) -> dict[str, Any]:
    """Accuracy per form, length and depth over `samples` prompts each."""
    model = model.to(device).eval()
    cells = []
    for form in forms:
        for length in lengths:
            for depth in depths:
                hits = 0
                for s in range(samples):
                    sample = make_sample(source, form, length, depth, seed + s, digits)
                    # room for the value as the needle tokenizes it, with the ": " before it
                    new_tokens = len(tokenizer.encode(f": {sample.value}.")) + 1
                    text = tokenizer.decode(greedy_generate(model, sample.input_ids, new_tokens, device))
                    hits += is_correct(text, sample.value)
                cells.append({"form": form, "length": length, "depth": depth, "accuracy": hits / samples})
    return {"samples": samples, "seed": seed, "digits": digits, "cells": cells}


def run_niah(
    model_paths: list[str],
    data_dir: str | None,
    lengths: list[int],
    depths: list[float],
    forms: list[str],
    samples: int = 4,
    seed: int = 0,
    split: str = "val",
    device: str | None = None,
    output: str | None = None,
    digits: int = 7,
    command: str | None = None,
    log=print,
) -> dict[str, Any]:
    """The work behind `lmstack eval niah`: OUT.json and OUT.png (a heatmap per model and form)."""
    from lmstack.data import load_data_tokenizer
    from lmstack.eval.loading import default_device, load_model

    if not lengths or not depths or not forms:
        raise LMStackError("--lengths, --depths and --forms: each needs at least one value")
    device = default_device(device)
    models = []
    for path in model_paths:
        start = time.perf_counter()
        loaded = load_model(path, "float32", hf=False, device=device)
        data = data_dir or (loaded.run_config.data.path if loaded.run_config is not None else None)
        if data is None:
            raise LMStackError("--data: give the prepared data folder (its tokenizer and haystack text)")
        tokenizer = load_data_tokenizer(data)
        source = HaystackSource(tokenizer, data if set(forms) - {"passkey"} else None, split)
        result = evaluate(
            loaded.model, tokenizer, source, forms, lengths, depths, samples, seed, device, digits
        )
        result.update(
            model=str(path), mixer=loaded.model.config.mixer, seconds=round(time.perf_counter() - start, 1)
        )
        for form in forms:
            longest = [
                c["accuracy"] for c in result["cells"] if c["form"] == form and c["length"] == max(lengths)
            ]
            log(f"{path} {form}: accuracy at {max(lengths)} tokens {sum(longest) / len(longest):.3f}")
        models.append(result)
    report = {
        "command": command,
        "data": str(data_dir),
        "lengths": lengths,
        "depths": depths,
        "forms": forms,
        "digits": digits,
        "models": models,
    }
    if output:
        write_report(report, output, plot_heatmaps, log)
    return report


def plot_heatmaps(report: dict[str, Any], path: Path) -> None:
    """Accuracy over (depth, length): one panel per model (rows) and form (columns)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    forms, lengths, depths = report["forms"], report["lengths"], report["depths"]
    n_models = len(report["models"])
    fig, axes = plt.subplots(n_models, len(forms), figsize=(4 * len(forms), 3 * n_models), squeeze=False)
    for row, result in zip(axes, report["models"]):
        for ax, form in zip(row, forms):
            acc = {(c["length"], c["depth"]): c["accuracy"] for c in result["cells"] if c["form"] == form}
            grid = [[acc[(L, d)] for L in lengths] for d in depths]
            ax.imshow(grid, vmin=0, vmax=1, cmap="RdYlGn", aspect="auto")
            ax.set_xticks(range(len(lengths)), [str(L) for L in lengths])
            ax.set_yticks(range(len(depths)), [f"{d:g}" for d in depths])
            ax.set_title(f"{result['mixer']} {form}", fontsize=9)
            ax.set_xlabel("context length")
            ax.set_ylabel("needle depth")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
