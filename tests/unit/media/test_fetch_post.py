"""SafeFetcher.post (webhook deliveries): the same address rules as fetch (a loopback receiver is refused unless
allowed, also when reached through a name), the status returned as is (redirects not followed), a total time
limit, and what was sent arrives intact."""
from __future__ import annotations

import time

import pytest

from chatterbox_serverless.media import FetchError, SafeFetcher
from chatterbox_serverless.testing.webhooks import WebhookReceiver


def test_loopback_is_refused_unless_allowed():
    with WebhookReceiver(answers=[201]) as hook:
        with pytest.raises(FetchError, match="loopback"):
            SafeFetcher().post(hook.url, b"{}")
        with pytest.raises(FetchError, match="loopback"):      # a name resolving to loopback: checked at connect
            SafeFetcher(resolver=lambda host, port: ["127.0.0.1"]).post(
                f"http://hooks.example.com:{hook.port}/hook", b"{}")
        assert hook.received == []
        status = SafeFetcher(allow_hosts=[hook.allow]).post(hook.url, b'{"a": 1}', {"webhook-id": "r1"})
        assert status == 201
        [got] = hook.received
        assert got.body == b'{"a": 1}' and got.headers["webhook-id"] == "r1"
        assert got.headers["content-type"] == "application/json"
        assert got.headers["user-agent"] == "chatterbox-serverless (webhook)"


def test_status_as_is_and_a_time_limit():
    with WebhookReceiver(answers=[302, 500]) as hook:
        fetcher = SafeFetcher(allow_hosts=[hook.allow])
        assert fetcher.post(hook.url, b"{}") == 302                # not followed
        assert fetcher.post(hook.url, b"{}") == 500
    with WebhookReceiver(delay=3.0) as slow:
        t0 = time.monotonic()
        with pytest.raises(FetchError, match="timed out"):
            SafeFetcher(allow_hosts=[slow.allow], timeout=0.5).post(slow.url, b"{}")
        assert time.monotonic() - t0 < 2.0
