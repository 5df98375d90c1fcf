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
    """`output` is a prefix: the report to PREFIX.json, `plot(report, path)`'s figure to PREFIX.png."""
    out = Path(output).with_suffix("")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
    plot(report, out.with_suffix(".png"))
    log(f"wrote {out.with_suffix('.json')}, {out.with_suffix('.png')}")
