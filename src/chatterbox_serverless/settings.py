"""Service settings: one plain dataclass, filled by `serve`'s command-line options (or by tests directly)."""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

DEFAULT_MAX_TEXT_CHARS = 5000          # long text is split into sentence chunks by the engine
DEFAULT_SYNC_TIMEOUT = 25.0            # below the segmind SDK's 30 s read timeout: a 504 carries the request id


@dataclass
class Settings:
    data_dir: Path = field(default_factory=lambda: Path(os.environ.get("CHATTERBOX_DATA_DIR", "./data")))
    public_url: str | None = None      # e.g. https://tts.example.com; None: URLs from the request's own host
    retention_seconds: float = 3600.0  # results and audio are deleted this long after the job finished
    max_queue: int = 1000              # queued jobs beyond this: 429
    max_text_chars: int = DEFAULT_MAX_TEXT_CHARS
    sync_timeout: float = DEFAULT_SYNC_TIMEOUT
    batch_size: int = 8                # jobs the worker hands the engine at once
    batch_wait: float = 0.02           # seconds the scheduler waits to fill a batch
    lease_seconds: float = 30.0        # a claimed job returns to the queue this long after its worker went silent
    max_attempts: int = 3              # claims of one job (interrupted runs) before it is FAILED
    allow_fetch_hosts: tuple[str, ...] = ()   # reference-audio hosts allowed even on private addresses
    blocked_terms_file: Path | None = None
    url_secret: bytes | None = None    # HMAC key of audio URLs; None: a random one kept in the data dir
    shutdown_grace: float = 30.0       # SIGTERM: seconds to finish in-flight jobs before releasing them
    log_json: bool = True

    def __post_init__(self) -> None:
        self.data_dir = Path(self.data_dir)
        if self.public_url:
            self.public_url = self.public_url.rstrip("/")
        for name in ("max_queue", "max_text_chars", "batch_size", "max_attempts"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1")
        for name in ("retention_seconds", "sync_timeout", "lease_seconds"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive")
        if self.batch_wait < 0:
            raise ValueError("batch_wait must not be negative")

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
