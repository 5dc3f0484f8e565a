"""Property-based fuzzing of the whole HTTP API from its own OpenAPI spec (schemathesis), over a real socket with
a valid admin key and an engine double: no answer is a 5xx, and every error body is `{"error": "<message>"}`.
Both schema-conforming and schema-violating requests are generated (wrong types, missing fields, junk bodies)."""
from __future__ import annotations

import pytest

schemathesis = pytest.importorskip("schemathesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis.errors import Unsatisfiable  # noqa: E402
from schemathesis import GenerationMode  # noqa: E402

from chatterbox_serverless.testing import ServerWithKeys, SilentEngineForTests  # noqa: E402


class RefusingFetcherForTests:
    """Reference-audio URLs fail at once (the real fetcher would try the network)."""

    def fetch(self, url: str) -> bytes:
        from chatterbox_serverless.media import FetchError
        raise FetchError("fetching is disabled in this test")

    async def afetch(self, url: str) -> bytes:
        return self.fetch(url)


@pytest.fixture(scope="module")
def fuzz_server(tmp_path_factory):
    s = ServerWithKeys(tmp_path_factory.mktemp("fuzz") / "data", engine=SilentEngineForTests(max_seconds=0.2),
               fetcher=RefusingFetcherForTests())
    with s:
        s.admin_key = s.key(credits=10**9, rate=0, admin=True)
        yield s


@pytest.fixture(scope="module")
def api_schema(fuzz_server):
    return schemathesis.openapi.from_url(f"{fuzz_server.url}/openapi.json")


def check(case, response) -> None:
    where = (case.as_curl_command(), response.status_code, response.content[:500])
    assert response.status_code < 500, where
    if response.status_code >= 400 and case.method.upper() != "HEAD":     # a HEAD answer has no body
        assert response.headers.get("content-type", [""])[0].startswith("application/json"), where
        body = response.json()
        if case.path.startswith(("/v1/audio/", "/v1/models")):        # OpenAI's shape on the OpenAI routes
            error = body.get("error") if isinstance(body, dict) else None
            assert isinstance(error, dict) and isinstance(error.get("message"), str) and error["message"], where
            assert {"message", "type", "param", "code"} <= set(error), where
        else:
            assert isinstance(body, dict) and isinstance(body.get("error"), str) and body["error"], where


@pytest.mark.parametrize("mode", list(GenerationMode), ids=lambda m: m.value)
def test_no_5xx_and_errors_are_json(api_schema, fuzz_server, mode):
    operations = [result.ok() for result in api_schema.get_all_operations()]
    assert {"/v2/chatterbox-tts", "/v1/chatterbox-tts", "/v2/requests/{request_id}/status", "/v1/account",
            "/v1/admin/keys", "/v1/admin/keys/{account_id}/credits"} <= {op.path for op in operations}
    calls = fuzzed = 0
    for op in operations:
        @settings(max_examples=25, deadline=None, derandomize=True, database=None,
                  suppress_health_check=list(HealthCheck))
        @given(case=op.as_strategy(generation_mode=mode))
        def fuzz(case):
            nonlocal calls
            # The key is never fuzzed away: the point is to get past authentication (401s are tested elsewhere).
            response = case.call(base_url=fuzz_server.url, headers={"x-api-key": fuzz_server.admin_key}, timeout=30)
            calls += 1
            check(case, response)
        try:
            fuzz()
        except Unsatisfiable:       # nothing to break (no parameters, no body): only in negative mode
            assert mode == GenerationMode.NEGATIVE
            continue
        fuzzed += 1
    assert fuzzed >= 5 and calls >= 5 * 25
