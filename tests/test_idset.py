"""The packed id sets (lua/includes/idset.lua) on a real Redis: exact membership through
many bucket splits, repeats, removal, the Python reader agreeing with the Lua writer,
bounded buckets and the memory per id."""

from __future__ import annotations

import random
import re
import string
import uuid

import pytest
import redis

from dataflow_redis import idset
from dataflow_redis.scripts import lua_dir

LOAD = int(re.search(r"^local IDSET_LOAD = (\d+)$", (lua_dir() / "includes" / "idset.lua").read_text(), re.M).group(1))

HARNESS = """
local op, key = ARGV[1], KEYS[1]
local ids = {}
for i = 2, #ARGV do ids[#ids + 1] = ARGV[i] end
if op == 'add' then return idset_add(key, ids) end
if op == 'remove' then return idset_remove(key, ids[1]) end
local flags = idset_has(key, ids)
local out = {}
for i = 1, #flags do out[i] = flags[i] and 1 or 0 end
return out
"""


@pytest.fixture
def idset_ops(redis_url):
    """add / has / remove on one fresh key, through the Lua include itself."""
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    includes = lua_dir() / "includes"
    source = ("local K = {}\n" + (includes / "util.lua").read_text() + (includes / "idset.lua").read_text()
              + HARNESS)
    script = client.register_script(source)
    key = f"test:{{idset-{uuid.uuid4().hex[:8]}}}:set"

    class Ops:
        def add(self, ids):
            return script(keys=[key], args=["add", *ids])

        def has(self, ids):
            return [bool(x) for x in script(keys=[key], args=["has", *ids])] if ids else []

        def remove(self, item_id):
            return script(keys=[key], args=["remove", item_id])

    ops = Ops()
    ops.client, ops.key = client, key
    yield ops
    client.delete(key)
    client.close()


def random_ids(rng, n, length=16):
    alphabet = string.ascii_letters + string.digits + "-_:./"
    return ["".join(rng.choice(alphabet) for _ in range(length)) for _ in range(n)]


def test_membership_is_exact_through_many_splits(idset_ops):
    rng = random.Random(7)
    ids = random_ids(rng, 6000)
    members, absent = ids[:5000], ids[5000:]
    added = 0
    for start in range(0, len(members), 250):
        added += idset_ops.add(members[start:start + 250])
    assert added == 5000
    client, key = idset_ops.client, idset_ops.key
    assert idset.count(client, key) == 5000
    level, split = int(client.hget(key, "l")), int(client.hget(key, "s"))
    buckets = (1 << level) + split
    assert 5000 / buckets <= LOAD < 5000 / (buckets - 1)  # exactly as many splits as the load needs
    assert all(idset_ops.has(members[i:i + 500]) == [True] * 500 for i in range(0, 5000, 500))
    assert idset_ops.has(absent) == [False] * 1000
    # A prefix, a suffix or a neighbour of a member is not a member.
    near = [members[0][:-1], members[1][1:], members[2] + "x", "x" + members[3]]
    assert idset_ops.has(near) == [False] * 4
    # The Python reader finds exactly what the Lua writer put where.
    assert idset.members(client, key) == set(members)
    assert idset.contains(client, key, members[:300] + absent[:300]) == [True] * 300 + [False] * 300
    # No bucket is far above the load (bounded work per lookup).
    sizes = [len(v.split()) for f, v in client.hgetall(key).items() if f.startswith("b")]
    assert len(sizes) <= buckets and max(sizes) < LOAD * 4


def test_repeats_and_members_are_not_added_twice(idset_ops):
    assert idset_ops.add(["a", "b", "a", "c", "b"]) == 3
    assert idset_ops.add(["c", "d"]) == 1
    assert idset.count(idset_ops.client, idset_ops.key) == 4
    assert idset.members(idset_ops.client, idset_ops.key) == {"a", "b", "c", "d"}


def test_remove(idset_ops):
    rng = random.Random(3)
    ids = random_ids(rng, 400, length=8)
    idset_ops.add(ids)
    assert idset_ops.remove(ids[10]) == 1
    assert idset_ops.remove(ids[10]) == 0
    assert idset_ops.remove("never-added") == 0
    assert idset_ops.has([ids[10], ids[11]]) == [False, True]
    assert idset.count(idset_ops.client, idset_ops.key) == 399
    assert idset.members(idset_ops.client, idset_ops.key) == set(ids) - {ids[10]}
    assert idset_ops.add([ids[10]]) == 1
    assert idset_ops.has([ids[10]]) == [True]


def test_empty_set_and_empty_calls(idset_ops):
    assert idset_ops.has(["x"]) == [False]
    assert idset_ops.add([]) == 0
    assert idset.members(idset_ops.client, idset_ops.key) == set()
    assert idset.contains(idset_ops.client, idset_ops.key, ["x"]) == [False]
    assert not idset_ops.client.exists(idset_ops.key)


def test_bytes_per_id(idset_ops):
    """About len(id) + 9 to 11 bytes per id; a Redis set member costs about 60 + len(id)."""
    rng = random.Random(11)
    client, key = idset_ops.client, idset_ops.key
    for length in (16, 32):
        client.delete(key)
        ids = random_ids(rng, 20000, length=length)
        for start in range(0, len(ids), 1000):
            idset_ops.add(ids[start:start + 1000])
        per_id = client.memory_usage(key, samples=0) / len(ids)
        plain = client.register_script("for i = 1, #ARGV do redis.call('SADD', KEYS[1], ARGV[i]) end")
        set_key = key + ":plain"
        for start in range(0, len(ids), 1000):
            plain(keys=[set_key], args=ids[start:start + 1000])
        per_member = client.memory_usage(set_key, samples=0) / len(ids)
        client.delete(set_key)
        print(f"\n{length}-char ids: packed {per_id:.1f} B/id, Redis set {per_member:.1f} B/member")
        assert per_id <= length + 12
        assert per_member - per_id >= 40


def _commit_one_by_one(url: str, run_id: str, count: int) -> None:
    """Writer process: lease and commit ``count`` tasks one at a time (each commit adds
    one id to tasks_done, splitting a bucket every few ids)."""
    from conftest import make_ref
    from dataflow_redis import ControlPlane

    cp = ControlPlane.from_url(url, run_id)
    worker = cp.rollout_worker("writer", lease_s=600)
    for _ in range(count):
        [task] = worker.lease(1)
        worker.commit([make_ref(cp, f"{task.task_id}:0", task.task_id)])


def test_is_done_and_is_acked_are_exact_while_another_process_writes(make_cp, redis_url):
    """cp.is_done reads the set's shape and buckets in one script: a reader in another
    process, asking about tasks done before it started, never sees one missing while a
    writer's commits split buckets (read in two round trips, about one answer in ten
    was wrong)."""
    import multiprocessing

    from conftest import make_ref

    cp = make_cp()
    cp.ingest_prompts([{"task_id": f"t{i:05d}"} for i in range(3200)])
    worker = cp.rollout_worker("first", lease_s=600)
    early = worker.lease(200)
    worker.commit([make_ref(cp, f"{t.task_id}:0", t.task_id) for t in early])
    done = [t.task_id for t in early]
    writer = multiprocessing.get_context("spawn").Process(target=_commit_one_by_one,
                                                          args=(redis_url, cp.run_id, 3000))
    writer.start()
    reads = wrong = 0
    while writer.is_alive() or reads < 20:
        answers = cp.is_done(done)
        reads += 1
        wrong += answers.count(False)
    writer.join()
    assert writer.exitcode == 0
    assert reads >= 20 and wrong == 0
    assert cp.status()["prompts_done"] == 3200
    # More than 1,000 ids go in several calls, in order.
    many = [f"t{i:05d}" for i in range(3200)] + ["never-ingested"]
    assert cp.is_done(many) == [True] * 3200 + [False]
    assert cp.is_acked([f"{i}:0" for i in many[:5]]) == [False] * 5
