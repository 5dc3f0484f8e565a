"""The `chatterbox-serverless` command. Each subcommand lives beside the code it drives; a module named here
provides `add_arguments(parser)` (cheap, no heavy imports) and `run(args) -> int`."""
from __future__ import annotations

import argparse
import importlib
import sys

COMMANDS = {
    "serve": ("chatterbox_serverless.api.serve", "start the API (and, by default, an in-process worker)"),
    "worker": ("chatterbox_serverless.jobs.worker_main", "run a worker against a shared store"),
    "keys": ("chatterbox_serverless.accounts.cli", "manage API keys and credits"),
    "parity": ("chatterbox_serverless.engine.parity", "compare this engine with a reference dump"),
    "say": ("chatterbox_serverless.client.cli", "synthesize text through a running server"),
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="chatterbox-serverless", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    modules = {}
    for name, (modname, help_) in COMMANDS.items():
        modules[name] = importlib.import_module(modname)
        modules[name].add_arguments(sub.add_parser(name, help=help_, description=help_))
    args = parser.parse_args(argv)
    return int(modules[args.command].run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
