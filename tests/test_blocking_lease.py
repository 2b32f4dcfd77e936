"""A trainer waiting for work blocks in Redis, not in a polling loop (issue point 7).

``t.lease(n, timeout_s=T)`` on an empty queue waits; a commit from another OS process
wakes it promptly (the median wake latency is printed: run with ``-s`` to see it); a
wait with no commits costs O(1) Redis commands, counted with INFO commandstats on a
private redis-server that nothing else uses.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import make_ref
from dataflow_redis import ControlPlane
from dataflow_redis.embedded import RedisServer

REPO = Path(__file__).resolve().parents[1]
TRIALS = 20

# The committer: a separate OS process with its own rollout worker. For each line n on
# stdin it ingests and leases task t<n>, waits until a client is blocked in Redis (the
# trainer in BLPOP), then commits sample s<n> and prints when the commit started
# (CLOCK_MONOTONIC is system-wide, so the parent can compare it with its own).
COMMITTER = r"""
import json, sys, time
import redis
from dataflow_redis import ControlPlane, FeatureSpec, SampleRef
url, run_id = sys.argv[1], sys.argv[2]
cp = ControlPlane.from_url(url, run_id=run_id)
probe = redis.Redis.from_url(url)
worker = cp.rollout_worker(worker_id="committer", lease_s=60)
print("ready", flush=True)
for line in sys.stdin:
    n = int(line)
    cp.ingest_prompts([{"task_id": f"t{n}"}])
    (task,) = worker.lease(1)
    give_up = time.monotonic() + 10
    while probe.info("clients")["blocked_clients"] < 1 and time.monotonic() < give_up:
        time.sleep(0.001)
    ref = SampleRef(sample_id=f"s{n}", run_id=run_id, source_task_id=task.task_id,
                    feature_store_uri="mem://x", feature_keys=(f"s{n}/h",),
                    feature_specs=(FeatureSpec("h", (1,), "bfloat16"),), strategy="eagle3")
    started = time.monotonic()
    fresh = worker.commit([ref])
    print(json.dumps({"n": n, "started": started, "fresh": fresh}), flush=True)
"""

# A trainer in its own process: blocks in lease(1, timeout_s) and prints what it got.
WAITER = r"""
import json, sys, time
from dataflow_redis import ControlPlane
url, run_id, timeout_s = sys.argv[1], sys.argv[2], float(sys.argv[3])
t = ControlPlane.from_url(url, run_id=run_id).trainer(lease_s=60)
print("ready", flush=True)
refs = t.lease(1, timeout_s=timeout_s)
print(json.dumps({"got": [r.sample_id for r in refs], "at": time.monotonic()}), flush=True)
"""


@pytest.fixture(scope="module")
def server():
    """A private redis-server: blocked_clients and commandstats then see only this test."""
    with RedisServer() as private:
        yield private


@pytest.fixture
def cp(server):
    plane = ControlPlane.from_url(server.url, run_id=f"blocking-{time.monotonic_ns()}")
    yield plane
    plane.delete()
    plane.redis.close()


def spawn(code: str, *args: str) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", code, *args], cwd=REPO, stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True, bufsize=1)
    assert proc.stdout.readline().strip() == "ready"
    return proc


def command_calls(client) -> dict[str, int]:
    return {name[len("cmdstat_"):]: stats["calls"] for name, stats in client.info("commandstats").items()}


def test_a_commit_from_another_process_wakes_a_waiting_trainer_promptly(cp, server):
    committer = spawn(COMMITTER, server.url, cp.run_id)
    try:
        trainer = cp.trainer(lease_s=60)
        latencies_ms = []
        for n in range(TRIALS):
            committer.stdin.write(f"{n}\n")
            committer.stdin.flush()
            refs = trainer.lease(1, timeout_s=5.0)
            woke = time.monotonic()
            report = json.loads(committer.stdout.readline())
            assert report["fresh"] == [f"s{n}"]
            assert [r.sample_id for r in refs] == [f"s{n}"], "the waiting trainer must get the committed sample"
            latencies_ms.append((woke - report["started"]) * 1000)
            trainer.ack([f"s{n}"])
        median = statistics.median(latencies_ms)
        print(f"\nwake latency, commit started -> waiting lease returned, {TRIALS} trials: "
              f"median {median:.2f} ms, min {min(latencies_ms):.2f} ms, max {max(latencies_ms):.2f} ms")
        # A hang guard only: the machine is shared, so no speed is asserted.
        assert max(latencies_ms) < 1000
    finally:
        committer.stdin.close()
        committer.wait(timeout=10)


def test_waiting_without_commits_costs_a_constant_number_of_commands(cp, server):
    observer = server.client()
    trainer = cp.trainer(lease_s=60)
    trainer.lease(1)  # loads the script, so the count below has no NOSCRIPT retry
    counts = {}
    for wait_s in (0.5, 2.0):
        before = command_calls(observer)
        started = time.monotonic()
        assert trainer.lease(1, timeout_s=wait_s) == []
        waited = time.monotonic() - started
        after = command_calls(observer)
        delta = {name: after.get(name, 0) - before.get(name, 0) for name in after}
        delta["info"] -= 1  # the observer's own INFO
        delta = {name: n for name, n in delta.items() if n}
        assert waited >= wait_s * 0.9, "the lease returned before its timeout with nothing to lease"
        assert waited < wait_s + 2.0, "hang guard"
        counts[wait_s] = delta
        print(f"\ncommands during a {wait_s:.1f} s empty wait: client-issued "
              f"evalsha={delta.get('evalsha', 0)} blpop={delta.get('blpop', 0)}; "
              f"all commands incl. inside scripts: {sum(delta.values())} {dict(sorted(delta.items()))}")
    for wait_s, delta in counts.items():
        assert delta.get("evalsha", 0) == 2, delta  # one lease before blocking, one final
        assert delta.get("blpop", 0) == 1, delta
    # Four times longer wait, same cost: no polling.
    assert sum(counts[2.0].values()) == sum(counts[0.5].values())
    observer.close()


def test_an_empty_wait_counts_starvation_once_and_leaves_no_stale_wakeups(cp):
    trainer = cp.trainer()
    assert trainer.lease(2, timeout_s=0.2) == []
    assert cp.redis.hget(cp.keys.bp, "trainer_starved") == "1"
    assert cp.redis.llen(cp.keys.train_signal) == 0
    # A commit leaves a wake-up token, so a trainer that blocks right after a commit
    # it did not see (between its empty lease and its BLPOP) wakes at once.
    cp.enqueue_offline_refs([make_ref(cp, "s0")])
    assert cp.redis.llen(cp.keys.train_signal) >= 1
    assert cp.redis.blpop([cp.keys.train_signal], timeout=1) is not None


def test_several_waiting_trainer_processes_are_each_woken(cp, server):
    waiters = [spawn(WAITER, server.url, cp.run_id, "20") for _ in range(3)]
    try:
        give_up = time.monotonic() + 10
        while server.client().info("clients")["blocked_clients"] < 3:
            assert time.monotonic() < give_up, "the trainers never blocked"
            time.sleep(0.005)
        committed = time.monotonic()
        cp.enqueue_offline_refs([make_ref(cp, f"s{i}") for i in range(3)])
        results = [json.loads(w.stdout.readline()) for w in waiters]
        assert sorted(s for r in results for s in r["got"]) == ["s0", "s1", "s2"]
        woke_ms = [(r["at"] - committed) * 1000 for r in results]
        print(f"\nthree blocked trainer processes woken by one commit of 3 refs after {sorted(woke_ms)} ms")
        assert max(woke_ms) < 5000  # hang guard (they would otherwise wait 20 s)
    finally:
        for w in waiters:
            w.stdin.close()
            w.wait(timeout=30)


def test_a_retryable_fail_wakes_a_waiting_trainer(cp, server):
    cp.enqueue_offline_refs([make_ref(cp, "s0")])
    holder = cp.trainer()
    holder.lease(1)
    waiter = spawn(WAITER, server.url, cp.run_id, "20")
    try:
        give_up = time.monotonic() + 10
        while server.client().info("clients")["blocked_clients"] < 1:
            assert time.monotonic() < give_up
            time.sleep(0.005)
        started = time.monotonic()
        assert holder.fail(["s0"], "transient", retryable=True) == ["s0"]
        result = json.loads(waiter.stdout.readline())
        assert result["got"] == ["s0"]
        assert result["at"] - started < 5  # hang guard
    finally:
        waiter.stdin.close()
        waiter.wait(timeout=30)


def test_a_full_lease_passes_a_wake_up_on_so_a_burst_reaches_every_waiting_trainer(cp):
    """A commit wakes at most 64 trainers; each one whose lease comes back full leaves
    a token for the next when none is left, and only then (no piling up)."""
    cp.enqueue_offline_refs([make_ref(cp, f"s{i}") for i in range(5)])
    cp.redis.delete(cp.keys.train_signal)          # the commit's tokens were taken
    a, b, c = (cp.trainer(trainer_id=name) for name in "abc")
    assert len(a.lease(2)) == 2 and cp.redis.llen(cp.keys.train_signal) == 1   # full: the baton
    assert len(b.lease(2)) == 2 and cp.redis.llen(cp.keys.train_signal) == 1   # one is enough
    cp.redis.delete(cp.keys.train_signal)
    assert len(c.lease(2)) == 1 and cp.redis.llen(cp.keys.train_signal) == 0   # not full: queue empty
    assert c.lease(2) == [] and cp.redis.llen(cp.keys.train_signal) == 0


def test_a_wait_never_outlives_the_socket_timeout(server):
    """redis-py 8 applies a 5 s socket timeout that a client's settings do not show: a
    longer BLPOP was dropped and sent again, doubling the wait. Trainers on such a
    client wait in 4 s slices; connect() sets the timeout, and slices follow it."""
    import redis as redis_py
    from redis.backoff import NoBackoff
    from redis.retry import Retry

    # No socket_timeout in the settings (redis-py's default applies), one retry, as
    # connect() made clients before it set the timeout.
    client = redis_py.Redis.from_url(server.url, decode_responses=True, retry=Retry(NoBackoff(), 1))
    plane = ControlPlane(client, run_id=f"slice-{time.monotonic_ns()}")
    trainer = plane.trainer()
    assert trainer._block_slice_s == 4.0
    assert ControlPlane.from_url(server.url, "x").trainer()._block_slice_s == 4.0
    assert ControlPlane.from_url(server.url, "x", socket_timeout=2.0).trainer()._block_slice_s == 1.6
    started = time.monotonic()
    assert trainer.lease(1, timeout_s=6.0) == []
    assert 5.9 <= time.monotonic() - started < 7.5, "a 6 s wait must take about 6 s (it took 10 s before)"
    plane.delete()


def test_wake_up_tokens_stay_capped_while_nobody_waits(cp):
    # Commits with no trainer around push tokens; they stop at 256, however many commits.
    worker = cp.rollout_worker("w-cap")
    cp.ingest_prompts([{"task_id": f"t{i}"} for i in range(300)])
    for start in range(0, 300, 30):
        tasks = worker.lease(30)
        worker.commit([make_ref(cp, f"s-{t.task_id}", t.task_id) for t in tasks])
        assert cp.redis.llen(cp.keys.train_signal) == min(256, start + 30)
    assert cp.status()["queue_depth"] == 300


def test_an_error_reply_to_the_wait_is_retried_if_transient_else_reported(cp, monkeypatch):
    # BUSY (another client's script is running), UNBLOCKED and READONLY (a failover
    # demoted the node) only delay the wait; an error no retry can mend (an ACL
    # without BLPOP) surfaces as the library's error at once.
    import redis

    from dataflow_redis import AuthenticationFailed

    replies = iter([redis.ResponseError("BUSY Redis is busy running a script."),
                    redis.ResponseError("UNBLOCKED force unblock from blocking operation, instance state "
                                        "changed (master -> replica?)"),
                    redis.exceptions.ReadOnlyError("You can't write against a read only replica."), None])
    real_blpop = cp.redis.blpop

    def blpop(keys, timeout=0):
        reply = next(replies, None)
        if isinstance(reply, Exception):
            raise reply
        return real_blpop(keys, timeout=min(timeout, 0.05))

    monkeypatch.setattr(cp.redis, "blpop", blpop)
    trainer = cp.trainer("tr-busy")
    started = time.monotonic()
    assert trainer.lease(1, timeout_s=0.3) == []
    assert 0.3 <= time.monotonic() - started < 2
    cp.enqueue_offline_refs([make_ref(cp, "s-busy")])
    assert [r.sample_id for r in trainer.lease(1, timeout_s=0.3)] == ["s-busy"]

    def no_permission(keys, timeout=0):
        raise redis.exceptions.NoPermissionError("this user has no permissions to run the 'blpop' command")

    monkeypatch.setattr(cp.redis, "blpop", no_permission)
    with pytest.raises(AuthenticationFailed, match="blpop"):
        trainer.lease(1, timeout_s=0.3)
