"""`chatterbox-serverless keys`: manage API keys and credits in a data dir (or a store URL).

    keys create [--name N] [--credits C] [--rate R/min] [--admin]    prints the key once
    keys list [--json]
    keys show KEY_OR_ID [--ledger N]                                  balance, usage, ledger
    keys revoke KEY_OR_ID
    keys credits KEY_OR_ID +N|-N [--note TEXT]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

DEFAULT_DATA_DIR = os.environ.get("CHATTERBOX_DATA_DIR", "./data")   # as `serve`


def _rate(value: str) -> int:
    text = value.strip().lower().removesuffix("/min").removesuffix("/m")
    try:
        rate = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"rate {value!r}: expected submissions per minute, e.g. 60 or 60/min")
    if rate < 0:
        raise argparse.ArgumentTypeError("rate must be >= 0 (0: unlimited)")
    return rate


def _signed_int(value: str) -> int:
    try:
        return int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r}: expected a whole number of credits, e.g. +100 or -20")


def _non_negative(value: str) -> int:
    n = _signed_int(value)
    if n < 0:
        raise argparse.ArgumentTypeError("credits must be >= 0")
    return n


def _add_store_options(parser: argparse.ArgumentParser, defaults: bool) -> None:
    """--data-dir/--store/--redis-prefix, accepted before the action (`keys --store X list`) and after it
    (`keys list --store X`): the action's copies default to SUPPRESS so they never overwrite the former."""
    def default(value):
        return value if defaults else argparse.SUPPRESS
    where = parser.add_argument_group("store")
    where.add_argument("--data-dir", default=default(DEFAULT_DATA_DIR),
                       help=f"the server's data dir (default: $CHATTERBOX_DATA_DIR or {DEFAULT_DATA_DIR!r})")
    where.add_argument("--store", default=default(os.environ.get("CHATTERBOX_STORE") or None), metavar="URL",
                       help="the store `serve --store` uses instead of the data dir: a SQLite file path, or "
                            "redis://HOST:PORT/DB")
    where.add_argument("--redis-prefix", default=default(None),
                       help="with a redis:// store: the prefix `serve --redis-prefix` uses "
                            "(default: $CHATTERBOX_REDIS_PREFIX or cbx:)")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    _add_store_options(parser, defaults=True)
    common = argparse.ArgumentParser(add_help=False)
    _add_store_options(common, defaults=False)
    sub = parser.add_subparsers(dest="keys_command", required=True)

    p = sub.add_parser("create", parents=[common], help="make a key (printed once, stored hashed)")
    p.add_argument("--name", default="", help="a label for the key")
    p.add_argument("--credits", type=_non_negative, default=0, help="initial credits (default 0)")
    p.add_argument("--rate", type=_rate, default=None, metavar="R/min",
                   help="submissions per minute (default 60; 0: unlimited)")
    p.add_argument("--admin", action="store_true", help="may call the admin API")

    p = sub.add_parser("list", parents=[common], help="list keys, balances and usage")
    p.add_argument("--json", action="store_true")

    p = sub.add_parser("show", parents=[common], help="one key: balance, usage and its latest ledger entries")
    p.add_argument("key", metavar="KEY_OR_ID")
    p.add_argument("--ledger", type=int, default=20, metavar="N", help="ledger entries to show (default 20)")

    p = sub.add_parser("revoke", parents=[common], help="revoke a key (it answers 403 from now on)")
    p.add_argument("key", metavar="KEY_OR_ID")

    p = sub.add_parser("credits", parents=[common], help="add (+N) or remove (-N) credits")
    p.add_argument("key", metavar="KEY_OR_ID")
    p.add_argument("amount", type=_signed_int, metavar="+N|-N")
    p.add_argument("--note", default="", help="why (kept in the ledger)")


def _fmt_time(t: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t))


def _sqlite_file(args: argparse.Namespace) -> Path | None:
    """The SQLite file the command would open, or None for a Redis store."""
    from . import DB_FILENAME
    if args.store:
        if args.store.startswith(("redis://", "rediss://", "unix://")):
            return None
        return Path(args.store.removeprefix("sqlite://"))
    return Path(args.data_dir) / DB_FILENAME


def run(args: argparse.Namespace) -> int:
    """The `keys` command: every failure is one line on stderr and a non-zero exit status, never a traceback
    (2: the store cannot be opened as given; 1: the command failed)."""
    import sqlite3

    from ..cli import run_reporting
    from ..jobs.store import StoreUnavailable

    return run_reporting(lambda: _run(args), usage=(_StoreMissing,),
                         failures=(StoreUnavailable, sqlite3.Error, ValueError))


class _StoreMissing(Exception):
    """The data dir or store file given does not exist (only `create` makes one)."""


def _run(args: argparse.Namespace) -> int:
    from . import open_account_store
    from .service import Accounts
    from .store import InsufficientCredits

    db = _sqlite_file(args)
    if db is not None:
        where = f"--store {args.store}" if args.store else f"--data-dir {args.data_dir}"
        if db.exists() and not db.is_file():
            raise _StoreMissing(f"{db} is not a database file ({where})")
        if args.keys_command != "create" and not db.exists():
            raise _StoreMissing(f"no account store at {db} (check {where}; `keys create` or `serve` make one)")
        if args.keys_command == "create" and db.parent.exists() and not db.parent.is_dir():
            raise _StoreMissing(f"{db.parent} is not a directory ({where})")
    try:
        store = open_account_store(args.data_dir, args.store, args.redis_prefix)
    except ValueError as e:
        raise _StoreMissing(str(e)) from None
    accounts = Accounts(store)
    try:
        cmd = args.keys_command
        if cmd == "create":
            key, acc = accounts.create_key(args.name, args.credits, args.rate, args.admin)
            print(key)
            print(f"# {acc.id}{' (admin)' if acc.admin else ''}: {acc.balance} credits, "
                  f"{acc.rate_per_min or 'unlimited'} submissions/min. This key is shown only now: store it.",
                  file=sys.stderr)
            if acc.balance == 0:
                print(f"# It has no credits yet, so its submissions get 406: "
                      f"chatterbox-serverless keys credits {acc.id} +1000", file=sys.stderr)
            return 0
        if cmd == "list":
            rows = [accounts.summary(a) for a in store.list()]
            if args.json:
                print(json.dumps(rows, indent=2))
                return 0
            if not rows:
                print("no keys yet: `chatterbox-serverless keys create --admin` makes one")
                return 0
            print(f"{'id':22} {'prefix':11} {'name':20} {'admin':5} {'state':7} {'balance':>9} {'held':>7} "
                  f"{'rate/min':>8} {'done':>6} {'failed':>6} {'audio s':>9}  created")
            for r in rows:
                u = r["usage"]
                print(f"{r['id']:22} {r['key_prefix'] + '…':11} {r['name'][:20]:20} {'yes' if r['admin'] else '':5} "
                      f"{'revoked' if r['revoked'] else 'active':7} {r['balance']:>9} {r['held']:>7} "
                      f"{r['rate_per_min'] or '∞':>8} {u['completed']:>6} {u['failed']:>6} "
                      f"{u['audio_seconds']:>9.1f}  {_fmt_time(r['created_at'])}")
            return 0
        acc = accounts.resolve(args.key)
        if acc is None:
            print(f"error: no key or account id {args.key!r} in this store", file=sys.stderr)
            return 1
        if cmd == "show":
            print(json.dumps(accounts.summary(acc), indent=2))
            for e in store.ledger(acc.id, args.ledger):
                print(f"{_fmt_time(e.at)}  {e.kind:8} {e.delta:+8d} held {e.hold_delta:+7d}  "
                      f"-> {e.balance_after} ({e.held_after} held)  {e.job_id or ''} {e.note}")
            return 0
        if cmd == "revoke":
            store.set_revoked(acc.id, True)
            print(f"revoked {acc.id} ({acc.name or 'no name'})")
            return 0
        if cmd == "credits":
            try:
                acc = store.adjust(acc.id, args.amount, note=args.note or "keys credits")
            except InsufficientCredits as e:
                print(f"error: cannot remove {-args.amount} credits: {e.available} available "
                      f"(balance {acc.balance}, {acc.held} held by running jobs)", file=sys.stderr)
                return 1
            print(f"{acc.id}: balance {acc.balance} ({acc.held} held, {acc.available} available)")
            return 0
        raise AssertionError(cmd)
    finally:
        store.close()
