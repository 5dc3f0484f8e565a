"""Signed audio URLs: `output` works in a browser without headers, only for who was given it, and only until the
result expires. The signature is an HMAC-SHA256 (key: the data dir's secret) of the file name and expiry."""
from __future__ import annotations

import base64
import hashlib
import hmac
import time


class UrlSigner:
    def __init__(self, secret: bytes):
        if not secret:
            raise ValueError("an empty URL secret")
        self._secret = secret

    def signature(self, name: str, expires: int) -> str:
        mac = hmac.new(self._secret, f"{name}\n{expires}".encode(), hashlib.sha256).digest()
        return base64.urlsafe_b64encode(mac).rstrip(b"=").decode()

    def query(self, name: str, expires: int) -> str:
        return f"expires={expires}&signature={self.signature(name, expires)}"

    def verify(self, name: str, expires: str | int | None, signature: str | None, now: float | None = None) -> str | None:
        """None when valid, else why not ("invalid" or "expired")."""
        try:
            exp = int(expires)  # type: ignore[arg-type]
        except (TypeError, ValueError):
            return "invalid"
        if not signature or not hmac.compare_digest(self.signature(name, exp), signature):
            return "invalid"
        if exp < (time.time() if now is None else now):
            return "expired"
        return None
