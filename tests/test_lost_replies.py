"""Lost replies: a call that Redis executed but whose reply never reached the client
is retried safely.

Every mutating call carries a request id; its script caches the reply under
``reply:<id>`` in the same atomic step as the change. When the connection drops
before the reply arrives, the client re-sends the call with the same id (at once,
then with backoff, for up to retry_s) and the script answers from the cache instead
of applying again. The operator, recovery and capacity calls answer a retry with
what their first try did (a cached reply, or for a capacity report the repeat of
the report last accepted).

The tests put tests/tcp_proxy.py between the client and a real redis-server: it
lets a chosen request through, throws its reply away and cuts the connection, one
to three times in a row. Then they prove from Redis that the call applied once.
"""

from __future__ import annotations

import hashlib
from urllib.parse import urlsplit, urlunsplit

import pytest

from conftest import make_ref
from dataflow_redis import ControlPlane, idset
from dataflow_redis.scripts import load_scripts
from tcp_proxy import ReplyDroppingProxy


@pytest.fixture
def proxied(make_cp, redis_url):
    """(direct ControlPlane, ControlPlane through the reply-dropping proxy, proxy) on one run."""
    direct = make_cp()
    parts = urlsplit(redis_url)
    proxy = ReplyDroppingProxy(parts.hostname, parts.port).start()
    netloc = parts.netloc.rsplit("@", 1)
    netloc = (netloc[0] + "@" if len(netloc) == 2 else "") + f"127.0.0.1:{proxy.port}"
    via_proxy = ControlPlane.from_url(urlunsplit(parts._replace(netloc=netloc)), direct.run_id, retry_s=10)
    # Load every script now, so a dropped reply is never a NOSCRIPT answer.
    for script in load_scripts().values():
        direct.redis.script_load(script.source)
    yield direct, via_proxy, proxy
    via_proxy.redis.close()
    proxy.stop()


def counters(cp) -> dict[str, int]:
    return {k: int(v) for k, v in cp.redis.hgetall(cp.keys.counters).items()}


@pytest.mark.parametrize("drops", [1, 2, 3])
def test_lost_lease_reply_returns_the_same_grant(proxied, drops):
    direct, cp, proxy = proxied
    direct.ingest_prompts([{"task_id": f"t{i}"} for i in range(10)])
    worker = cp.rollout_worker("w-lost", lease_s=60)
    proxy.drop_replies(b"w-lost", times=drops)
    tasks = worker.lease(4)
    assert proxy.dropped == drops
    assert [t.task_id for t in tasks] == ["t0", "t1", "t2", "t3"]
    leases = {row["id"]: row for row in direct.leases("prompt")}
    assert set(leases) == {"t0", "t1", "t2", "t3"}, "a retried lease granted more tasks"
    assert {t: str(row["token"]) for t, row in leases.items()} == worker._tokens
    assert all(row["holder"] == "w-lost" for row in leases.values())
    assert direct.worker_inflight() == {"w-lost": 4}
    assert counters(direct)["fence"] == 4, "a grant was made twice"
    assert direct.redis.lrange(direct.keys.pending, 0, -1) == [f"t{i}" for i in range(4, 10)]


def test_retried_lease_with_explicit_request_id_grants_once(proxied):
    direct, cp, _ = proxied
    direct.ingest_prompts([{"task_id": f"t{i}"} for i in range(6)])
    worker = cp.rollout_worker("w0", lease_s=60)
    first = worker.lease(3, request_id="lease-req-1")
    again = worker.lease(3, request_id="lease-req-1")
    assert first == again and [t.task_id for t in first] == ["t0", "t1", "t2"]
    assert counters(direct)["fence"] == 3 and direct.worker_inflight() == {"w0": 3}
    assert direct.status()["prompts_pending"] == 3
    # Once part of the grant is handed in, a replay returns only what is still held.
    worker.commit([make_ref(direct, "s-t0", "t0")])
    assert [t.task_id for t in worker.lease(3, request_id="lease-req-1")] == ["t1", "t2"]
    assert direct.worker_inflight() == {"w0": 2}


@pytest.mark.parametrize("drops", [1, 3])
def test_lost_commit_reply_enqueues_once(proxied, drops):
    direct, cp, proxy = proxied
    direct.ingest_prompts([{"task_id": f"t{i}"} for i in range(4)])
    worker = cp.rollout_worker("w-lost", lease_s=60)
    tasks = worker.lease(4)
    proxy.drop_replies(b"w-lost", times=drops)
    fresh = worker.commit([make_ref(direct, f"s-{t.task_id}", t.task_id) for t in tasks])
    assert proxy.dropped == drops
    assert fresh == ["s-t0", "s-t1", "s-t2", "s-t3"], "the retry must report the first reply"
    c = counters(direct)
    assert c["samples_committed"] == 4 and c["prompts_done"] == 4
    assert c.get("fenced_commits", 0) == 0, "the retry was applied again (and fenced)"
    assert direct.redis.lrange(direct.keys.train_queue, 0, -1) == fresh
    assert direct.worker_inflight() == {} and direct.status()["prompts_leased"] == 0


@pytest.mark.parametrize("drops", [1, 3])
def test_lost_ack_reply_acks_once(proxied, drops):
    direct, cp, proxy = proxied
    direct.enqueue_offline_refs([make_ref(direct, f"s{i}") for i in range(4)])
    trainer = cp.trainer("tr-lost", lease_s=60)
    proxy.drop_replies(b"tr-lost", times=drops)
    refs = trainer.lease(4)                     # a lost train lease reply, too
    assert [r.sample_id for r in refs] == ["s0", "s1", "s2", "s3"]
    assert counters(direct)["fence"] == 4 and direct.status()["queue_in_flight"] == 4
    proxy.drop_replies(b"tr-lost", times=drops)
    acked = trainer.ack(["s0", "s1", "s2", "s3"], global_step=5, optimizer_durable=True)
    assert proxy.dropped == 2 * drops
    assert acked == ["s0", "s1", "s2", "s3"]
    assert counters(direct)["samples_acked"] == 4
    assert direct.redis.xlen(direct.keys.ack_log) == 1, "the ack script ran more than once"
    assert idset.members(direct.redis, direct.keys.acked) == {"s0", "s1", "s2", "s3"}
    assert direct.status()["checkpoint_global_step"] == 5


def test_lost_fail_reply_counts_one_attempt(proxied):
    direct, cp, proxy = proxied
    direct.configure(max_prompt_attempts=2)
    direct.ingest_prompts([{"task_id": "t0"}])
    worker = cp.rollout_worker("w-lost", lease_s=60)
    worker.lease(1)
    proxy.drop_replies(b"w-lost", times=2)
    assert worker.fail(["t0"], "oom", retryable=True) == ["t0"]
    assert proxy.dropped == 2
    # Applied twice, the second attempt would have dead-lettered it (2 of 2 attempts).
    assert direct.redis.hget(direct.keys.task_attempts, "t0") == "1"
    assert direct.redis.lrange(direct.keys.pending, 0, -1) == ["t0"]
    assert direct.dead_letters() == []


def test_lost_ingest_reply_adds_each_task_once(proxied):
    direct, cp, proxy = proxied
    proxy.drop_replies(b"ingest-marker", times=2)
    fresh = cp.ingest_prompts([{"task_id": "ingest-marker"}, {"task_id": "t1"}])
    assert proxy.dropped == 2
    assert fresh == ["ingest-marker", "t1"]
    assert direct.redis.lrange(direct.keys.pending, 0, -1) == ["ingest-marker", "t1"]
    assert counters(direct)["prompts"] == 2


def test_lost_offline_enqueue_reply_enqueues_once(proxied):
    direct, cp, proxy = proxied
    proxy.drop_replies(b"offline-marker", times=1)
    assert cp.enqueue_offline_refs([make_ref(direct, "offline-marker")]) == ["offline-marker"]
    assert proxy.dropped == 1
    assert direct.redis.lrange(direct.keys.train_queue, 0, -1) == ["offline-marker"]
    assert counters(direct)["samples_committed"] == 1


def test_lost_reply_of_a_commit_that_accepted_nothing_counts_nothing_twice(proxied):
    """A commit of a duplicate still releases its lease, and returns nothing. Its empty
    reply is cached like any other: a retry must not find the lease gone and count
    the ref as fenced."""
    direct, cp, proxy = proxied
    direct.ingest_prompts([{"task_id": "t0"}, {"task_id": "t1"}])
    worker = cp.rollout_worker("w-dup", lease_s=60)
    worker.lease(2)
    assert worker.commit([make_ref(direct, "dup-sample", "t0")]) == ["dup-sample"]
    proxy.drop_replies(b"w-dup", times=1)
    assert worker.commit([make_ref(direct, "dup-sample", "t1")]) == []   # a duplicate sample id
    assert proxy.dropped == 1
    assert counters(direct).get("fenced_commits", 0) == 0
    assert direct.worker_inflight() == {} and direct.status()["prompts_done"] == 2


def test_lost_reply_of_an_ack_that_acked_nothing_is_not_run_again(proxied):
    """An ack of ids no longer held acks nothing but still records its step and
    checkpoint. Its reply is cached: the retry must not run again (against a marker
    another trainer may have moved meanwhile, it would checkpoint that trainer's step)."""
    direct, cp, proxy = proxied
    direct.enqueue_offline_refs([make_ref(direct, f"s{i}") for i in range(3)])
    direct.trainer("other", lease_s=60).lease(3)
    stale = cp.trainer("stale-tr", lease_s=60)
    proxy.drop_replies(b"stale-tr", times=1)
    assert stale.ack(["s0"], global_step=5, optimizer_durable=True) == []   # s0 is not its lease
    assert proxy.dropped == 1
    status = direct.status()
    assert (status["durable_global_step"], status["checkpoint_global_step"]) == (5, 5)
    log = [fields for _, fields in direct.redis.xrange(direct.keys.ack_log)]
    assert len(log) == 1, "the retry ran the ack again"


def _sha(name: str) -> bytes:
    return hashlib.sha1(load_scripts()[name].source.encode()).hexdigest().encode()


def test_lost_replies_of_operator_recovery_and_capacity_calls_report_the_first_try(proxied):
    """A retry must not report "nothing to do" for what its first try did: pause would
    say "already paused", requeue_undurable "nothing to replay" (and requeue a later
    ack too), a capacity report "ignored"."""
    direct, cp, proxy = proxied
    direct.ingest_prompts([{"task_id": f"t{i}"} for i in range(4)])
    worker, trainer = direct.rollout_worker("w0"), direct.trainer("tr0")
    tasks = worker.lease(4)
    worker.fail([tasks[3].task_id], "bad prompt", retryable=False)
    worker.commit([make_ref(direct, f"s{i}", t.task_id) for i, t in enumerate(tasks[:3])])
    trainer.ack([r.sample_id for r in trainer.lease(3)], global_step=5, optimizer_durable=False)

    def dropped_once(name, call):
        before = proxy.dropped
        proxy.drop_replies(_sha(name), times=1)
        result = call()
        assert proxy.dropped == before + 1, name
        return result

    events = lambda: [e["type"] for e in direct.events()]  # noqa: E731
    assert dropped_once("set_operator_pause", lambda: cp.pause("maintenance")) is True
    assert dropped_once("set_operator_pause", lambda: cp.resume("done")) is True
    assert events().count("operator_pause") == 1 and events().count("operator_resume") == 1
    version = direct.status()["config_version"]
    assert dropped_once("configure", lambda: cp.configure(max_prompt_attempts=5)) == version + 1
    assert direct.status()["config_version"] == version + 1 and events().count("config") == 1
    assert dropped_once("requeue_dead_letter", lambda: cp.requeue_dead_letters([tasks[3].task_id])) == [
        tasks[3].task_id]
    assert direct.dead_letters() == [] and events().count("dlq_requeue") == 1
    assert dropped_once("requeue_undurable", cp.requeue_undurable) == 3
    assert direct.status()["queue_depth"] == 3 and direct.status()["samples_acked"] == 0
    reporter = cp.capacity_reporter("shard-0")
    report = dropped_once("report_capacity", lambda: reporter.report(5000))
    assert report.accepted is True and report.run_resident_bytes == 5000
    assert reporter.report(6000).accepted is True           # the sequence goes on from there
    assert dropped_once("deregister_shard", reporter.deregister) is True
    assert direct.redis.hget(direct.keys.bp, "resident_bytes") == "0"
    assert events().count("shard_deregistered") == 1


def test_connections_cut_between_calls_are_reopened(proxied):
    """Not a lost reply: the proxy closes every idle connection; the next call
    reconnects by itself and the run goes on."""
    direct, cp, proxy = proxied
    cp.ingest_prompts([{"task_id": "t0"}])
    worker, trainer = cp.rollout_worker("w0"), cp.trainer("tr0")
    [task] = worker.lease(1)
    proxy.cut_all()
    assert worker.commit([make_ref(direct, "s0", task.task_id)]) == ["s0"]
    proxy.cut_all()
    assert [r.sample_id for r in trainer.lease(1)] == ["s0"]
    proxy.cut_all()
    assert trainer.ack(["s0"]) == ["s0"]
    assert proxy.connections >= 4 and proxy.dropped == 0
    assert direct.status()["samples_acked"] == 1


def test_a_call_refused_as_busy_waits_for_the_other_script_then_applies_once():
    """BUSY (another client's script runs past busy-reply-threshold) means Redis did not
    run the call: the client backs off and tries again within retry_s, and gives up
    with a clear error after it."""
    import threading
    import time

    from dataflow_redis import ConnectionFailed
    from dataflow_redis.embedded import RedisServer

    slow_script = ("local stop = tonumber(redis.call('TIME')[1]) + tonumber(ARGV[1]) "
                   "while tonumber(redis.call('TIME')[1]) < stop do end return 1")
    with RedisServer(extra_args=["--busy-reply-threshold", "50"]) as server:
        cp = ControlPlane.from_url(server.url, "busy-run", retry_s=10)
        impatient = ControlPlane.from_url(server.url, "busy-run", retry_s=0.3)
        for script in load_scripts().values():
            cp.redis.script_load(script.source)

        def busy(seconds):
            blocker = server.client()
            thread = threading.Thread(target=lambda: blocker.eval(slow_script, 0, seconds))
            thread.start()
            time.sleep(0.2)  # well past the threshold: every other call now gets BUSY
            return thread

        thread = busy(2)
        assert cp.ingest_prompts([{"task_id": "t0"}]) == ["t0"]
        thread.join()
        assert cp.status()["prompts_pending"] == 1

        thread = busy(2)
        with pytest.raises(ConnectionFailed, match="busy running another client's script for 0.3s"):
            impatient.ingest_prompts([{"task_id": "t1"}])
        thread.join()
        assert cp.status()["prompts_pending"] == 1
