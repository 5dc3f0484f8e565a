"""The account stores' webhook secrets (AccountStore.webhook_secret / rotate_webhook_secret), on SQLite and
Redis: made once on first use (concurrent first calls agree), per account, replaced by a rotation, seen alike by
every connection to the same data."""
from __future__ import annotations

import base64
import threading

import pytest

from chatterbox_serverless.accounts.redis_store import RedisAccountStore
from chatterbox_serverless.accounts.sqlite_store import SQLiteAccountStore
from chatterbox_serverless.accounts.store import Account, UnknownAccount
from chatterbox_serverless.testing.redis import delete_prefix, new_prefix


@pytest.fixture(params=["sqlite", pytest.param("redis", marks=pytest.mark.redis)])
def stores(request, tmp_path):
    """`stores()`: a new connection to one fresh backend."""
    opened = []
    if request.param == "sqlite":
        def make():
            opened.append(SQLiteAccountStore(tmp_path / "jobs.sqlite3"))
            return opened[-1]
    else:
        url, prefix = request.getfixturevalue("redis_url"), new_prefix()

        def make():
            opened.append(RedisAccountStore(url, prefix=prefix))
            return opened[-1]
    yield make
    for s in opened:
        s.close()
    if request.param == "redis":
        delete_prefix(url, prefix)


def account(store, n: int) -> Account:
    return store.create(Account(id=f"acc_{n}", name="", key_hash=f"h{n}", key_prefix="cbx_", balance=10))


def test_a_secret_is_made_once_per_account(stores):
    store, other = stores(), stores()
    a, b = account(store, 1), account(store, 2)
    secret = store.webhook_secret(a.id)
    assert secret.startswith("whsec_") and len(base64.b64decode(secret[6:])) == 32
    assert other.webhook_secret(a.id) == secret == store.webhook_secret(a.id)
    assert store.webhook_secret(b.id) != secret
    assert "webhook_secret" not in store.get(a.id).public()          # never in account listings
    with pytest.raises(UnknownAccount):
        store.webhook_secret("acc_missing")
    with pytest.raises(UnknownAccount):
        store.rotate_webhook_secret("acc_missing")


def test_rotation_replaces_the_secret_everywhere(stores):
    store, other = stores(), stores()
    a = account(store, 1)
    old = store.webhook_secret(a.id)
    new = other.rotate_webhook_secret(a.id)
    assert new != old and new.startswith("whsec_")
    assert store.webhook_secret(a.id) == new == other.webhook_secret(a.id)
    assert store.get(a.id).balance == 10                              # nothing else changed


def test_concurrent_first_uses_agree(stores):
    instances = [stores() for _ in range(3)]
    a = account(instances[0], 1)
    got: list[str] = []
    barrier = threading.Barrier(6)

    def read(n: int) -> None:
        barrier.wait()
        got.append(instances[n % 3].webhook_secret(a.id))

    threads = [threading.Thread(target=read, args=(n,)) for n in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert len(got) == 6 and len(set(got)) == 1
