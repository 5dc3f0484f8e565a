"""The account store contract (tests/contract/test_account_store_contract.py) run against the Redis account store, plus what is
Redis-specific: sharing the job store's server and prefix, and StoreUnavailable when Redis is away.

Every contract test of test_accounts.py that takes `account_store` or `account_store_factory` runs here with
those fixtures pointing at Redis (a fresh key prefix per test, deleted afterwards)."""
from __future__ import annotations

import inspect

import pytest

import test_account_store_contract as contract
from chatterbox_serverless.accounts import account_store_for, open_account_store
from chatterbox_serverless.accounts.redis_store import RedisAccountStore
from chatterbox_serverless.accounts.store import Account, AccountStore
from chatterbox_serverless.jobs.redis_store import RedisJobStore
from chatterbox_serverless.jobs.store import StoreUnavailable

from chatterbox_serverless.testing.redis import delete_prefix, free_port, new_prefix


@pytest.fixture
def account_store_factory(redis_url):
    prefix = new_prefix()
    opened: list[AccountStore] = []

    def make_store() -> AccountStore:
        opened.append(RedisAccountStore(redis_url, prefix=prefix))
        return opened[-1]

    yield make_store
    for s in opened:
        s.close()
    delete_prefix(redis_url, prefix)


@pytest.fixture
def account_store(account_store_factory) -> AccountStore:
    return account_store_factory()


accounts = contract.accounts            # the service fixture, here over the Redis store

_CONTRACT = [name for name, fn in vars(contract).items()
             if name.startswith("test_") and callable(fn)
             and {"account_store", "account_store_factory", "accounts"} & set(inspect.signature(fn).parameters)]
for _name in _CONTRACT:
    globals()[_name] = getattr(contract, _name)


def test_the_contract_was_found():
    assert len(_CONTRACT) >= 8, _CONTRACT


def test_accounts_live_beside_the_redis_job_store(redis_url):
    prefix = new_prefix()
    jobs = RedisJobStore(redis_url, prefix=prefix)
    try:
        accounts = account_store_for(jobs)
        assert isinstance(accounts, RedisAccountStore) and accounts.prefix == prefix and accounts.r is jobs.r
        acc = accounts.create(Account(id="acc_1", name="n", key_hash="h1", key_prefix="cbx_", balance=5))
        other = open_account_store(url=redis_url)                 # the `keys` command's way in (default prefix)
        assert other.get(acc.id) is None
        other.close()
        assert RedisAccountStore(redis_url, prefix=prefix).get_by_key_hash("h1") == acc
    finally:
        jobs.close()
        delete_prefix(redis_url, prefix)


def test_redis_away_is_store_unavailable():
    store = RedisAccountStore(f"redis://127.0.0.1:{free_port()}/0", timeout=1.0)
    with pytest.raises(StoreUnavailable):
        store.get("acc_1")
    with pytest.raises(StoreUnavailable):
        store.hold("acc_1", "job", 1)
    store.close()


def test_billing_attaches_the_account_store_of_the_same_server_and_prefix(redis_url):
    """attach_billing takes the account store on the job store's server, database and prefix, whichever client
    it uses; another database or prefix is refused (the scripts would close holds that are not there)."""
    prefix = new_prefix()
    jobs = RedisJobStore(redis_url, prefix=prefix)
    own_client = RedisAccountStore(redis_url, prefix=prefix)
    other_db = RedisAccountStore(redis_url.rsplit("/", 1)[0] + "/15", prefix=prefix)
    other_prefix = RedisAccountStore(redis_url, prefix=prefix + "x:")
    try:
        jobs.attach_billing(own_client)
        for wrong in (other_db, other_prefix):
            with pytest.raises(ValueError):
                jobs.attach_billing(wrong)
        acc = own_client.create(Account(id="acc_1", name="n", key_hash="h1", key_prefix="cbx_", balance=50))
        from chatterbox_serverless.jobs.store import Job
        jobs.submit(Job(id="j1", owner=acc.id, params={"text": "x"}), 10)
        own_client.hold(acc.id, "j1", 10, per_second=1.0, minimum=2)
        jobs.claim("w", 1, 30)
        assert jobs.complete("j1", "w", b"a", "audio/wav", {"audio_seconds": 5.5})
        assert own_client.get(acc.id).balance == 50 - 6 and own_client.get_hold("j1") is None
    finally:
        for s in (own_client, other_db, other_prefix):
            s.close()
        jobs.close()
        delete_prefix(redis_url, prefix)
