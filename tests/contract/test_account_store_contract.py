"""Accounts: the AccountStore contract (parametrised by backend), the service (keys, pricing, holds, repair) and
the `keys` command. HTTP behaviour is in tests/test_accounts_api.py.

To run the contract against another backend, add its name to BACKENDS and a branch to `make_store`."""
from __future__ import annotations

import json
import threading
from types import SimpleNamespace

import pytest

from chatterbox_serverless.accounts import open_account_store
from chatterbox_serverless.accounts.service import (KEY_PREFIX, Accounts, AuthError, Pricing, RateLimited,
                                                    hash_key, key_from_headers)
from chatterbox_serverless.accounts.sqlite_store import SQLiteAccountStore
from chatterbox_serverless.accounts.store import Account, AccountStore, DuplicateHold, InsufficientCredits

BACKENDS = ["sqlite"]


@pytest.fixture(params=BACKENDS)
def account_store_factory(request, tmp_path):
    """Opens connections to ONE fresh backend (each call: a new connection/client to the same data)."""
    opened: list[AccountStore] = []

    def make_store() -> AccountStore:
        if request.param == "sqlite":
            store = SQLiteAccountStore(tmp_path / "jobs.sqlite3")
        else:  # pragma: no cover - other backends plug in here
            raise AssertionError(request.param)
        opened.append(store)
        return store

    yield make_store
    for s in opened:
        s.close()


@pytest.fixture
def account_store(account_store_factory) -> AccountStore:
    return account_store_factory()


def new_account(store: AccountStore, balance: int = 100, **kw) -> Account:
    n = store.count()
    return store.create(Account(id=f"acc_{n}", name=f"n{n}", key_hash=f"h{n}", key_prefix="cbx_xxxxxx",
                                balance=balance, **kw))


def assert_explainable(store: AccountStore, account_id: str) -> None:
    """The ledger explains the balance and the holds, entry by entry."""
    acc = store.get(account_id)
    entries = store.ledger(account_id, limit=0)
    balance = held = 0
    for e in entries:
        balance += e.delta
        held += e.hold_delta
        assert (e.balance_after, e.held_after) == (balance, held), e
        assert 0 <= held <= balance
    assert (acc.balance, acc.held) == (balance, held)
    assert held == sum(h.amount for h in store.holds() if h.account_id == account_id)


# --- the store contract -------------------------------------------------------------------------------------
def test_create_and_lookup(account_store):
    a = new_account(account_store, balance=50, admin=True, rate_per_min=7)
    assert account_store.get(a.id) == a
    assert account_store.get_by_key_hash(a.key_hash) == a
    assert account_store.get("nope") is None and account_store.get_by_key_hash("nope") is None
    b = new_account(account_store, balance=0)
    assert [x.id for x in account_store.list()] == [a.id, b.id] and account_store.count() == 2
    assert (a.balance, a.held, a.available, a.admin, a.rate_per_min) == (50, 0, 50, True, 7)
    [grant] = account_store.ledger(a.id)
    assert (grant.kind, grant.delta, grant.balance_after) == ("grant", 50, 50)
    assert account_store.ledger(b.id) == []
    with pytest.raises(Exception):  # the key hash is unique
        account_store.create(Account(id="acc_other", name="", key_hash=a.key_hash, key_prefix=""))


def test_revoke_and_limits(account_store):
    a = new_account(account_store)
    assert account_store.set_revoked(a.id).revoked and account_store.get(a.id).revoked
    assert not account_store.set_revoked(a.id, False).revoked
    b = account_store.update_limits(a.id, rate_per_min=3, admin=True)
    assert (b.rate_per_min, b.admin, b.name) == (3, True, a.name)
    assert account_store.get(a.id) == b
    with pytest.raises(KeyError):
        account_store.set_revoked("missing")


def test_hold_settle_release(account_store):
    a = new_account(account_store, balance=100)
    assert account_store.hold(a.id, "j1", 30).available == 70
    assert account_store.hold(a.id, "j2", 30).available == 40
    with pytest.raises(DuplicateHold):
        account_store.hold(a.id, "j1", 1)
    with pytest.raises(InsufficientCredits) as e:
        account_store.hold(a.id, "j3", 41)
    assert (e.value.needed, e.value.available) == (41, 40)
    assert account_store.get_hold("j3") is None
    s = account_store.settle("j1", 12, seconds=11.5)
    assert (s.balance, s.held, s.available) == (88, 30, 58)
    assert account_store.settle("j1", 12) is None, "settling twice must charge once"
    assert account_store.release("j1") is None
    r = account_store.release("j2", note="boom")
    assert (r.balance, r.held) == (88, 0)
    assert account_store.release("j2") is None and account_store.settle("j2", 5) is None
    kinds = [(e.kind, e.delta, e.hold_delta) for e in account_store.ledger(a.id)]
    assert kinds == [("grant", 100, 0), ("hold", 0, 30), ("hold", 0, 30), ("settle", -12, -30), ("release", 0, -30)]
    assert account_store.ledger(a.id, limit=2)[-1].note == "boom"
    assert_explainable(account_store, a.id)


def test_settle_never_goes_negative_nor_eats_other_holds(account_store):
    a = new_account(account_store, balance=10)
    account_store.hold(a.id, "j1", 4)
    account_store.hold(a.id, "j2", 5)
    s = account_store.settle("j1", 50, seconds=50.0)           # real cost far above the hold
    assert (s.balance, s.held) == (5, 5), "charges what it can, keeps j2's hold covered"
    assert "capped" in account_store.ledger(a.id, 1)[0].note
    s = account_store.settle("j2", 3)
    assert (s.balance, s.held) == (2, 0)
    assert_explainable(account_store, a.id)


def test_adjust(account_store):
    a = new_account(account_store, balance=10)
    assert account_store.adjust(a.id, 5, "top-up").balance == 15
    account_store.hold(a.id, "j", 10)
    with pytest.raises(InsufficientCredits):
        account_store.adjust(a.id, -6)                     # would leave less than the hold
    assert account_store.adjust(a.id, -5).balance == 10
    assert [e.kind for e in account_store.ledger(a.id)] == ["grant", "grant", "hold", "adjust"]
    with pytest.raises(KeyError):
        account_store.adjust("missing", 1)
    assert_explainable(account_store, a.id)


def test_holds_listing_and_usage(account_store):
    a = new_account(account_store, balance=100)
    account_store.hold(a.id, "old", 1, now=1000.0)
    account_store.hold(a.id, "new", 1, now=2000.0)
    assert [h.job_id for h in account_store.holds()] == ["old", "new"]
    assert [h.job_id for h in account_store.holds(older_than=1500.0)] == ["old"]
    account_store.settle("old", 7, seconds=6.2)
    account_store.hold(a.id, "x", 2)
    account_store.release("x")
    u = account_store.usage(a.id)
    assert (u.completed, u.failed, u.credits_spent, u.open_holds) == (1, 1, 7, 1)
    assert u.audio_seconds == pytest.approx(6.2)
    assert account_store.usage(a.id, since=4e12).completed == 0


def test_token_bucket(account_store):
    a = new_account(account_store)
    t = 1_000_000.0
    assert [account_store.take_token(a.id, 3, now=t) for _ in range(3)] == [0.0, 0.0, 0.0]
    wait = account_store.take_token(a.id, 3, now=t)
    assert wait == pytest.approx(20.0)                     # 3/min: one token every 20 s
    assert account_store.take_token(a.id, 3, now=t + 19.0) > 0
    assert account_store.take_token(a.id, 3, now=t + 21.0) == 0.0
    assert account_store.take_token(a.id, 0, now=t) == 0.0  # unlimited
    b = new_account(account_store)
    assert account_store.take_token(b.id, 3, now=t + 21.0) == 0.0, "buckets are per account"


def test_concurrent_holds_for_the_last_credits(account_store_factory):
    """Threads, each with its own connection, race to hold 3 credits out of 10: exactly 3 win."""
    first = account_store_factory()
    a = new_account(first, balance=10)
    stores = [account_store_factory() for _ in range(8)]
    won, refused = [], []
    barrier = threading.Barrier(len(stores))

    def attempt(i: int, store: AccountStore) -> None:
        barrier.wait()
        for k in range(3):
            try:
                store.hold(a.id, f"job-{i}-{k}", 3)
                won.append(i)
            except InsufficientCredits:
                refused.append(i)

    threads = [threading.Thread(target=attempt, args=(i, s)) for i, s in enumerate(stores)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(won) == 3 and len(refused) == 21
    acc = first.get(a.id)
    assert (acc.balance, acc.held, acc.available) == (10, 9, 1)
    # settle them all concurrently, twice each: charged exactly once each
    holds = first.holds()
    ts = [threading.Thread(target=s.settle, args=(h.job_id, 3)) for h in holds for s in stores[:2]]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    acc = first.get(a.id)
    assert (acc.balance, acc.held) == (1, 0)
    assert_explainable(first, a.id)


def test_sqlite_locked_is_store_unavailable(tmp_path):
    """A database write-locked past the busy timeout answers StoreUnavailable (the API's 502), not a crash;
    reads go on (WAL)."""
    import sqlite3

    from chatterbox_serverless.jobs.store import StoreUnavailable

    store = SQLiteAccountStore(tmp_path / "jobs.sqlite3", busy_timeout=0.1)
    a = new_account(store, balance=5)
    other = sqlite3.connect(str(tmp_path / "jobs.sqlite3"), isolation_level=None)
    other.execute("BEGIN IMMEDIATE")
    try:
        with pytest.raises(StoreUnavailable):
            store.hold(a.id, "j", 1)
        assert store.get(a.id).held == 0
    finally:
        other.execute("ROLLBACK")
        other.close()
    assert store.hold(a.id, "j", 1).held == 1
    store.close()


# --- the service --------------------------------------------------------------------------------------------
@pytest.fixture
def accounts(account_store) -> Accounts:
    return Accounts(account_store, Pricing(credits_per_second=2.0, minimum=3))


def test_keys_are_random_hashed_and_shown_once(accounts, account_store):
    key, acc = accounts.create_key("app", credits=5, rate_per_min=10)
    key2, _ = accounts.create_key()
    assert key.startswith(KEY_PREFIX) and len(key) >= 40 and key != key2
    assert acc.key_hash == hash_key(key) and key not in json.dumps(acc.public())
    assert "key_hash" not in acc.public()
    assert accounts.authenticate(key).id == acc.id
    assert accounts.resolve(key).id == acc.id and accounts.resolve(acc.id).id == acc.id
    assert accounts.resolve("cbx_unknown") is None


def test_authenticate_codes(accounts, account_store):
    key, acc = accounts.create_key()
    admin_key, _ = accounts.create_key(admin=True)
    for bad in (None, "", "cbx_nope", "x" * 10_000):
        with pytest.raises(AuthError) as e:
            accounts.authenticate(bad)
        assert e.value.status == 401
    with pytest.raises(AuthError) as e:
        accounts.authenticate(key, admin=True)
    assert e.value.status == 403
    assert accounts.authenticate(admin_key, admin=True).admin
    account_store.set_revoked(acc.id)
    with pytest.raises(AuthError) as e:
        accounts.authenticate(key)
    assert e.value.status == 403 and "revoked" in e.value.message


def test_key_from_headers():
    assert key_from_headers("k1", "Bearer k2") == "k1"
    assert key_from_headers(None, "Bearer k2") == "k2"
    assert key_from_headers(None, "bearer  k2 ") == "k2"
    assert key_from_headers(None, "Basic abc") is None
    assert key_from_headers(None, "Bearer ") is None and key_from_headers(None, None) is None


def test_pricing():
    p = Pricing(credits_per_second=2.0, minimum=3, hold_chars_per_second=10.0, hold_extra_seconds=2.0)
    assert p.cost(0.0) == 3 and p.cost(1.0) == 3 and p.cost(1.6) == 4 and p.cost(10.0) == 20
    assert p.estimate("x" * 80) == 20                      # 8 s + 2 s at 2 credits/s
    assert p.estimate("x" * 5000) == 1004                  # long text is chunked: audio grows with it
    with pytest.raises(ValueError):
        Pricing(credits_per_second=-1)


def test_rate_limit(accounts):
    _, acc = accounts.create_key(rate_per_min=2)
    accounts.check_rate(acc, now=100.0)
    accounts.check_rate(acc, now=100.0)
    with pytest.raises(RateLimited) as e:
        accounts.check_rate(acc, now=100.0)
    assert e.value.retry_after == pytest.approx(30.0)


def test_reconcile(accounts, account_store):
    """The repair of holds left open: settle COMPLETED jobs (at the hold's recorded price), release FAILED ones and
    old enough missing ones, leave the rest."""
    _, acc = accounts.create_key(credits=100)
    for j in ("done", "failed", "missing", "running", "young", "done-no-metrics", "young-missing"):
        accounts.hold_for(acc, j, "hello world")           # estimate: 3.1 s -> 7 credits
    assert account_store.get(acc.id).held == 49
    jobs = {
        "done": SimpleNamespace(state="COMPLETED", metrics={"audio_seconds": 4.2}, error=None),
        "failed": SimpleNamespace(state="FAILED", metrics={}, error="engine exploded"),
        "running": SimpleNamespace(state="PROCESSING", metrics={}, error=None),
        "young": SimpleNamespace(state="PROCESSING", metrics={}, error=None),
        "done-no-metrics": SimpleNamespace(state="COMPLETED", metrics={}, error=None),
    }
    now = account_store.get_hold("young").created_at
    # everything except "young" and "young-missing" is older than the grace period
    for j in ("done", "failed", "missing", "running", "done-no-metrics"):
        h = account_store.get_hold(j)
        account_store.release(j)
        account_store.hold(acc.id, j, h.amount, now=now - 600, per_second=h.per_second, minimum=h.minimum)
    counts = accounts.reconcile(jobs.get, grace_seconds=60, now=now)
    assert counts == {"settled": 2, "released": 2, "open": 3}
    assert {h.job_id for h in account_store.holds()} == {"running", "young", "young-missing"}
    account_store.release("young-missing")
    a = account_store.get(acc.id)
    assert a.balance == 100 - 9 - 7          # 4.2 s at 2/s -> 9; unknown length -> the hold (7)
    notes = [e.note for e in account_store.ledger(acc.id) if e.kind == "release"]
    assert any("engine exploded" in n for n in notes) and any("missing" in n for n in notes)
    assert "audio length unknown" in [e for e in account_store.ledger(acc.id) if e.job_id == "done-no-metrics"][-1].note
    # settling or releasing what reconcile closed changes nothing
    assert accounts.settle("done", 4.2) is None and accounts.release("failed") is None
    assert accounts.settle("young", 1.0).balance == 100 - 9 - 7 - 3     # 1 s at 2/s -> the minimum, 3
    assert accounts.release("running", "x").held == 0
    assert accounts.release("running", "x") is None
    a = account_store.get(acc.id)
    assert (a.balance, a.held) == (100 - 9 - 7 - 3, 0)
    assert_explainable(account_store, acc.id)


def test_holds_record_their_price_and_settle_job_charges_it(account_store):
    a = new_account(account_store, balance=1000)
    account_store.hold(a.id, "priced", 50, per_second=2.0, minimum=3)
    account_store.hold(a.id, "unpriced", 40)                   # a hold made before prices were recorded
    account_store.hold(a.id, "no-length", 30, per_second=2.0, minimum=3)
    h = account_store.get_hold("priced")
    assert (h.amount, h.per_second, h.minimum) == (50, 2.0, 3)
    assert account_store.get_hold("unpriced").per_second is None and account_store.get_hold("unpriced").minimum is None
    assert [(x.per_second, x.minimum) for x in account_store.holds()] == [(2.0, 3), (None, None), (2.0, 3)]
    assert account_store.settle_job("priced", 4.2).balance == 1000 - 9       # ceil(8.4)
    assert account_store.settle_job("priced", 4.2) is None, "settling twice must charge once"
    assert account_store.settle_job("unpriced", 4.2).balance == 1000 - 9 - 40
    assert account_store.settle_job("no-length", None).balance == 1000 - 9 - 40 - 30
    entries = {e.job_id: e for e in account_store.ledger(a.id) if e.kind == "settle"}
    assert entries["priced"].seconds == pytest.approx(4.2) and entries["priced"].note == ""
    assert "no price recorded" in entries["unpriced"].note and "length unknown" in entries["no-length"].note
    with pytest.raises(ValueError):
        account_store.hold(a.id, "half", 1, per_second=1.0)          # both or neither
    assert account_store.get_hold("half") is None
    assert_explainable(account_store, a.id)


@pytest.mark.parametrize("per_second,minimum,seconds", [
    (0.1, 0, 30.0), (1.0, 1, 3.0000000001), (1.5, 2, 2.2), (2.0, 3, 1.0), (0.0, 0, 9.0), (0.7, 0, 0.0),
    (3.3, 1, 1234.5678), (1.0, 5, 4.999999999),
])
def test_settle_job_charges_as_pricing_cost(account_store, per_second, minimum, seconds):
    """The store's settlement (SQL or Lua) and Pricing.cost are one rule, to the credit."""
    a = new_account(account_store, balance=100_000)
    account_store.hold(a.id, "j", 10, per_second=per_second, minimum=minimum)
    after = account_store.settle_job("j", seconds)
    assert 100_000 - after.balance == Pricing(credits_per_second=per_second, minimum=minimum).cost(seconds)


def test_settle_job_is_capped_like_settle(account_store):
    a = new_account(account_store, balance=10)
    account_store.hold(a.id, "j1", 4, per_second=10.0, minimum=1)
    account_store.hold(a.id, "j2", 5, per_second=10.0, minimum=1)
    s = account_store.settle_job("j1", 5.0)                    # 50 credits, far above what it can pay
    assert (s.balance, s.held) == (5, 5) and "capped" in account_store.ledger(a.id, 1)[0].note
    assert_explainable(account_store, a.id)


def test_cancelled_holds_are_not_failed_jobs(account_store):
    """A hold given back because its job was never queued (queue full) is a "cancel": usage does not count it."""
    a = new_account(account_store, balance=100)
    for i in range(5):
        account_store.hold(a.id, f"rejected-{i}", 7, per_second=1.0, minimum=1)
        assert account_store.cancel(f"rejected-{i}", note="queue full: not queued").held == 0
    assert account_store.cancel("rejected-0") is None and account_store.release("rejected-0") is None
    u = account_store.usage(a.id)
    assert (u.failed, u.completed, u.open_holds, u.credits_spent) == (0, 0, 0, 0)
    assert [e.kind for e in account_store.ledger(a.id)][-2:] == ["hold", "cancel"]
    assert account_store.ledger(a.id, 1)[0].note == "queue full: not queued"
    account_store.hold(a.id, "failed", 7)
    account_store.release("failed")
    assert account_store.usage(a.id).failed == 1                # a real failure still counts
    account_store.hold(a.id, "free", 0, per_second=0.0, minimum=0)  # a zero hold closes too
    assert account_store.cancel("free").held == 0
    account_store.hold(a.id, "free2", 0, per_second=0.0, minimum=0)
    assert account_store.settle_job("free2", 3.0).balance == 100
    assert account_store.get(a.id).balance == 100
    assert_explainable(account_store, a.id)


def test_accounts_record_their_price_and_charge_the_submitters(account_store):
    """The price is the one in force where the job was submitted, not the settling service's."""
    submitter = Accounts(account_store, Pricing(credits_per_second=2.0, minimum=3))
    elsewhere = Accounts(account_store, Pricing(credits_per_second=10.0, minimum=50))
    _, acc = submitter.create_key(credits=100)
    submitter.hold_for(acc, "j1", "hello world")
    submitter.hold_for(acc, "j2", "hello world")
    h = account_store.get_hold("j1")
    assert (h.amount, h.per_second, h.minimum) == (7, 2.0, 3)
    assert elsewhere.settle("j1", 4.2).balance == 100 - 9
    done = SimpleNamespace(state="COMPLETED", metrics={"audio_seconds": 4.2}, error=None)
    assert elsewhere.reconcile(lambda job_id: done)["settled"] == 1
    assert account_store.get(acc.id).balance == 100 - 18
    assert_explainable(account_store, acc.id)


def test_accounts_cancel_hold(accounts, account_store):
    _, acc = accounts.create_key(credits=100)
    for i in range(3):
        accounts.hold_for(acc, f"full-{i}", "hello world")
        assert accounts.cancel_hold(f"full-{i}", "queue full: not queued").available == 100
    assert accounts.cancel_hold("full-0") is None
    assert accounts.summary(account_store.get(acc.id))["usage"]["failed"] == 0
    assert_explainable(account_store, acc.id)


def test_sqlite_holds_table_is_migrated(tmp_path):
    """A database made before prices were recorded: the columns are added at open, its open holds are settled by
    charging the hold, new holds record their price."""
    import sqlite3

    path = tmp_path / "jobs.sqlite3"
    db = sqlite3.connect(path)
    db.executescript("""
        CREATE TABLE accounts (id TEXT PRIMARY KEY, name TEXT NOT NULL, key_hash TEXT NOT NULL UNIQUE,
            key_prefix TEXT NOT NULL, admin INTEGER NOT NULL DEFAULT 0, revoked INTEGER NOT NULL DEFAULT 0,
            rate_per_min INTEGER NOT NULL, balance INTEGER NOT NULL CHECK (balance >= 0),
            held INTEGER NOT NULL DEFAULT 0 CHECK (held >= 0 AND held <= balance), created_at REAL NOT NULL);
        CREATE TABLE account_holds (job_id TEXT PRIMARY KEY, account_id TEXT NOT NULL REFERENCES accounts(id),
            amount INTEGER NOT NULL CHECK (amount >= 0), created_at REAL NOT NULL);
        CREATE TABLE account_ledger (id INTEGER PRIMARY KEY AUTOINCREMENT, account_id TEXT NOT NULL, at REAL NOT NULL,
            kind TEXT NOT NULL, delta INTEGER NOT NULL, hold_delta INTEGER NOT NULL, balance_after INTEGER NOT NULL,
            held_after INTEGER NOT NULL, job_id TEXT, seconds REAL, note TEXT NOT NULL DEFAULT '');
        INSERT INTO accounts VALUES ('acc_old', 'old', 'h-old', 'cbx_', 0, 0, 60, 100, 12, 1.0);
        INSERT INTO account_holds VALUES ('old-job', 'acc_old', 12, 2.0);
        INSERT INTO account_ledger (account_id, at, kind, delta, hold_delta, balance_after, held_after, job_id)
            VALUES ('acc_old', 1.0, 'grant', 100, 0, 100, 0, NULL), ('acc_old', 2.0, 'hold', 0, 12, 100, 12, 'old-job');
    """)
    db.close()
    store = SQLiteAccountStore(path)
    again = SQLiteAccountStore(path)        # a second open finds the columns there
    try:
        assert store.get_hold("old-job").per_second is None
        store.hold("acc_old", "new-job", 5, per_second=1.0, minimum=1)
        assert again.get_hold("new-job").per_second == 1.0
        assert store.settle_job("old-job", 3.0).balance == 100 - 12
        assert store.settle_job("new-job", 3.0).balance == 100 - 12 - 3
        assert_explainable(store, "acc_old")
    finally:
        store.close()
        again.close()


def test_bootstrap_admin(accounts, account_store):
    key = accounts.bootstrap_admin()
    assert key and accounts.authenticate(key, admin=True).balance > 0
    assert accounts.bootstrap_admin() is None


# --- the `keys` command ---------------------------------------------------------------------------------------
def test_keys_cli(tmp_path, capsys):
    from chatterbox_serverless.cli import main

    d = str(tmp_path / "data")
    assert main(["keys", "create", "--data-dir", d, "--name", "app", "--credits", "50", "--rate", "5/min"]) == 0
    key = capsys.readouterr().out.strip()
    assert key.startswith(KEY_PREFIX)
    assert main(["keys", "list", "--data-dir", d]) == 0
    out = capsys.readouterr().out
    assert "app" in out and key not in out
    assert main(["keys", "credits", "--data-dir", d, key, "+25", "--note", "gift"]) == 0
    assert "balance 75" in capsys.readouterr().out
    assert main(["keys", "credits", "--data-dir", d, key, "-100"]) == 1
    assert main(["keys", "credits", "--data-dir", d, key, "-5"]) == 0
    capsys.readouterr()
    assert main(["keys", "list", "--data-dir", d, "--json"]) == 0
    [row] = json.loads(capsys.readouterr().out)
    assert (row["balance"], row["rate_per_min"], row["name"]) == (70, 5, "app")
    assert main(["keys", "show", "--data-dir", d, row["id"]]) == 0
    assert "gift" in capsys.readouterr().out
    assert main(["keys", "revoke", "--data-dir", d, row["id"]]) == 0
    assert main(["keys", "revoke", "--data-dir", d, "acc_missing"]) == 1
    capsys.readouterr()
    store = open_account_store(d)
    try:
        with pytest.raises(AuthError) as e:
            Accounts(store).authenticate(key)
        assert e.value.status == 403
    finally:
        store.close()
    for store in (f"sqlite://{d}/jobs.sqlite3", f"{d}/jobs.sqlite3"):
        assert main(["keys", "list", "--store", store, "--json"]) == 0
        assert json.loads(capsys.readouterr().out)[0]["revoked"] is True
        assert main(["keys", "--store", store, "list", "--json"]) == 0           # before the action too
        assert json.loads(capsys.readouterr().out)[0]["revoked"] is True
    assert main(["keys", "--data-dir", d, "list", "--json"]) == 0
    assert len(json.loads(capsys.readouterr().out)) == 1
    with pytest.raises(SystemExit):
        main(["keys", "create", "--data-dir", d, "--rate", "fast"])


def test_keys_cli_on_redis_with_a_prefix(redis_url, capsys):
    """`keys --store redis://... --redis-prefix P` reaches the accounts `serve --store ... --redis-prefix P` uses."""
    from chatterbox_serverless.testing import redis as redis_server
    from chatterbox_serverless.cli import main

    url = redis_url
    prefix = redis_server.new_prefix()
    try:
        assert main(["keys", "create", "--store", url, "--redis-prefix", prefix, "--credits", "7"]) == 0
        key = capsys.readouterr().out.strip()
        store = open_account_store(url=url, redis_prefix=prefix)
        try:
            assert Accounts(store).authenticate(key).balance == 7
        finally:
            store.close()
        assert main(["keys", "list", "--store", url, "--redis-prefix", prefix + "other:", "--json"]) == 0
        assert json.loads(capsys.readouterr().out) == []
    finally:
        redis_server.delete_prefix(url, prefix)
