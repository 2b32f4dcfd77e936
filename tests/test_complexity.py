"""Every operation costs O(items in the call + log n) (issue point 10).

The same operations run against a small run (1,000 pending tasks, 10 rollout workers
and 10 trainers holding leases, 100 queued samples) and a large one (100,000 pending
tasks, 2,000 workers, 200 trainers, 10,000 queued samples) on a private redis-server.
For each operation the Redis commands it causes (INFO commandstats deltas, which count
the commands a script runs as well as the EVALSHA itself) must be identical, and none
may be a whole-collection read (KEYS, SCAN, LRANGE, HKEYS, ...). Run with ``-s`` to
see the per-operation table with server time.
"""

from __future__ import annotations

import pytest

from conftest import make_ref
from dataflow_redis import BackpressureConfig, ControlPlane
from dataflow_redis.embedded import RedisServer

SMALL = dict(pending=1_000, workers=10, trainers=10, queued=100)
LARGE = dict(pending=100_000, workers=2_000, trainers=200, queued=10_000)

# Commands whose cost grows with the collection they read, whatever their call count.
WHOLE_COLLECTION_READS = {"keys", "scan", "hscan", "sscan", "zscan", "lrange", "hkeys", "hvals",
                          "sort", "lpos", "lrem", "zrange", "zrevrange", "sinter", "sunion", "sdiff",
                          "debug", "dump", "object"}
# status() reads a few small fixed-size hashes whole (counters, durable, bp, config,
# shards: O(shards)) and the stale shard set; nothing else may use these.
SMALL_WHOLE_READS = {"hgetall", "smembers"}


def command_stats(client) -> dict[str, tuple[int, int]]:
    return {name[len("cmdstat_"):]: (s["calls"], s["usec"]) for name, s in client.info("commandstats").items()}


def measure(client, operation) -> tuple[dict[str, int], int]:
    """(commands caused by ``operation`` -> calls, server microseconds spent in EVALSHA)."""
    before = command_stats(client)
    operation()
    after = command_stats(client)
    calls = {name: after[name][0] - before.get(name, (0, 0))[0] for name in after}
    calls["info"] -= 1  # the INFO that took the first snapshot
    usec = after.get("evalsha", (0, 0))[1] - before.get("evalsha", (0, 0))[1]
    return {name: n for name, n in calls.items() if n}, usec


def build_run(url: str, pending: int, workers: int, trainers: int, queued: int) -> ControlPlane:
    cp = ControlPlane.from_url(url, run_id=f"complexity-{pending}")
    cp.configure_backpressure(BackpressureConfig(high_watermark_bytes=10**12, low_watermark_bytes=10**11,
                                                 max_inflight_prompts_per_worker=10_000, max_train_lease=1_000))
    cp.capacity_reporter("shard-0").report(1_000, max_resident_bytes=10**13)
    cp.ingest_prompts([{"task_id": f"task-{i:06d}", "payload": "p"} for i in range(pending + workers + 200)])
    for i in range(workers):
        cp.rollout_worker(worker_id=f"w{i}", lease_s=600).lease(1)
    cp.enqueue_offline_refs([make_ref(cp, f"queued-{i:06d}") for i in range(queued + trainers + 20)])
    for i in range(trainers):
        cp.trainer(trainer_id=f"t{i}", lease_s=600).lease(1)
    # Wake-up tokens count enqueue calls, not the run's size (up to 64 a call, capped at
    # 256, and the large enqueue takes several calls): start both runs without any, or
    # every commit of the large one alone would also trim the capped list (one LTRIM).
    cp.redis.delete(cp.keys.train_signal)
    status = cp.status()
    assert status["prompts_pending"] >= pending and status["rollout_workers"] == workers
    assert status["queue_depth"] >= queued and status["trainers"] == trainers
    return cp


def operation_costs(cp: ControlPlane) -> dict[str, tuple[dict[str, int], int]]:
    """Run each operation twice (the first loads scripts); return the second's cost."""
    client = cp.redis
    costs = {}
    for round_ in ("warm-up", "measured"):
        w = cp.rollout_worker(worker_id=f"probe-w-{round_}", lease_s=600)
        t = cp.trainer(trainer_id=f"probe-t-{round_}", lease_s=600)
        ops = {}
        ops["prompt lease 1"] = lambda: w.lease(1)
        ops["prompt lease 64"] = lambda: w.lease(64)
        ops["heartbeat (65 leases)"] = w.heartbeat
        results = {}
        for name, op in ops.items():
            results[name] = measure(client, op)
        held = w.held
        ref = make_ref(cp, f"sample-{round_}", held[0])
        results["commit 1"] = measure(client, lambda: w.commit([ref]))
        results["prompt fail 1 (retryable)"] = measure(client, lambda: w.fail([held[1]], "x", retryable=True))
        results["ingest 1"] = measure(client, lambda: cp.ingest_prompts([{"task_id": f"new-{round_}"}]))
        results["train lease 1"] = measure(client, lambda: t.lease(1))
        results["train lease 32"] = measure(client, lambda: t.lease(32))
        sample_ids = t.held
        results["ack 1 (durable)"] = measure(
            client, lambda: t.ack(sample_ids[:1], global_step=1, optimizer_durable=True))
        results["ack 8 (not durable)"] = measure(client, lambda: t.ack(sample_ids[1:9], global_step=1))
        results["train fail 1 (retryable)"] = measure(client, lambda: t.fail(sample_ids[9:10], "x", retryable=True))
        results["train heartbeat"] = measure(client, t.heartbeat)
        results["capacity report"] = measure(client, lambda: cp.capacity_reporter("shard-0").report(2_000))
        results["status"] = measure(client, cp.status)
        results["reclaim_expired (none due)"] = measure(client, cp.reclaim_expired)
        costs = results
    return costs


@pytest.fixture(scope="module")
def costs_by_size():
    with RedisServer() as server:
        small = operation_costs(build_run(server.url, **SMALL))
        large = operation_costs(build_run(server.url, **LARGE))
        yield small, large


def test_command_counts_per_operation_do_not_grow_with_the_run(costs_by_size):
    small, large = costs_by_size
    print(f"\n{'operation':30} {'commands':>8} {'evalsha':>7}  server us small -> large")
    for name in small:
        commands_small, usec_small = small[name]
        commands_large, usec_large = large[name]
        print(f"{name:30} {sum(commands_small.values()):8d} {commands_small.get('evalsha', 0):7d}  "
              f"{usec_small:6d} -> {usec_large:6d}")
        assert commands_large == commands_small, f"{name}: {commands_small} -> {commands_large}"
        assert commands_small.get("evalsha", 0) >= 1, f"{name} did not run a script"
        assert commands_small.get("eval", 0) == 0


def test_no_operation_reads_a_whole_collection(costs_by_size):
    small, _ = costs_by_size
    for name, (commands, _) in small.items():
        assert not set(commands) & WHOLE_COLLECTION_READS, f"{name} uses {set(commands) & WHOLE_COLLECTION_READS}"
        if name != "status":
            assert not set(commands) & SMALL_WHOLE_READS, f"{name} reads a whole hash or set"


def test_per_item_cost_is_linear_in_the_items_of_the_call(costs_by_size):
    small, _ = costs_by_size
    one = sum(small["prompt lease 1"][0].values())
    sixty_four = sum(small["prompt lease 64"][0].values())
    per_item = (sixty_four - one) / 63
    # Batched scripts send one command per key for the whole batch: 0 extra commands per task.
    assert 0 <= per_item <= 12, f"a prompt lease costs {per_item:.1f} commands per extra task"
    assert small["prompt lease 64"][0].get("evalsha") == 1, "a batch is one script call"


def test_a_large_batch_into_an_empty_dedup_set_is_placed_once():
    """The packed id set makes room for a whole batch before placing it. Placed by the
    shape of a small set, 1,000 ids would first crowd its only bucket (built id by id:
    the square of its size) and then move again and again as the set split one bucket
    at a time (the first 10,000-id ack of a run held Redis for 1.5 s). Now each bucket
    is written once: one HSET for the whole batch, and no split moves anything."""
    with RedisServer() as server:
        cp = ControlPlane.from_url(server.url, run_id="batch-into-empty")
        n = 1_000  # one ack step (HAND_BACK_CHUNK)
        cp.enqueue_offline_refs([make_ref(cp, f"s{i:05d}") for i in range(n)])
        trainer = cp.trainer(trainer_id="t", lease_s=600)
        leased = trainer.lease(n)
        calls, _ = measure(cp.redis, lambda: trainer.ack([r.sample_id for r in leased]))
        assert calls.get("hset", 0) == 1, calls
        assert cp.is_acked([f"s{i:05d}" for i in range(n)]) == [True] * n
