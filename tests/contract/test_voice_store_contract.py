"""The VoiceStore contract, against every backend (SQLite in the job store's file, Redis beside the job store).

To run it against another backend, add its name to BACKENDS and a branch to `voice_store_factory`."""
from __future__ import annotations

import threading
import time
import uuid

import pytest

from chatterbox_serverless.voices import DuplicateVoiceName, Voice, VoiceLimitReached, VoiceStore

BACKENDS = ["sqlite", "redis"]


@pytest.fixture(params=BACKENDS)
def voice_store_factory(request, tmp_path):
    """Opens connections to ONE fresh backend where the service keeps it (`voice_store_for(job_store)`: the job
    store's SQLite file; its Redis server and prefix). Each call: a new connection to the same data."""
    opened: list = []

    def make() -> VoiceStore:
        if request.param == "sqlite":
            from chatterbox_serverless.voices.sqlite_store import SQLiteVoiceStore
            store = SQLiteVoiceStore(tmp_path / "jobs.sqlite3")
        else:
            from chatterbox_serverless.voices.redis_store import RedisVoiceStore
            store = RedisVoiceStore(request.getfixturevalue("redis_url"),
                                    prefix=request.getfixturevalue("redis_prefix"))
        opened.append(store)
        return store

    yield make
    for store in opened:
        store.close()


@pytest.fixture
def store(voice_store_factory) -> VoiceStore:
    return voice_store_factory()


def new_voice(owner: str = "acc_1", name: str = "narrator", at: float | None = None) -> Voice:
    return Voice(id="voice_" + uuid.uuid4().hex, owner=owner, name=name, created_at=at or time.time(),
                 audio_bytes=5, seconds=1.5, sample_rate=24000, format="wav")


def test_create_get_list_delete(store):
    a = store.create(new_voice(name="a", at=1.0), b"RIFFa", max_per_owner=5, conditionals={"v1": b"\x00c1"})
    b = store.create(new_voice(name="b", at=2.0), b"RIFFb", max_per_owner=5)
    assert store.get(a.id) == a and store.get_by_name("acc_1", "b") == b
    assert [v.id for v in store.list("acc_1")] == [a.id, b.id] and store.count("acc_1") == 2
    assert store.audio(a.id) == b"RIFFa" and store.conditionals(a.id, "v1") == b"\x00c1"
    assert store.conditionals(a.id, "v2") is None and store.conditionals(b.id, "v1") is None
    assert store.delete("acc_1", a.id) is True
    assert store.get(a.id) is None and store.audio(a.id) is None and store.conditionals(a.id, "v1") is None
    assert store.get_by_name("acc_1", "a") is None and store.count("acc_1") == 1
    assert store.delete("acc_1", a.id) is False


def test_voices_are_per_owner(store):
    mine = store.create(new_voice("acc_1", "same"), b"x", max_per_owner=1)
    theirs = store.create(new_voice("acc_2", "same"), b"y", max_per_owner=1)     # a name is unique per owner
    assert store.get_by_name("acc_1", "same") == mine and store.get_by_name("acc_2", "same") == theirs
    assert store.list("acc_2") == [theirs] and store.list("nobody") == []
    assert store.delete("acc_2", mine.id) is False and store.get(mine.id) == mine   # not another owner's
    assert store.get_by_name("", "same") is None


def test_names_are_unique_and_the_count_is_bounded(store):
    store.create(new_voice(name="n1"), b"x", max_per_owner=2)
    with pytest.raises(DuplicateVoiceName):
        store.create(new_voice(name="n1"), b"x", max_per_owner=2)
    store.create(new_voice(name="n2"), b"x", max_per_owner=2)
    with pytest.raises(VoiceLimitReached):
        store.create(new_voice(name="n3"), b"x", max_per_owner=2)
    assert store.count("acc_1") == 2 and store.get_by_name("acc_1", "n3") is None


def test_the_limit_holds_under_concurrent_creation(voice_store_factory):
    stores = [voice_store_factory() for _ in range(4)]
    outcomes: list[str] = []

    def create(i: int) -> None:
        try:
            stores[i % 4].create(new_voice(name=f"c{i}"), b"x", max_per_owner=3)
            outcomes.append("ok")
        except VoiceLimitReached:
            outcomes.append("limit")

    threads = [threading.Thread(target=create, args=(i,)) for i in range(12)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert outcomes.count("ok") == 3 and stores[0].count("acc_1") == 3


def test_conditionals_kept_per_variant_first_write_stays(store):
    v = store.create(new_voice(), b"clip", max_per_owner=5)
    assert store.put_conditionals(v.id, "chatterbox:aa", b"first") is True
    assert store.put_conditionals(v.id, "chatterbox:aa", b"second") is True
    assert store.put_conditionals(v.id, "turbo:bb", b"other") is True
    assert store.conditionals(v.id, "chatterbox:aa") == b"first" and store.conditionals(v.id, "turbo:bb") == b"other"
    store.delete("acc_1", v.id)
    assert store.put_conditionals(v.id, "chatterbox:aa", b"late") is False     # a deleted voice stays deleted
    assert store.conditionals(v.id, "chatterbox:aa") is None


def test_durable_across_connections(voice_store_factory):
    first = voice_store_factory()
    v = first.create(new_voice(), bytes(range(256)) * 100, max_per_owner=5, conditionals={"v": bytes(1000)})
    first.close()
    second = voice_store_factory()
    assert second.get(v.id) == v and second.audio(v.id) == bytes(range(256)) * 100
    assert second.conditionals(v.id, "v") == bytes(1000)
