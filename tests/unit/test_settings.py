"""Settings and their command-line options: each option is defined once (serve and worker share the definition),
read from CHATTERBOX_<NAME> when not given, and validated in one place with a message naming the option."""
from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from chatterbox_serverless.settings import OPTIONS, SERVE, WORKER, Settings, add_arguments, from_args


def parse(command: str, argv: list[str]) -> Settings:
    parser = argparse.ArgumentParser()
    add_arguments(parser, command)
    return from_args(parser.parse_args(argv))


def test_every_option_fills_a_field_once():
    fields = set(Settings.__dataclass_fields__)
    assert all(o.field in fields for o in OPTIONS)
    assert len({o.flag for o in OPTIONS}) == len(OPTIONS) and len({o.field for o in OPTIONS}) == len(OPTIONS)


def test_serve_and_worker_share_definitions_and_defaults():
    serve, worker = parse(SERVE, []), parse(WORKER, [])
    for name in ("batch_size", "lease_seconds", "max_attempts", "retention_seconds", "store", "redis_prefix",
                 "allow_fetch_hosts", "shutdown_grace"):
        assert getattr(serve, name) == getattr(worker, name) == getattr(Settings(), name), name
    s = parse(SERVE, ["--batch-size", "4", "--retention", "60", "--allow-fetch-hosts", "a.example, b.example:8080",
                      "--cors-origins", "https://app.example", "--no-auth", "--log-format", "plain"])
    assert (s.batch_size, s.retention_seconds, s.no_auth, s.log_json) == (4, 60.0, True, False)
    assert s.allow_fetch_hosts == ("a.example", "b.example:8080") and s.cors_origins == ("https://app.example",)
    with pytest.raises(SystemExit):          # serve-only options are not the worker's
        parse(WORKER, ["--port", "1"])


def test_environment_defaults(monkeypatch, tmp_path):
    monkeypatch.setenv("CHATTERBOX_BATCH_SIZE", "3")
    monkeypatch.setenv("CHATTERBOX_DATA_DIR", str(tmp_path))
    monkeypatch.setenv("CHATTERBOX_NO_AUTH", "1")
    monkeypatch.setenv("CHATTERBOX_RETENTION", "120")
    s = parse(SERVE, [])
    assert (s.batch_size, s.data_dir, s.no_auth, s.retention_seconds) == (3, Path(tmp_path), True, 120.0)
    assert parse(SERVE, ["--batch-size", "5"]).batch_size == 5        # the command line wins
    monkeypatch.setenv("CHATTERBOX_BATCH_SIZE", "many")
    with pytest.raises(SystemExit):                                     # argparse: "argument --batch-size: ..."
        parse(SERVE, [])


@pytest.mark.parametrize("argv, message", [
    (["--batch-size", "0"], "--batch-size must be at least 1"),
    (["--retention", "0"], "--retention must be positive"),
    (["--body-timeout", "-1"], "--body-timeout must be positive"),
    (["--price-per-second", "-1"], "--price-per-second must not be negative"),
    (["--blocked-terms", "/nonexistent/terms.txt"], "--blocked-terms /nonexistent/terms.txt is not a file"),
])
def test_invalid_values_name_the_option(argv, message):
    with pytest.raises(ValueError, match=message):
        parse(SERVE, argv)


def test_the_store_is_described_without_secrets_or_paths_where_shown(tmp_path):
    s = Settings(data_dir=tmp_path, store="redis://:hunter2@redis.internal:6379/0")
    assert "hunter2" not in s.describe_store() and s.is_redis
    assert Settings(data_dir=tmp_path).keys_command_where() == f"--data-dir {tmp_path}"
