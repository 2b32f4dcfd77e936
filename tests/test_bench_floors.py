"""The benchmark's floors do the work they stand for (bench_floors.py, issue 6).

A floor bounds what any implementation of the guarantees can reach, so it must run
the real commands on real data: the floor of the cycle moves every task through
ingest, lease, commit, train lease and ack on a real Redis, keeps leases with
tokens and deadlines, honours fencing tokens and leaves exact dedup markers; the
single-item floors run without errors and write what they say.
"""

from __future__ import annotations

import orjson
import pytest

from dataflow_redis.bench import FLOORS, PAYLOAD, _Client
from dataflow_redis.bench_floors import FloorCycle


@pytest.fixture
def floor(cp):
    prefix = cp.keys.prefix + "floor-test:"
    return FloorCycle(cp.redis, prefix, 0, PAYLOAD, {"feature_store_uri": "mem://t", "strategy": "eagle3"}), prefix


def test_floor_cycle_moves_every_task_through_the_five_steps(cp, floor):
    cycle, prefix = floor
    assert [cycle.cycle(16) for _ in range(3)] == [16, 16, 16]
    r = cp.redis
    # Nothing left in flight, every task done and every sample acked, exactly once.
    for key in ("pending", "train_queue"):
        assert r.llen(prefix + key) == 0
    for key in ("leases", "train_leases", "tasks", "samples"):
        assert r.hlen(prefix + key) == 0
    for key in ("deadlines", "train_deadlines"):
        assert r.zcard(prefix + key) == 0
    done, acked = r.smembers(prefix + "tasks_done"), r.smembers(prefix + "acked")
    assert len(done) == 48 and acked == {task_id + ":0" for task_id in done}
    assert r.hget(prefix + "counters", "fence") == str(2 * 48)  # a token per prompt and per train lease
    assert int(r.hget(prefix + "inflight", "floor-w0")) == 0


def test_floor_cycle_leases_carry_tokens_and_deadlines_and_fence_stale_tokens(cp, floor):
    cycle, prefix = floor
    r = cp.redis
    cycle._run("ingest", "ingest", ["req-1", "t1", orjson.dumps(PAYLOAD), "t2", orjson.dumps(PAYLOAD)])
    leased = cycle._run("lease", "lease", ["w", 2, "req-2", 1])
    assert leased[0::3] == ["t1", "t2"] and orjson.loads(leased[2]) == PAYLOAD
    token_1, token_2 = leased[1], leased[4]
    assert token_2 == token_1 + 1
    assert r.hget(prefix + "leases", "t1").startswith(f"{token_1}|0|")
    assert r.zscore(prefix + "deadlines", "t1") > 0
    # A commit under a wrong token is refused; the right one goes through.
    fresh = cycle._run("commit", "commit", ["w", "req-3", "t1", token_1 + 100, "s1", "{}",
                                            "t2", token_2, "s2", "{}"])
    assert fresh == ["s2"]
    assert r.hexists(prefix + "leases", "t1") and not r.hexists(prefix + "leases", "t2")
    assert r.smembers(prefix + "tasks_done") == {"t2"}
    assert r.lrange(prefix + "train_queue", 0, -1) == ["s2"]


def test_single_item_floors_run_and_write(redis_url, run_id):
    client = _Client(redis_url, run_id, 0)
    try:
        for op in FLOORS:
            step = client.step(op)
            for _ in range(3):
                step()
        r, floor = client.cp.redis, client.cp.keys.prefix + "floor:"
        # The lease floor hands out a fresh token per call and records the lease.
        assert int(r.hget(floor + "counters", "fence")) == 4  # 1 at warm-up, then 3
        assert r.hget(floor + "leases", "floor-task-0").startswith("4|0|")
        # The commit floor queues its sample and marks its task done.
        assert r.lrange(floor + "c:train_queue", 0, -1) == ["floor-task-0:0"] * 4
        assert r.smembers(floor + "c:tasks_done") == {"floor-task-0"}
    finally:
        client.cp.delete()
        client.close()
