"""`chatterbox-serverless voices`: the voice library of a key on a running server.

    chatterbox-serverless voices create narrator me.wav        # a local file (or an http(s) URL)
    chatterbox-serverless voices list
    chatterbox-serverless voices delete narrator               # by name or id
    chatterbox-serverless say "Hello." --voice narrator
"""
from __future__ import annotations

import argparse
import sys
import time
from typing import Any, TextIO


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--server", metavar="URL",
                        help="server URL (default: $CHATTERBOX_API_URL, else http://127.0.0.1:8000)")
    parser.add_argument("--key", metavar="KEY", help="API key (default: $CHATTERBOX_API_KEY or $SEGMIND_API_KEY)")
    sub = parser.add_subparsers(dest="action", required=True)
    create = sub.add_parser("create", help="add a voice from an audio sample (wav/mp3/flac/ogg, 0.5-30 s)")
    create.add_argument("name", help="its name (letters, digits, spaces, . _ -)")
    create.add_argument("audio", metavar="FILE|URL", help="the sample: a local file or an http(s) URL")
    sub.add_parser("list", help="this key's voices")
    delete = sub.add_parser("delete", help="delete a voice")
    delete.add_argument("voice", metavar="NAME|ID")


class _Usage(Exception):
    pass


def voices(args: argparse.Namespace, client: Any, out: TextIO) -> int:
    """The command's work, with the client given (tests pass one bound to a test server)."""
    if args.action == "create":
        import os
        import re
        if not re.match(r"(?i)https?://", args.audio) and not os.path.isfile(args.audio):
            raise _Usage(f"{args.audio} is not a file or an http(s) URL")
        voice = client.create_voice(args.name, args.audio if re.match(r"(?i)https?://", args.audio)
                                    else __import__("pathlib").Path(args.audio))
        out.write(f"{voice['id']}  {voice['name']}\n")
    elif args.action == "list":
        for v in client.list_voices():
            sample = v.get("audio_sample") or {}
            created = time.strftime("%Y-%m-%d %H:%M", time.localtime(v.get("created_at", 0)))
            out.write(f"{v['id']}  {v['name']:<24}  {sample.get('seconds', 0):5.1f} s  {created}\n")
    else:
        gone = client.delete_voice(args.voice)
        out.write(f"deleted {gone['id']}\n")
    return 0


def run(args: argparse.Namespace) -> int:
    from ..cli import run_reporting
    from . import Client
    from .errors import ChatterboxError

    def go() -> int:
        with Client(api_key=args.key, base_url=args.server) as client:
            return voices(args, client, sys.stdout)
    return run_reporting(go, usage=(_Usage,), failures=(ChatterboxError, ValueError),
                         usage_prefix="chatterbox-serverless voices: error: ")
