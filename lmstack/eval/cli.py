"""`lmstack eval {harness,length,mqar,niah,ppl}`: argument parsing only; the work is in their modules."""

from __future__ import annotations

import argparse
import json
import shlex
import sys

from lmstack.errors import LMStackError


def _add_harness(sub) -> None:
    from lmstack.eval.harness import PRESETS

    p = sub.add_parser(
        "harness",
        help="zero-shot lm-eval tasks on an exported model or a checkpoint",
        description="Zero-shot evaluation through lm-eval. Presets: "
        + "; ".join(f"{k} = {', '.join(v)}" for k, v in PRESETS.items()),
    )
    p.add_argument(
        "model", help="exported model folder, or a checkpoint / run directory (read as its export would be)"
    )
    p.add_argument(
        "--tasks", nargs="+", default=["paper"], help="task names or presets, space or comma separated"
    )
    p.add_argument("--batch-size", default="8", help="lm-eval batch size (an integer or 'auto')")
    p.add_argument("--dtype", default="float32", help="auto, float32, bfloat16 or float16")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    bos = p.add_mutually_exclusive_group()
    bos.add_argument(
        "--add-bos",
        dest="add_bos",
        action="store_const",
        const=True,
        default=None,
        help="force BOS before every input (default: as in training, read from the tokenizer)",
    )
    bos.add_argument("--no-add-bos", dest="add_bos", action="store_const", const=False)
    p.add_argument(
        "--limit", type=float, default=None, help="examples per task (a fraction if < 1), for quick runs"
    )
    p.add_argument(
        "--max-length", type=int, default=None, help="context length (default: the model's max_seq_len)"
    )
    p.add_argument("--include-path", action="append", default=[], help="extra folder of lm-eval task YAMLs")
    p.add_argument("--output", "-o", default=None, help="folder for harness.json and harness.md")
    p.set_defaults(func=cmd_harness)


def cmd_harness(args: argparse.Namespace) -> None:
    from lmstack.eval.harness import markdown, run_harness

    bs = args.batch_size
    if not str(bs).startswith("auto"):
        try:
            bs = int(bs)
        except ValueError:
            raise LMStackError(f"--batch-size: expected an integer or 'auto', got {bs!r}") from None
    limit = None if args.limit is None else (int(args.limit) if args.limit >= 1 else args.limit)
    rep = run_harness(
        args.model,
        args.tasks,
        batch_size=bs,
        dtype=args.dtype,
        device=args.device,
        add_bos=args.add_bos,
        limit=limit,
        include=args.include_path,
        max_length=args.max_length,
        output=args.output,
        log=lambda m: print(m, file=sys.stderr),
    )
    print(markdown(rep["summary"], f"lm-eval zero-shot: {args.model}"), end="")


def _add_mqar(sub) -> None:
    from lmstack.eval.mqar import PRESETS
    from lmstack.eval.mqar.probe import INITS, RECIPES

    p = sub.add_parser(
        "mqar",
        help="multi-query associative recall sweep over mixers x d_model",
        description="Zoology's MQAR: trains a 2-layer model (shortconv, then the mixer) per mixer, d_model and "
        "learning rate; writes OUT.md, OUT.json and OUT.png. Presets: " + ", ".join(PRESETS),
    )
    p.add_argument("--preset", default=None, choices=sorted(PRESETS))
    p.add_argument(
        "--recipe",
        default=None,
        choices=RECIPES,
        help="training recipe: zoology (Zoology's init, decay groups and schedule) or lmstack",
    )
    p.add_argument(
        "--init",
        default=None,
        choices=INITS,
        help="weight init: the recipe's, zoology (N(0, 0.02)) or scaled (N(0, 1/d_model))",
    )
    p.add_argument(
        "--mixers", default=None, help="comma-separated (default: every registered mixer but shortconv)"
    )
    p.add_argument("--d-models", default=None, help="comma-separated, e.g. 32,64,128")
    p.add_argument("--lrs", default=None, help="comma-separated learning rates, e.g. 1e-3,3e-3")
    p.add_argument("--vocab-size", type=int, default=None)
    p.add_argument("--seq-len", type=int, default=None)
    p.add_argument("--num-kv-pairs", type=int, default=None)
    p.add_argument("--power-a", type=float, default=None)
    p.add_argument("--train-size", type=int, default=None)
    p.add_argument(
        "--val-size", type=int, default=None, help="validation sequences (early stopping, lr choice)"
    )
    p.add_argument("--test-size", type=int, default=None)
    p.add_argument("--epochs", type=int, default=None)
    p.add_argument(
        "--patience", type=int, default=None, help="validation evaluations without gain before stopping"
    )
    p.add_argument("--seeds", type=int, default=None, help="seeds at the chosen learning rate")
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--n-heads", type=int, default=None)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--mixer-options", default=None, help='JSON, e.g. {"lightning": {"gate": "silu"}}')
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (per worker process)")
    p.add_argument("--jobs", type=int, default=None, help="worker processes (one (mixer, d_model) each)")
    p.add_argument(
        "--out",
        default="mqar",
        help="output prefix (writes PREFIX.md/.json/.png); groups already in PREFIX.json or in an "
        "interrupted sweep's PREFIX.progress.jsonl with the same settings are not trained again",
    )
    p.set_defaults(func=cmd_mqar)


def parse_list(text: str | None, cast=float, flag: str = "list") -> list | None:
    """`a,b,c` -> [cast(a), cast(b), cast(c)]; a bad item is a one-line error naming `flag`."""
    if text is None:
        return None
    try:
        return [cast(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise LMStackError(f"{flag}: expected comma-separated {cast.__name__} values, got {text!r}") from None


def json_object(text: str | None, flag: str, what: str = "a JSON object") -> dict | None:
    """The JSON object given to `flag` (None when empty); anything else is a one-line error."""
    if not text:
        return None
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        raise LMStackError(f"{flag}: not valid JSON ({err.msg}), got {text!r}") from None
    if not isinstance(value, dict):
        raise LMStackError(f"{flag}: expected {what}, got {text!r}")
    return value


def cmd_mqar(args: argparse.Namespace) -> None:
    from lmstack.eval import mqar

    cfg = mqar.sweep_config(
        args.preset,
        mixers=parse_list(args.mixers, str, "--mixers"),
        d_models=parse_list(args.d_models, int, "--d-models"),
        lrs=parse_list(args.lrs, float, "--lrs"),
        vocab_size=args.vocab_size,
        seq_len=args.seq_len,
        num_kv_pairs=args.num_kv_pairs,
        power_a=args.power_a,
        train_size=args.train_size,
        val_size=args.val_size,
        test_size=args.test_size,
        epochs=args.epochs,
        recipe=args.recipe,
        init=args.init,
        patience=args.patience,
        seeds=args.seeds,
        batch_size=args.batch_size,
        n_heads=args.n_heads,
        seed=args.seed,
        mixer_options=json_object(
            args.mixer_options, "--mixer-options", "a JSON object mapping mixer names to options"
        ),
        threads=args.threads,
        jobs=args.jobs,
    )
    done, progress = mqar.load_finished(cfg, args.out)
    result = mqar.run_sweep(
        cfg, log=lambda m: print(m, file=sys.stderr, flush=True), done=done, on_group=progress
    )
    command = mqar_command(args)
    paths = mqar.write_outputs(result, args.out, command)
    print(mqar.markdown_table(result, command), end="")
    print(f"wrote {', '.join(map(str, paths))}", file=sys.stderr)


def mqar_command(args: argparse.Namespace) -> str:
    """The command line that reproduces this sweep (the options given, in a fixed order)."""
    parts = ["lmstack", "eval", "mqar"]
    for name, value in vars(args).items():
        if name in ("func", "command", "eval_command", "argv") or value is None:
            continue
        parts += [f"--{name.replace('_', '-')}", str(value)]
    return " ".join(shlex.quote(p) for p in parts)


def _add_ppl(sub) -> None:
    p = sub.add_parser("ppl", help="perplexity on the held-out split of prepared data")
    p.add_argument("model", help="exported model folder, or a checkpoint / run directory")
    p.add_argument("--data", default=None, help="prepared data folder (default: the run config's data.path)")
    p.add_argument("--seq-len", type=int, default=None, help="default: the run config's data.seq_len")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-batches", type=int, default=None, help="stop after this many batches")
    p.add_argument("--split", default="val")
    p.add_argument(
        "--val-path",
        action="append",
        default=None,
        metavar="NAME=FOLDER",
        help="also score a named validation folder (repeatable; default: the run config's data.val_path)",
    )
    p.add_argument("--device", default=None)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--output", "-o", default=None, help="JSON file for the result")
    p.set_defaults(func=cmd_ppl)


def _name_folder(value: str) -> tuple[str, str]:
    name, sep, folder = value.partition("=")
    if not sep or not name or not folder:
        raise LMStackError(f"--val-path {value!r}: expected NAME=FOLDER")
    return name, folder


def cmd_ppl(args: argparse.Namespace) -> None:
    from lmstack.eval.ppl import run_ppl

    result = run_ppl(
        args.model,
        args.data,
        args.seq_len,
        args.batch_size,
        args.max_batches,
        args.device,
        args.dtype,
        args.output,
        split=args.split,
        log=lambda m: print(m, file=sys.stderr),
        val_path=None if args.val_path is None else dict(_name_folder(v) for v in args.val_path),
    )
    print(json.dumps(result, indent=2))


def _add_length(sub) -> None:
    p = sub.add_parser(
        "length",
        help="loss against context position at and beyond the training length",
        description="Loss and perplexity per bucket of context positions at each evaluation length, "
        "for one or several models on the same held-out split; writes OUT.json and OUT.png.",
    )
    p.add_argument("models", nargs="+", help="exported model folders, or checkpoint / run directories")
    p.add_argument("--data", default=None, help="prepared data folder (default: the run config's data.path)")
    p.add_argument("--lengths", required=True, help="comma-separated evaluation lengths, e.g. 256,1024,4096")
    p.add_argument("--bucket-size", type=int, default=64, help="context positions per bucket")
    p.add_argument(
        "--tokens-per-batch", type=int, default=8192, help="rows per batch = this // length (at least 1)"
    )
    p.add_argument("--max-rows", type=int, default=None, help="score at most about this many rows per length")
    p.add_argument("--split", default="val")
    p.add_argument(
        "--documents",
        choices=("masked", "joined"),
        default="masked",
        help="masked: documents kept apart as in training (a position counts within its document); "
        "joined: each row one sequence",
    )
    p.add_argument("--device", default=None)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--out", "-o", default="length", help="output prefix (writes PREFIX.json and PREFIX.png)")
    p.set_defaults(func=cmd_length)


def cmd_length(args: argparse.Namespace) -> None:
    from lmstack.eval.length import run_length

    report = run_length(
        args.models,
        args.data,
        parse_list(args.lengths, int, "--lengths"),
        bucket_size=args.bucket_size,
        tokens_per_batch=args.tokens_per_batch,
        max_rows=args.max_rows,
        split=args.split,
        mask_documents=args.documents == "masked",
        device=args.device,
        dtype=args.dtype,
        out=args.out,
        command=" ".join(shlex.quote(a) for a in ["lmstack", "eval", *args.argv]),
        log=lambda m: print(m, file=sys.stderr),
    )
    for entry in report["models"]:
        for r in entry["lengths"]:
            print(f"{entry['model']}\t{r['length']}\t{r['tokens']}\t{r['loss']:.4f}\t{r['perplexity']:.3f}")


def _add_niah(sub) -> None:
    p = sub.add_parser(
        "niah",
        help="single-needle retrieval in RULER's format (passkey, number, uuid), offline",
        description="RULER's NIAH-single prompts built offline in the model's tokens, needle at each depth, "
        "scored by greedy generation (exact match); writes OUT.json and OUT.png (heatmaps).",
    )
    p.add_argument("models", nargs="+", help="exported model folders, or checkpoint / run directories")
    p.add_argument("--data", default=None, help="prepared data folder: tokenizer and natural-text haystack")
    p.add_argument("--lengths", required=True, help="comma-separated prompt lengths in tokens, e.g. 512,1024")
    p.add_argument("--depths", default="0,0.25,0.5,0.75,1", help="comma-separated needle depths in [0, 1]")
    p.add_argument("--forms", default="passkey,number,uuid", help="comma-separated: passkey, number, uuid")
    p.add_argument("--samples", type=int, default=4, help="prompts per (form, length, depth)")
    p.add_argument(
        "--digits", type=int, default=7, help="digits of the passkey and number forms' value (RULER: 7)"
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--split", default="val", help="split the natural-text haystack is drawn from")
    p.add_argument("--device", default=None)
    p.add_argument("--out", "-o", default=None, help="output prefix (writes PREFIX.json and PREFIX.png)")
    p.set_defaults(func=cmd_niah)


def cmd_niah(args: argparse.Namespace) -> None:
    from lmstack.eval.niah import run_niah

    if args.samples < 1:
        raise LMStackError(f"--samples: expected a positive integer, got {args.samples}")
    report = run_niah(
        args.models,
        args.data,
        parse_list(args.lengths, int, "--lengths"),
        parse_list(args.depths, float, "--depths"),
        parse_list(args.forms, str, "--forms"),
        samples=args.samples,
        seed=args.seed,
        split=args.split,
        device=args.device,
        output=args.out,
        digits=args.digits,
        command=" ".join(shlex.quote(a) for a in ["lmstack", "eval", *args.argv]),
        log=lambda m: print(m, file=sys.stderr),
    )
    print(json.dumps(report, indent=2))


def add_eval_parser(sub) -> None:
    """Register `eval` and its sub-commands on the top-level subparsers of `lmstack`."""
    p = sub.add_parser(
        "eval",
        help="evaluate models: lm-eval harness, MQAR, held-out perplexity, loss against length, needle retrieval",
    )
    eval_sub = p.add_subparsers(dest="eval_command", required=True, metavar="EVAL_COMMAND")
    _add_harness(eval_sub)
    _add_length(eval_sub)
    _add_mqar(eval_sub)
    _add_niah(eval_sub)
    _add_ppl(eval_sub)
