"""The `koedge` command: one module per command group, each only parsing arguments, calling a pass
or the build engine, and printing its report. Heavy imports happen inside commands, so `koedge run` /
`validate` / `eval` work with the runtime dependencies alone. Nothing outside `exporter.cli` imports it.
"""

from __future__ import annotations

import argparse
import sys

from exporter.cli import build, evaluate, export, heal, prune, quantize, run
from exporter.cli.common import quiet_known_noise
from runtime.errors import KoedgeError

# Each module defines `add_commands(subparsers)`, in the order `koedge --help` lists them.
COMMAND_MODULES = (export, run, evaluate, quantize, prune, heal, build)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="koedge",
        description="Take a Korean causal LM from a workstation to a phone: export, quantize, run, validate.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    for module in COMMAND_MODULES:
        module.add_commands(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    quiet_known_noise()
    try:
        return args.func(args)
    except KoedgeError as err:
        print(f"koedge: error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("koedge: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
