"""Service settings: one plain dataclass, and the command-line options that fill it, each defined and validated
once. `serve` and `worker` (and tests, directly) build a `Settings`; `service.build_service` turns it into a
running service.

Every option also reads an environment variable `CHATTERBOX_<NAME>` (e.g. CHATTERBOX_STORE) as its default.
"""
from __future__ import annotations

import argparse
import os
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Callable

DEFAULT_MAX_TEXT_CHARS = 5000          # long text is split into sentence chunks by the engine
DEFAULT_SYNC_TIMEOUT = 25.0            # below the segmind SDK's 30 s read timeout: a 504 carries the request id


def _split_list(value: str | tuple | list | None) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, str):
        value = value.split(",")
    return tuple(v.strip() for v in value if v and v.strip())


@dataclass
class Settings:
    # where things live
    data_dir: Path = field(default_factory=lambda: Path(os.environ.get("CHATTERBOX_DATA_DIR", "./data")))
    store: str = ""                    # "" (SQLite in data_dir), a SQLite path, or redis://... (scale-out)
    redis_prefix: str = "cbx:"
    audio_dir: str | None = None       # Redis store: shared directory for large outputs
    audio_inline_max: int = 1 << 20
    # HTTP
    host: str = "127.0.0.1"
    port: int = 8000
    public_url: str | None = None      # e.g. https://tts.example.com; None: URLs from the request's own host
    cors_origins: tuple[str, ...] = ()  # browser origins allowed to call the API (default: none)
    body_timeout: float = 30.0         # a request body that stalls this long: 408
    sync_timeout: float = DEFAULT_SYNC_TIMEOUT
    max_text_chars: int = DEFAULT_MAX_TEXT_CHARS
    max_queue: int = 1000              # queued jobs beyond this: 429
    # accounts
    no_auth: bool = False              # no API keys (local use only)
    price_per_second: float = 1.0
    min_price: int = 1
    # jobs and workers
    workers: int = 1                   # `serve`: in-process workers (0 or 1)
    worker_id: str | None = None
    retention_seconds: float = 3600.0  # results and audio are deleted this long after the job finished
    batch_size: int = 8                # jobs the worker hands the engine at once
    batch_wait: float = 0.02           # seconds the worker waits to fill a batch
    lease_seconds: float = 30.0        # a claimed job returns to the queue this long after its worker went silent
    max_attempts: int = 3              # claims of one job (interrupted runs) before it is FAILED
    shutdown_grace: float = 30.0       # SIGTERM: seconds to finish in-flight jobs before releasing them
    allow_fetch_hosts: tuple[str, ...] = ()   # reference-audio hosts allowed even on private addresses
    blocked_terms_file: Path | None = None
    webhook_attempts: int = 8          # deliveries of a job's result to its webhook_url, at most
    webhook_backoff: float = 25.0      # seconds before the second attempt, doubling after each failure
    webhook_timeout: float = 10.0      # seconds one attempt may take
    # the OpenAI speech API and the voice library
    model_aliases: tuple[str, ...] = ("tts-1", "tts-1-hd", "gpt-4o-mini-tts")   # OpenAI `model` names served
    openai_voices: tuple[str, ...] = ()   # "alloy=default", "echo=NAME" or "echo=voice_ID"; unmapped: built-in
    max_voices: int = 20               # library voices per key
    max_voice_bytes: int = 10_000_000  # one voice's audio sample
    metrics_port: int = 0              # `worker`: Prometheus listener (0: off)
    metrics_host: str = "127.0.0.1"
    url_secret: bytes | None = None    # HMAC key of audio URLs; None: a random one kept in the data dir
    # logs
    log_json: bool = True
    log_level: str = "info"

    def __post_init__(self) -> None:
        self.data_dir = Path(self.data_dir)
        if self.public_url:
            self.public_url = self.public_url.rstrip("/")
        self.allow_fetch_hosts = _split_list(self.allow_fetch_hosts)
        self.cors_origins = _split_list(self.cors_origins)
        self.model_aliases = _split_list(self.model_aliases)
        self.openai_voices = _split_list(self.openai_voices)
        from .voices.library import parse_voice_map
        try:
            parse_voice_map(self.openai_voices)
        except ValueError as e:
            raise ValueError(f"--openai-voices: {e}") from None
        if self.max_voices < 0 or self.max_voice_bytes < 1:
            raise ValueError("--max-voices must not be negative and --max-voice-bytes must be positive")
        if self.blocked_terms_file is not None:
            self.blocked_terms_file = Path(self.blocked_terms_file)
        for name in ("max_queue", "max_text_chars", "batch_size", "max_attempts", "webhook_attempts"):
            if getattr(self, name) < 1:
                raise ValueError(f"{_flag(name)} must be at least 1")
        for name in ("retention_seconds", "sync_timeout", "lease_seconds", "body_timeout", "webhook_timeout"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{_flag(name)} must be positive")
        for name in ("batch_wait", "shutdown_grace", "price_per_second", "min_price", "webhook_backoff"):
            if getattr(self, name) < 0:
                raise ValueError(f"{_flag(name)} must not be negative")
        if self.workers not in (0, 1):
            raise ValueError("--workers must be 0 or 1")
        if not 0 <= self.port <= 65535 or not 0 <= self.metrics_port <= 65535:
            raise ValueError("a port must be between 0 and 65535")
        if self.allow_fetch_hosts:
            from .media.fetch import AllowList
            try:
                AllowList(self.allow_fetch_hosts)
            except ValueError as e:
                raise ValueError(f"--allow-fetch-hosts: {e}") from None
        if self.blocked_terms_file is not None and not self.blocked_terms_file.is_file():
            raise ValueError(f"--blocked-terms {self.blocked_terms_file} is not a file")

    @property
    def is_redis(self) -> bool:
        return self.store.startswith(("redis://", "rediss://", "unix://"))

    def describe_store(self) -> str:
        """The store's URL without its password, for logs."""
        if "@" in self.store and "://" in self.store:
            scheme, rest = self.store.split("://", 1)
            return f"{scheme}://***@{rest.rsplit('@', 1)[1]}"
        return self.store or f"sqlite ({self.data_dir / 'jobs.sqlite3'})"

    def keys_command_where(self) -> str:
        """The `keys` command's store option matching these settings, e.g. "--data-dir ./data"."""
        return f"--store {self.store}" if self.store else f"--data-dir {self.data_dir}"

    def load_url_secret(self) -> bytes:
        """The key that signs audio URLs: configured, or created once per data dir (0600) and kept there."""
        if self.url_secret:
            return self.url_secret
        env = os.environ.get("CHATTERBOX_URL_SECRET")
        if env:
            return env.encode()
        path = self.data_dir / "url-secret"
        self.data_dir.mkdir(parents=True, exist_ok=True)
        if not path.exists():
            tmp = path.with_name(f".url-secret.{os.getpid()}")
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "wb") as f:
                f.write(os.urandom(32).hex().encode())
                f.flush()
                os.fsync(f.fileno())
            try:
                os.link(tmp, path)      # never replaces a secret another process created meanwhile
            except FileExistsError:
                pass
            finally:
                tmp.unlink(missing_ok=True)
        return path.read_bytes().strip()


# --- command-line options ----------------------------------------------------------------------------------------
SERVE, WORKER = "serve", "worker"
BOTH = (SERVE, WORKER)


@dataclass(frozen=True)
class Option:
    field: str                       # the Settings field it fills
    flag: str
    help: str
    commands: tuple[str, ...] = BOTH
    type: Callable[[str], Any] = str
    env: str | None = None           # CHATTERBOX_<env>; default: the flag's name upper-cased
    choices: tuple | None = None
    store_true: bool = False


OPTIONS: tuple[Option, ...] = (
    Option("host", "--host", "address to listen on (default 127.0.0.1)", (SERVE,)),
    Option("port", "--port", "port (default 8000)", (SERVE,), int),
    Option("data_dir", "--data-dir", "jobs database, audio, secrets and the tiny model (default ./data)", type=Path),
    Option("store", "--store", "job store: redis://[:PASSWORD@]HOST:PORT/DB (rediss:// for TLS) to share jobs "
           "between API replicas and workers, or a SQLite file path (default: jobs.sqlite3 in --data-dir)"),
    Option("redis_prefix", "--redis-prefix", "prefix of every Redis key (several deployments can share one Redis; "
           "default cbx:)"),
    Option("audio_dir", "--audio-dir", "Redis store: a directory every API replica and worker mounts (NFS, a "
           "ReadWriteMany volume) for outputs larger than --audio-inline-max; default: all audio in Redis"),
    Option("audio_inline_max", "--audio-inline-max", "Redis store with --audio-dir: outputs up to this many bytes "
           "stay in Redis (default 1048576)", type=int),
    Option("workers", "--workers", "in-process workers: 1 (default) or 0 (API only, workers run elsewhere)",
           (SERVE,), int, choices=(0, 1)),
    Option("worker_id", "--worker-id", "name shown in /ready (default HOST-PID-random); with several --model, "
           "one worker per model, named ID-MODEL", (WORKER,)),
    Option("retention_seconds", "--retention", "seconds results and audio are kept (default 3600)", type=float,
           env="RETENTION"),
    Option("max_queue", "--max-queue", "queued jobs before submissions get 429 (default 1000)", (SERVE,), int),
    Option("batch_size", "--batch-size", "jobs per engine batch (default 8)", type=int),
    Option("batch_wait", "--batch-wait", "seconds to wait to fill a batch (default 0.02)", type=float),
    Option("sync_timeout", "--sync-timeout", "seconds a /v1 call waits before answering 504 with the request id "
           "(default 25)", (SERVE,), float),
    Option("max_text_chars", "--max-text-chars", "longest accepted text (default 5000)", (SERVE,), int),
    Option("body_timeout", "--body-timeout", "seconds a request body may stall before the answer is 408 "
           "(default 30)", (SERVE,), float),
    Option("lease_seconds", "--lease-seconds", "a job whose worker went silent this long is retried (default 30)",
           type=float),
    Option("max_attempts", "--max-attempts", "runs of one job before it FAILs (default 3)", type=int),
    Option("public_url", "--public-url", "base URL clients see (behind a proxy), e.g. https://tts.example.com; "
           "default: the request's host", (SERVE,)),
    Option("cors_origins", "--cors-origins", "comma-separated browser origins allowed to call the API, e.g. "
           "https://app.example.com (default: none; * allows any)", (SERVE,)),
    Option("allow_fetch_hosts", "--allow-fetch-hosts", "comma-separated HOST or HOST:PORT entries that "
           "reference_audio URLs may reach even on private addresses; an entry without a port allows only "
           "ports 80 and 443"),
    Option("blocked_terms_file", "--blocked-terms", "file of blocked terms, one per line: matching jobs end FAILED "
           "(content policy)", type=Path, env="BLOCKED_TERMS"),
    Option("webhook_attempts", "--webhook-attempts", "attempts to deliver a job's result to its webhook_url "
           "(default 8)", type=int),
    Option("webhook_backoff", "--webhook-backoff", "seconds between the first and second webhook attempts, "
           "doubling after each failure (default 25: 8 attempts span ~53 min; none after the result expires)",
           type=float),
    Option("webhook_timeout", "--webhook-timeout", "seconds one webhook attempt may take (default 10)", type=float),
    Option("shutdown_grace", "--shutdown-grace", "seconds to finish in-flight jobs on SIGTERM (default 30)",
           type=float),
    Option("no_auth", "--no-auth", "no API keys: anyone who reaches the server may use it (local setups only; "
           "warns beyond loopback)", (SERVE,), store_true=True),
    Option("price_per_second", "--price-per-second", "credits one second of produced audio costs (default 1)",
           (SERVE,), float),
    Option("min_price", "--min-price", "credits a completed request costs at least (default 1)", (SERVE,), int),
    Option("model_aliases", "--model-aliases", "comma-separated model names POST /v1/audio/speech also accepts "
           "for this server's model (default tts-1,tts-1-hd,gpt-4o-mini-tts; '' for none)", (SERVE,)),
    Option("openai_voices", "--openai-voices", "comma-separated NAME=VOICE mapping OpenAI's voice names (alloy, "
           "ash, ballad, coral, echo, fable, onyx, nova, sage, shimmer, verse, marin, cedar) to 'default' (the "
           "built-in voice), a library voice id (usable by every key) or a voice name in the caller's library; "
           "unmapped names: the built-in voice", (SERVE,)),
    Option("max_voices", "--max-voices", "library voices one key may keep (default 20; 0: no voice library)",
           (SERVE,), int),
    Option("max_voice_bytes", "--max-voice-bytes", "largest audio sample of a library voice, in bytes (default "
           "10000000)", (SERVE,), int),
    Option("metrics_port", "--metrics-port", "serve this worker's Prometheus metrics on this port (default 0: off)",
           (WORKER,), int, env="WORKER_METRICS_PORT"),
    Option("metrics_host", "--metrics-host", "address of the metrics listener (default 127.0.0.1)", (WORKER,),
           env="WORKER_METRICS_HOST"),
    Option("log_json", "--log-format", "log lines as json (default) or plain", type=lambda v: v == "json",
           choices=("json", "plain")),
    Option("log_level", "--log-level", "debug, info (default), warning or error"),
)

_DEFAULTS = Settings.__dataclass_fields__


def _flag(name: str) -> str:
    return next((o.flag for o in OPTIONS if o.field == name), name)


def _default(option: Option) -> Any:
    env = os.environ.get(f"CHATTERBOX_{option.env or option.flag[2:].replace('-', '_').upper()}")
    if option.store_true:
        return env in ("1", "true", "yes") if env is not None else False
    if env is not None:
        return env
    f = _DEFAULTS[option.field]
    value = f.default_factory() if callable(f.default_factory) else f.default   # type: ignore[misc]
    if option.field == "log_json":
        return "json" if value else "plain"
    if isinstance(value, tuple):
        return ",".join(value)
    return value


def add_arguments(parser: argparse.ArgumentParser, command: str) -> None:
    """Add the options of `command` (SERVE or WORKER) and the engine's options to `parser`."""
    from .engine.options import add_engine_arguments
    for o in OPTIONS:
        if command not in o.commands:
            continue
        if o.store_true:
            parser.add_argument(o.flag, dest=o.field, action="store_true", default=_default(o), help=o.help)
        elif o.choices and o.field == "log_json":
            parser.add_argument(o.flag, dest=o.field, choices=o.choices, default=_default(o), help=o.help)
        else:
            parser.add_argument(o.flag, dest=o.field, type=o.type, choices=o.choices, default=_default(o),
                                help=o.help)
    add_engine_arguments(parser)


def from_args(args: argparse.Namespace) -> Settings:
    """Settings from parsed options (raises ValueError naming the option when one is invalid). Defaults read from
    the environment are strings that argparse converts like the command line's, so a bad one is argparse's
    one-line usage error naming the option."""
    values: dict[str, Any] = {}
    for o in OPTIONS:
        if not hasattr(args, o.field):
            continue
        value = getattr(args, o.field)
        if o.field == "log_json":
            value = value == "json" if isinstance(value, str) else bool(value)
        if value in ("", None) and o.field in ("audio_dir", "public_url", "worker_id", "blocked_terms_file"):
            value = None
        values[o.field] = value
    known = {f.name for f in fields(Settings)}
    return Settings(**{k: v for k, v in values.items() if k in known})
