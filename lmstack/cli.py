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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lmstack", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("show-config", help="print a run config after overrides and validation")
    add_config_args(p)
    p.set_defaults(func=cmd_show_config)

    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except LMStackError as err:
        print(f"lmstack {args.command}: error: {err}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
