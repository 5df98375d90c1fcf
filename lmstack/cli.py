"""The `lmstack` command: parses arguments, then hands over to the room that does the work."""

from __future__ import annotations

import argparse
import sys

from lmstack.errors import LMStackError


def load_run_config(args: argparse.Namespace):
    """The validated run config from `CONFIG [overrides...]`; CONFIG may be omitted (defaults)."""
    from lmstack.config import load_config

    config, overrides = args.config, list(args.overrides)
    if config is not None and "=" in config:
        config, overrides = None, [config, *overrides]
    return load_config(config, overrides)


def add_config_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", nargs="?", help="YAML run config (omit for the built-in defaults)")
    parser.add_argument("overrides", nargs="*", help="section.field=value overrides, e.g. model.n_layers=4")


def cmd_show_config(args: argparse.Namespace) -> None:
    from lmstack.config import dump_config

    print(dump_config(load_run_config(args)), end="")


def cmd_prepare_data(args: argparse.Namespace) -> None:
    from lmstack.data.prepare import merge_parts, parse_part, prepare_data, prepare_tokenizer

    part = parse_part(args.part) if args.part is not None else None  # a bad value fails before the config
    config = load_run_config(args)
    if config.data.mixture:
        raise LMStackError(
            "data.mixture: prepare-data writes one folder (data.path); prepare each source with its own "
            "data.path (and the same data.tokenizer), then train on the mixture"
        )
    if args.tokenizer_only:
        tok = prepare_tokenizer(config.data, progress=not args.quiet)
        print(f"tokenizer ready in {config.data.path}: vocab {tok.vocab_size}, sha256 {tok.sha256[:12]}")
        return
    if args.merge is not None:
        index = merge_parts(config.data, args.merge, progress=not args.quiet)
    else:
        index = prepare_data(config.data, part=part, progress=not args.quiet)
    if index is None:
        print(f"prepared part {part[0]}/{part[1]} of {config.data.path}; the last part to finish merges")
        return
    st = index.stats
    print(
        f"prepared {index.path}: train {index.num_tokens('train'):,} tokens / {index.num_documents('train'):,} docs, "
        f"val {index.num_tokens('val'):,} tokens / {index.num_documents('val'):,} docs; vocab {index.vocab_size} "
        f"({index.dtype}), tokenizer sha256 {index.tokenizer['sha256'][:12]}; "
        f"{len(st['shards_written'])} shards written, {len(st['shards_skipped'])} skipped, "
        f"{st['text_mb_per_s']} MB/s, {st['tokens_per_s']:,.0f} tokens/s"
    )


def cmd_verify_data(args: argparse.Namespace) -> None:
    import time

    from lmstack.data.shards import load_index

    t0 = time.perf_counter()
    index = load_index(args.data_dir)  # checks the index's own checksum
    problems = index.verify(full=True)
    shards = [info for infos in index.splits.values() for info in infos]
    for problem in problems:
        print(f"lmstack verify-data: {problem}", file=sys.stderr)
    if problems:
        raise LMStackError(f"{len(problems)} of {len(shards)} shards in {args.data_dir} failed verification")
    size = sum((index.path / f).stat().st_size for info in shards for f in (info.bin_file, info.docs_file))
    print(
        f"verified {args.data_dir}: the index and {len(shards)} shards ({size / 1e6:,.1f} MB) match their sha256 "
        f"checksums ({time.perf_counter() - t0:.1f} s)"
    )


def cmd_export(args: argparse.Namespace) -> None:
    from lmstack.export.exporter import export_checkpoint

    result = export_checkpoint(
        args.checkpoint,
        args.out_dir,
        fmt=args.format,
        max_shard_size=args.max_shard_size,
        dtype=args.dtype,
        overwrite=args.overwrite,
        verify=not args.no_verify,
    )
    print(f"exported {result.format} model to {result.out_dir} ({len(result.files)} files)")
    if result.max_abs_diff is not None:
        print(f"verified: reloaded logits match the checkpoint (max abs diff {result.max_abs_diff:.2e})")
    for note in result.notes:
        print(f"note: {note}")


def cmd_train(args: argparse.Namespace) -> None:
    from lmstack.train import train

    config = load_run_config(args)
    summary = train(config, resume=args.resume)
    if "stopped_by" in summary:  # every rank: a launcher requeues on this exit code
        from lmstack.train.stop import EXIT_STOPPED, ignore_signals

        ignore_signals(config.train.stop_signals)
        sys.exit(EXIT_STOPPED)
    if "checkpoints" in summary:  # the main rank
        line = f"trained {summary['step']} steps, {summary['tokens']:,} tokens"
        if "val_loss" in summary:
            line += f", val_loss {summary['val_loss']:.4f}, val_ppl {summary['val_ppl']:.2f}"
        print(f"{line}; checkpoint {summary['checkpoint']}")


def cmd_plot(args: argparse.Namespace) -> None:
    from lmstack.train.plot import plot_run

    for path in plot_run(args.run_dir):
        print(f"wrote {path}")


def cmd_compare(args: argparse.Namespace) -> None:
    import shlex

    from lmstack.eval.cli import json_object, parse_list
    from lmstack.eval.compare import CompareSettings, markdown, run_compare

    configs = [c for c in args.configs if "=" not in c]
    overrides = [c for c in args.configs if "=" in c]
    tasks = None if args.tasks == ["none"] else args.tasks
    limit = None if args.limit is None else (int(args.limit) if args.limit >= 1 else args.limit)
    settings = CompareSettings(
        tasks=tasks,
        harness_batch_size=args.batch_size,
        harness_limit=limit,
        mqar_preset=None if args.mqar == "none" else args.mqar,
        mqar_settings=json_object(args.mqar_settings, "--mqar-settings"),
        length_factor=None if args.length_factor == 0 else args.length_factor,
        niah_lengths=None
        if args.niah_lengths == "none"
        else parse_list(args.niah_lengths, int, "--niah-lengths"),
    )
    command = " ".join(shlex.quote(a) for a in ["lmstack", "compare", *args.argv])
    report = run_compare(
        configs,
        parse_list(args.mixers, str, "--mixers"),
        overrides,
        args.out,
        settings,
        command,
        log=lambda m: print(m, file=sys.stderr, flush=True),
    )
    print(markdown(report), end="")


class _IntermixedParser(argparse.ArgumentParser):
    """A sub-command parser that accepts positionals after options (`train cfg --resume auto x.y=1`).

    argparse's top-level `parse_intermixed_args` refuses parsers with sub-commands, so each leaf sub-command
    parses intermixed instead; a parser that itself has sub-commands (`eval`) parses the plain way."""

    _plain = False

    def parse_known_args(self, args=None, namespace=None):
        nested = any(a.nargs in (argparse.PARSER, argparse.REMAINDER) for a in self._actions)
        if self._plain or nested or self._mutually_exclusive_groups:
            return super().parse_known_args(args, namespace)
        self._plain = True  # parse_known_intermixed_args calls parse_known_args itself
        try:
            return self.parse_known_intermixed_args(args, namespace)
        finally:
            self._plain = False


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lmstack", description=__doc__)
    sub = parser.add_subparsers(
        dest="command", required=True, metavar="COMMAND", parser_class=_IntermixedParser
    )

    p = sub.add_parser("show-config", help="print a run config after overrides and validation")
    add_config_args(p)
    p.set_defaults(func=cmd_show_config)

    p = sub.add_parser(
        "prepare-data",
        help="tokenize the text of the config's data section into token shards under data.path",
        description="Tokenize text (data.source, data.source_options) with data.tokenizer into memory-mapped shards, an "
        "index and a validation split under data.path; a re-run skips finished shards.",
    )
    add_config_args(p)
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar or log lines")
    step = p.add_mutually_exclusive_group()
    step.add_argument(
        "--part",
        metavar="I/N",
        help="prepare only part I of N (e.g. on machine I of N, into the same shared data.path); the part that "
        "finishes last writes the index. Needs the tokenizer there first (--tokenizer-only)",
    )
    step.add_argument(
        "--tokenizer-only",
        action="store_true",
        help="only train or load the tokenizer into data.path: the first step before the --part runs",
    )
    step.add_argument(
        "--merge",
        type=int,
        metavar="N",
        help="write the index of a folder prepared as N parts (the last part does this itself)",
    )
    p.set_defaults(func=cmd_prepare_data)

    p = sub.add_parser(
        "verify-data",
        help="check a prepared data folder's shards and index against their sha256 checksums",
        description="Read every shard of DATA_DIR and compare it with the checksums prepare-data recorded; "
        "each bad shard is named (exit code 2). Training checks each shard the same way before first use.",
    )
    p.add_argument("data_dir", help="a prepared data folder (data.path)")
    p.set_defaults(func=cmd_verify_data)

    p = sub.add_parser(
        "export",
        help="export a checkpoint as a Hugging Face model folder",
        description="Write a Hugging Face folder (config, safetensors, model code, tokenizer, generation "
        "config) that loads with AutoModelForCausalLM.from_pretrained(OUT_DIR, trust_remote_code=True), "
        "also where lmstack is not installed; or, with --format llama, a plain LlamaForCausalLM.",
    )
    p.add_argument("checkpoint", help="run dir, its checkpoints/ dir, or one checkpoint tag dir")
    p.add_argument("out_dir", help="output folder (written atomically)")
    p.add_argument(
        "--format",
        choices=["lmstack", "llama"],
        default="lmstack",
        help="lmstack: custom code travels with the export (any mixers); llama: native LlamaForCausalLM "
        "(attention-only models)",
    )
    p.add_argument(
        "--max-shard-size", default="2GB", help="split weights into shards past this size (default 2GB)"
    )
    p.add_argument(
        "--dtype",
        default=None,
        help="weight dtype: float32 (default), bfloat16 or float16",
    )
    p.add_argument("--overwrite", action="store_true", help="replace OUT_DIR if it exists and is not empty")
    p.add_argument("--no-verify", action="store_true", help="skip reloading the export and comparing logits")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser(
        "train",
        help="train a model with DeepSpeed (one process, or under torchrun)",
        description="Train the config's model on the prepared data in data.path; logs, checkpoints and "
        "TensorBoard go to train.run_dir. Runs as one plain process or under torchrun (see launch/).",
    )
    add_config_args(p)
    p.add_argument(
        "--resume",
        default=None,
        metavar="auto|PATH",
        help="auto: continue from the run dir's latest checkpoint if there is one, else start; PATH: a run "
        "dir, its checkpoints/ dir or one checkpoint (default: start, refusing a run dir with checkpoints)",
    )
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("plot", help="write loss and throughput curves (PNG) of a run directory")
    p.add_argument("run_dir", help="a train.run_dir holding metrics.jsonl")
    p.set_defaults(func=cmd_plot)

    p = sub.add_parser(
        "compare",
        help="train one model shape with several mixers (or configs) and report them side by side",
        description="Train each CONFIG x --mixers run with `lmstack train` on the same data, tokens and "
        "schedule, then export and evaluate each (held-out perplexity, decoding state, MQAR probe, "
        "lm-eval) and write OUT/compare.md, compare.json and loss.png. Finished stages are skipped and "
        "an interrupted training resumes: run the same command again to continue.",
    )
    p.add_argument(
        "configs", nargs="+", help="YAML run config(s), then section.field=value overrides for all runs"
    )
    p.add_argument("--mixers", default=None, help="comma-separated registry names, e.g. attention,lightning")
    p.add_argument("--out", "-o", default="runs/compare", help="output folder (runs/ and the report)")
    p.add_argument(
        "--tasks", nargs="+", default=["offline"], help="lm-eval tasks or presets (as eval harness), or none"
    )
    p.add_argument("--limit", type=float, default=None, help="lm-eval examples per task (a fraction if < 1)")
    p.add_argument("--batch-size", type=int, default=16, help="lm-eval batch size")
    p.add_argument("--mqar", default="quick", help="MQAR preset of the probe (see eval mqar), or none")
    p.add_argument(
        "--mqar-settings", default=None, help='JSON overrides of the MQAR preset, e.g. {"epochs": 2}'
    )
    p.add_argument(
        "--length-factor", type=int, default=4, help="held-out perplexity at this x data.seq_len (0: skip)"
    )
    p.add_argument(
        "--niah-lengths",
        default="none",
        help="comma-separated NIAH prompt lengths (none: skip), e.g. 512,1024",
    )
    p.set_defaults(func=cmd_compare)

    from lmstack.eval.cli import add_eval_parser

    add_eval_parser(sub)  # `lmstack eval {harness,mqar,ppl}` (lmstack/eval/cli.py)

    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    args.argv = list(sys.argv[2:] if argv is None else argv[1:])  # for reports: the command as given
    try:
        args.func(args)
    except LMStackError as err:
        print(f"lmstack {args.command}: error: {err}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
