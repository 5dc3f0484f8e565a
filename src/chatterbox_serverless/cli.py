"""The `chatterbox-serverless` command. Each subcommand lives beside the code it drives; a module named here
provides `add_arguments(parser)` (cheap, no heavy imports) and `run(args) -> int`."""
from __future__ import annotations

import argparse
import importlib
import sys
from typing import Callable

COMMANDS = {
    "serve": ("chatterbox_serverless.api.serve", "start the API (and, by default, an in-process worker)"),
    "worker": ("chatterbox_serverless.jobs.worker_main", "run a worker against a shared store"),
    "keys": ("chatterbox_serverless.accounts.cli", "manage API keys and credits"),
    "parity": ("chatterbox_serverless.engine.parity", "compare this engine with a reference dump"),
    "say": ("chatterbox_serverless.client.cli", "synthesize text through a running server"),
    "voices": ("chatterbox_serverless.client.voices_cli", "manage a key's voice library on a running server"),
}


def error(message: str) -> None:
    """One line on stderr, whatever the message held (messages from a server, a store or the OS may hold line
    breaks)."""
    try:
        sys.stderr.write(" ".join(str(message).split()) + "\n")
        sys.stderr.flush()
    except OSError:
        pass


def run_reporting(run: Callable[[], int], *, usage: tuple[type[BaseException], ...] = (),
                  failures: tuple[type[BaseException], ...] = (), usage_prefix: str = "error: ") -> int:
    """Run a command so that every failure is one line on stderr and an exit status, never a traceback: 2 for
    `usage` errors (the command line is wrong), 1 for `failures`, OS errors and anything unexpected, 130 when
    interrupted."""
    try:
        return run()
    except usage as e:
        error(f"{usage_prefix}{e}")
        return 2
    except failures as e:
        error(f"error: {e}")
        return 1
    except OSError as e:
        where = f" ({e.filename})" if getattr(e, "filename", None) else ""
        error(f"error: {e.strerror or e or type(e).__name__}{where}")
        return 1
    except KeyboardInterrupt:
        error("interrupted")
        return 130
    except Exception as e:  # noqa: BLE001 - the command's promise: one line, never a traceback
        error(f"error: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else 'unexpected failure'}")
        return 1


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
