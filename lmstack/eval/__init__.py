"""Evaluation: lm-eval zero-shot tasks on exports (`harness`), Zoology's MQAR associative-recall
sweep (`mqar`), held-out perplexity on prepared data (`ppl`), and `compare` (several mixers or
configs trained on the same budget, measured and reported side by side); `loading` reads a model from
an export, a run directory or a checkpoint for all of them. The CLI is `lmstack eval`
(arguments in `lmstack.eval.cli`) and `lmstack compare`. Submodules are imported on use: lm-eval is heavy to import."""

import contextlib
import json
import signal
from pathlib import Path


@contextlib.contextmanager
def sigterm_exits():
    """Within the block SIGTERM raises SystemExit, so that `with`/`finally` clean-ups run (a
    terminated compare stops its training child, a terminated MQAR sweep its worker pool) instead of
    leaving orphaned processes that keep training."""

    def _exit(signum, frame):
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, _exit)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def write_report(report: dict, output: str, plot, log) -> None:
    """`output` is a prefix: the report to PREFIX.json (written whole or not at all),
    `plot(report, path)`'s figure to PREFIX.png."""
    out = Path(output)
    if out.suffix in (".json", ".png"):  # a file name given for the prefix
        out = out.with_suffix("")
    out.parent.mkdir(parents=True, exist_ok=True)
    json_path, png_path = out.with_name(out.name + ".json"), out.with_name(out.name + ".png")
    tmp = json_path.with_name(json_path.name + ".tmp")
    tmp.write_text(json.dumps(report, indent=2) + "\n")
    tmp.replace(json_path)
    plot(report, png_path)
    log(f"wrote {json_path}, {png_path}")
