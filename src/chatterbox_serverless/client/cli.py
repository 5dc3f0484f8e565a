"""`chatterbox-serverless say`: synthesize text through a running server and write the audio to a file.

    chatterbox-serverless say "Hello there." -o hello.mp3 --voice me.wav --seed 7
    chatterbox-serverless say "Hello again." --voice narrator        # a voice of the key's library
    chatterbox-serverless say --file chapter.txt -o chapter.flac --server http://gpu-box:8000
    chatterbox-serverless say "Guten Tag." --model chatterbox-multilingual --language de
    chatterbox-serverless say "Ha! [laugh] Really?" --model chatterbox-turbo --top-k 50

The request goes through the queue (`/v2`); while it waits and runs, a progress line is shown on stderr.
A text longer than the server accepts in one request (`--max-chars`) is sent as several requests, cut at
paragraph and sentence ends, and their audio is joined here.
"""
from __future__ import annotations

import argparse
import os
import re
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, TextIO

from ..media.formats import DEFAULT_FORMAT, FORMAT_NAMES, OUTPUT_FORMATS, SUFFIX_FORMATS  # noqa: F401 - re-exported

FORMATS = FORMAT_NAMES
DEFAULT_MAX_CHARS = 5000
_SPINNER = "⠋⠙⠹⠸⠼⠴⠦⠧⠇⠏"
_PARAGRAPH = re.compile(r"\n\s*\n")
_AUDIO_SUFFIXES = (".wav", ".mp3", ".flac", ".ogg", ".opus", ".m4a", ".aac")   # --voice X.wav: a file, not a name
_SENTENCE_END = re.compile(r'(?<=[.!?…])["\')\]]*\s+')


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("text", nargs="?", help="the text to speak (or use --file)")
    parser.add_argument("-f", "--file", help="read the text from this file ('-': standard input)")
    parser.add_argument("-o", "--output", help="audio file to write (default: speech.FORMAT; '-': standard output); "
                                               "its suffix sets the format: " + ", ".join(SUFFIX_FORMATS))
    parser.add_argument("--format", choices=FORMATS,
                        help=f"audio format (default: from the output file's suffix, else {DEFAULT_FORMAT})")
    parser.add_argument("--voice", metavar="FILE|URL|NAME",
                        help="the voice: a local file or an http(s) URL to clone (reference audio), or the name or "
                             "id of a voice in this key's library (`chatterbox-serverless voices create`); a value "
                             "with a '/' or an audio suffix, or an existing file, is a file (default: the model's "
                             "built-in voice)")
    parser.add_argument("--speed", type=float, metavar="X", help="0.25-4: faster or slower, same pitch (1)")
    parser.add_argument("--seed", type=int, metavar="N", help="same text + same seed -> same audio (server default 42)")
    parser.add_argument("--exaggeration", type=float, metavar="X", help="emotion intensity, 0-2 (0.5)")
    parser.add_argument("--cfg-weight", type=float, metavar="X", help="classifier-free guidance weight, 0-2 (0.5)")
    parser.add_argument("--temperature", type=float, metavar="X", help="sampling temperature, 0-2 (0.8)")
    parser.add_argument("--min-p", type=float, metavar="X", help="min-p sampling, 0-1 (0.05)")
    parser.add_argument("--top-p", type=float, metavar="X", help="top-p sampling, 0-1 (1.0)")
    parser.add_argument("--repetition-penalty", type=float, metavar="X", help="1-2 (1.2; multilingual: 2.0)")
    parser.add_argument("--top-k", type=int, metavar="N", help="chatterbox-turbo: sample among the N most likely "
                                                                "speech tokens, 1-6563 (1000)")
    parser.add_argument("--language", metavar="CODE", help="chatterbox-multilingual: the text's language, an ISO "
                                                           "639-1 code (en, de, fr, ja, zh, ...; default en)")
    parser.add_argument("--server", metavar="URL",
                        help="server URL (default: $CHATTERBOX_API_URL, else http://127.0.0.1:8000)")
    parser.add_argument("--key", metavar="KEY",
                        help="API key (default: $CHATTERBOX_API_KEY or $SEGMIND_API_KEY; prefer those: "
                             "a key on the command line is visible to other users)")
    parser.add_argument("--model", default="chatterbox-tts", metavar="NAME",
                        help="model name on the server: chatterbox-tts (default), chatterbox-turbo, "
                             "chatterbox-multilingual (the models it serves: GET /v1/models)")
    parser.add_argument("--timeout", type=float, default=600.0, metavar="SECONDS",
                        help="seconds to wait for the audio (600)")
    parser.add_argument("--max-chars", type=int, default=DEFAULT_MAX_CHARS, metavar="N",
                        help=f"longest text sent in one request; longer texts are split ({DEFAULT_MAX_CHARS})")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress display")


class _Usage(Exception):
    """A mistake in the command line: reported with exit status 2."""


class _WriteFailed(Exception):
    """The audio was made but could not be written: reported with exit status 1, naming the requests."""


def _os_reason(e: OSError) -> str:
    """"No such file or directory" (the reason, without Python's "[Errno 2]" decoration)."""
    return e.strerror or str(e) or type(e).__name__


def _check_output(output: str) -> None:
    """Refuse, before anything is submitted (and billed), an output the audio could not be written to."""
    if output == "-":
        return
    path = Path(output)
    if path.is_dir():
        raise _Usage(f"the output {output} is a directory; name a file in it, e.g. {path / 'speech.mp3'}")
    if path.exists() and not path.is_file():
        raise _Usage(f"the output {output} exists and is not a regular file (use '-o -' for standard output)")
    parent = path.parent
    if not parent.exists():
        raise _Usage(f"cannot write {output}: the directory {parent} does not exist")
    if not parent.is_dir():
        raise _Usage(f"cannot write {output}: {parent} is not a directory")
    try:
        # The audio is written to a temporary file beside the output, then renamed: try exactly that.
        with tempfile.NamedTemporaryFile(dir=parent, prefix=f".{path.name}.", suffix=".check"):
            pass
    except OSError as e:
        raise _Usage(f"cannot write {output}: {_os_reason(e)} (in {parent})") from None


def _read_text(args: argparse.Namespace) -> str:
    if args.text is not None and args.file:
        raise _Usage("give the text or --file, not both")
    if args.file:
        try:
            text = sys.stdin.read() if args.file == "-" else Path(args.file).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise _Usage(f"cannot read {args.file}: {getattr(e, 'strerror', None) or e}") from None
    elif args.text is not None:
        text = args.text
    else:
        raise _Usage("nothing to say: give the text, or --file FILE")
    if not text.strip():
        raise _Usage("the text is empty")
    return text.strip()


def _output_and_format(args: argparse.Namespace) -> tuple[str, str]:
    fmt = args.format
    output = args.output
    if output and output != "-":
        from_suffix = SUFFIX_FORMATS.get(Path(output).suffix.lower())
        if fmt and from_suffix and fmt != from_suffix:
            raise _Usage(f"--format {fmt} does not match the output file {output}")
        fmt = fmt or from_suffix
    fmt = fmt or DEFAULT_FORMAT
    return output or f"speech{OUTPUT_FORMATS[fmt].suffix}", fmt


def _params(args: argparse.Namespace, text: str, fmt: str) -> dict[str, Any]:
    from .params import encode_audio
    params: dict[str, Any] = {"text": text, "output_format": fmt}
    for name in ("seed", "exaggeration", "cfg_weight", "temperature", "min_p", "top_p", "repetition_penalty",
                 "speed", "top_k", "language"):
        value = getattr(args, name)
        if value is not None:
            params[name] = value
    if args.voice:
        if re.match(r"(?i)https?://", args.voice):
            params["reference_audio"] = args.voice
        elif Path(args.voice).expanduser().is_file() or os.sep in args.voice or "/" in args.voice or \
                Path(args.voice).suffix.lower() in _AUDIO_SUFFIXES:
            params["reference_audio"] = encode_audio(args.voice)      # a file (an error names it if unreadable)
        else:                          # a library voice (the server says if this key has none of that name)
            params["voice"] = args.voice
    return params


def split_text(text: str, max_chars: int) -> list[str]:
    """Pieces of at most `max_chars` characters, cut at paragraph ends, then sentence ends, then spaces."""
    if len(text) <= max_chars:
        return [text]
    pieces: list[str] = []
    current = ""
    units = [s for para in _PARAGRAPH.split(text) for s in _SENTENCE_END.split(para.strip()) if s.strip()]
    for unit in units:
        unit = " ".join(unit.split())
        while len(unit) > max_chars:   # one sentence longer than a request: cut at a space
            cut = unit.rfind(" ", 0, max_chars + 1)
            cut = cut if cut > 0 else max_chars
            if current:
                pieces.append(current)
                current = ""
            pieces.append(unit[:cut].strip())
            unit = unit[cut:].strip()
        if current and len(current) + 1 + len(unit) > max_chars:
            pieces.append(current)
            current = ""
        current = f"{current} {unit}" if current else unit
    if current:
        pieces.append(current)
    return pieces


class ProgressLine:
    """One status line on stderr: rewritten in place on a terminal, one line per change otherwise."""

    def __init__(self, stream: TextIO, total: int, enabled: bool = True) -> None:
        self.stream = stream
        self.total = total
        self.enabled = enabled
        self.tty = enabled and stream.isatty()
        self.states: dict[int, str] = {}
        self.start = time.monotonic()
        self.last = ""
        self.frame = 0

    def update(self, index: int, state: str) -> None:
        self.states[index] = state
        self.show()

    def show(self) -> None:
        if not self.enabled:
            return
        counts = {s: sum(1 for v in self.states.values() if v == s) for s in ("QUEUED", "PROCESSING", "COMPLETED")}
        if self.total == 1:
            summary = next(iter(self.states.values()), "SUBMITTING").lower()
        else:
            summary = (f"{counts['COMPLETED']}/{self.total} done, {counts['PROCESSING']} processing, "
                       f"{counts['QUEUED']} queued")
        if self.tty:
            self.frame = (self.frame + 1) % len(_SPINNER)
            line = f"\r{_SPINNER[self.frame]} {summary}  {time.monotonic() - self.start:5.1f}s"
            self.stream.write(line + "\033[K")
            self.stream.flush()
        elif summary != self.last:
            self.stream.write(f"{summary} ({time.monotonic() - self.start:.1f}s)\n")
            self.stream.flush()
        self.last = summary

    def finish(self) -> None:
        if self.tty:
            self.stream.write("\r\033[K")
            self.stream.flush()


def _join_audio(parts: list[bytes], fmt: str, gap_s: float = 0.15) -> bytes:
    """Decode the parts (wav), join them with a short pause, encode as `fmt` (as the server encodes it)."""
    import io

    import numpy as np
    import soundfile as sf

    from ..media.encode import encode_audio
    arrays: list[np.ndarray] = []
    rate: int | None = None
    for data in parts:
        audio, sr = sf.read(io.BytesIO(data), dtype="float32", always_2d=False)
        if rate is not None and sr != rate:
            raise RuntimeError(f"the parts came back at different sample rates ({rate}, {sr})")
        rate = sr
        if arrays:
            arrays.append(np.zeros(int(gap_s * sr), dtype=np.float32))
        arrays.append(audio if audio.ndim == 1 else audio.mean(axis=1))
    assert rate is not None
    return encode_audio(np.concatenate(arrays), rate, fmt)[0]


def _write(data: bytes, output: str) -> None:
    if output == "-":
        sys.stdout.buffer.write(data)
        sys.stdout.buffer.flush()
        return
    path = Path(output)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.part")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def _wait_all(jobs: list[Any], timeout: float, progress: ProgressLine) -> list[dict[str, Any]]:
    """Poll every unfinished job each round (so the progress line is true for all of them) until all are
    COMPLETED; raise `InferenceFailed` at the first failure, `InferenceTimeout` past `timeout`."""
    from ._base import PollSchedule, is_transient
    from .errors import InferenceFailed, InferenceTimeout

    schedule = PollSchedule(timeout, interval=0.25, backoff=1.5, max_interval=2.0)
    results: dict[int, dict[str, Any]] = {}
    while True:
        for i, job in enumerate(jobs):
            if i in results:
                continue
            try:
                body = job.status()
            except Exception as e:  # noqa: BLE001 - a restarting server: try again next round
                if not is_transient(e):
                    raise
                continue
            progress.update(i, str(body.get("status")))
            if body.get("status") == "COMPLETED":
                results[i] = job.result()
            elif body.get("status") == "FAILED":
                raise InferenceFailed(detail=body.get("error"), status_body=body)
        if len(results) == len(jobs):
            return [results[i] for i in range(len(jobs))]
        if schedule.expired():
            pending = next(j for i, j in enumerate(jobs) if i not in results)
            raise InferenceTimeout(pending.request_id, schedule.elapsed())
        time.sleep(schedule.next_sleep())


def say(args: argparse.Namespace, client: Any, stderr: TextIO) -> int:
    """The command's work, with the client given (tests pass one bound to a test server)."""
    from .errors import InferenceTimeout

    from .params import MULTILINGUAL, TURBO, VC
    if args.model == VC:
        raise _Usage(f"{VC} converts speech, it does not speak text: use the SDK's Client.convert_voice "
                     f"(or POST /v1/{VC} with source_audio)")
    if args.language is not None and args.model != MULTILINGUAL:
        raise _Usage(f"--language is a parameter of {MULTILINGUAL} (add --model {MULTILINGUAL})")
    if args.top_k is not None and args.model != TURBO:
        raise _Usage(f"--top-k is a parameter of {TURBO} (add --model {TURBO})")
    text = _read_text(args)
    output, fmt = _output_and_format(args)
    if args.max_chars < 1:
        raise _Usage("--max-chars must be positive")
    if not args.timeout > 0:
        raise _Usage("--timeout must be positive")
    _check_output(output)
    pieces = split_text(text, args.max_chars)
    # One request: ask for the final format. Several: ask for wav, join here, encode once.
    params = _params(args, text, fmt if len(pieces) == 1 else "wav")
    progress = ProgressLine(stderr, total=len(pieces), enabled=not args.quiet)
    progress.show()
    jobs = [client.submit_async(args.model, **{**params, "text": piece}) for piece in pieces]
    for i in range(len(jobs)):
        progress.update(i, "QUEUED")
    try:
        results = _wait_all(jobs, args.timeout, progress)
    except InferenceTimeout as e:
        progress.finish()
        stderr.write(f"error: timed out after {e.elapsed_s:.0f}s; request {e.request_id} may still finish "
                     f"(raise --timeout)\n")
        return 1
    except KeyboardInterrupt:
        progress.finish()
        stderr.write("interrupted; submitted requests: " + ", ".join(j.request_id for j in jobs) + "\n")
        return 130
    finally:
        progress.finish()
    inference = sum(float((r.get("metrics") or {}).get("inference_time") or 0.0) for r in results)
    try:
        if len(results) == 1 and output != "-":
            client.download(results[0], output)
            size = Path(output).stat().st_size
        else:
            audio = [client.fetch_audio(r) for r in results]
            data = audio[0] if len(audio) == 1 else _join_audio(audio, fmt)
            _write(data, output)
            size = len(data)
    except OSError as e:
        where = "standard output" if output == "-" else output
        ids = ", ".join(j.request_id for j in jobs)
        raise _WriteFailed(f"could not write {where} ({_os_reason(e)}); the audio stays on the server until "
                           f"it expires: request{'s' if len(jobs) > 1 else ''} {ids}") from None
    if not args.quiet:
        where = "standard output" if output == "-" else output
        stderr.write(f"wrote {where} ({size / 1024:.1f} KiB, {fmt}) in {time.monotonic() - progress.start:.1f}s "
                     f"(inference {inference:.1f}s{f', {len(pieces)} requests' if len(pieces) > 1 else ''})\n")
    return 0


def run(args: argparse.Namespace) -> int:
    """`say`, with every failure reported as one line on stderr and a non-zero exit status (never a traceback):
    2 for a mistake in the command line, 1 for everything else, 130 when interrupted."""
    from ..cli import run_reporting
    from . import Client
    from .errors import ChatterboxError

    def go() -> int:
        with Client(api_key=args.key, base_url=args.server) as client:
            return say(args, client, sys.stderr)
    return run_reporting(go, usage=(_Usage,), failures=(ChatterboxError, _WriteFailed, ValueError),
                         usage_prefix="chatterbox-serverless say: error: ")
