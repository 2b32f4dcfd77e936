"""Redis restart: kill -9 the server mid-run and start it again on the same port and
data directory.

With ``appendonly yes`` and ``appendfsync always`` Redis writes and fsyncs the AOF
before it sends any reply, so every reply a client received describes a change that
survives the crash. Clients in other processes ride through the outage on their own
(ScriptRunner retries connection errors with backoff for ``retry_s`` seconds, with
the same request id, and re-loads the scripts the new server has never seen); a
client whose server stays away longer than ``retry_s`` raises ConnectionFailed.
"""

from __future__ import annotations

import re
import time

import pytest

import reliability_procs as procs
from conftest import make_ref
from dataflow_redis import BackpressureConfig, ConnectionFailed, ControlPlane, idset
from dataflow_redis.embedded import RedisServer

pytestmark = pytest.mark.slow


def snapshot(cp: ControlPlane) -> dict:
    r, k = cp.redis, cp.keys
    return {
        "acked": idset.members(r, k.acked),
        "done": idset.members(r, k.tasks_done),
        "counters": {name: int(v) for name, v in r.hgetall(k.counters).items()},
        "durable": r.hgetall(k.durable),
        "config": r.hgetall(k.config),
    }


@pytest.fixture
def aof_server():
    server = RedisServer(appendonly=True, appendfsync="always").start()
    yield server
    server.stop()


def test_kill_9_mid_run_loses_nothing_and_clients_ride_through(aof_server, tmp_path):
    server = aof_server
    cp = ControlPlane.from_url(server.url, "restart-run", retry_s=30)
    cp.configure(max_prompt_attempts=5, reply_ttl_s=600)
    cp.configure_backpressure(BackpressureConfig(max_inflight_prompts_per_worker=16, max_train_lease=32))
    task_ids = set(cp.ingest_prompts([{"task_id": f"t{i:05d}"} for i in range(2000)]))

    base = {"url": server.url, "run_id": cp.run_id, "lease_s": 60.0, "retry_s": 30.0}
    roles = [(procs.rollout_worker, {**base, "worker_id": f"w{i}", "request": 16, "p_retry": 0.02,
                                     "delay_ms": 4, "seed": i, "log_path": str(tmp_path / f"w{i}.log")})
             for i in range(2)]
    roles.append((procs.trainer, {**base, "trainer_id": "tr0", "request": 32, "delay_ms": 4,
                                  "step_from_redis": True, "seed": 9, "log_path": str(tmp_path / "tr0.log")}))
    ctx = procs.forkserver()
    processes = procs.start_roles(ctx, roles)
    try:
        deadline = time.monotonic() + 60
        while int(cp.redis.hget(cp.keys.counters, "samples_acked") or 0) < 300:
            assert time.monotonic() < deadline, "the run made no progress"
            time.sleep(0.02)
        before = snapshot(cp)            # a lower bound: the clients keep writing until the kill
        killed_at = time.time()
        server.kill()                    # SIGKILL: no shutdown, no final save
        time.sleep(1.5)                  # clients are retrying against a dead port
        # Taken before start(): the clients reconnect while start() still waits for its
        # own readiness check, and may finish the whole run before it returns.
        restarted_at = time.time()
        server.start()
        after = snapshot(cp)
        procs.join_all(processes, timeout_s=90)
    finally:
        procs.kill_all(processes)

    # What was there before the crash is still there.
    assert before["acked"] <= after["acked"] and before["done"] <= after["done"]
    assert before["config"] == after["config"]
    for name, value in before["counters"].items():
        assert after["counters"][name] >= value, f"counter {name} went back"
    for name in ("global_step", "durable_global_step"):
        assert int(after["durable"][name]) >= int(before["durable"][name])

    # Every reply a client received before the crash is reflected after it.
    lines = {p.name: list(procs.read_log(p)) for p in tmp_path.glob("*.log")}
    replied = [line for log in lines.values() for line in log if line.get("at", 0) < killed_at]
    committed_before = {t for line in replied if line["op"] == "commit" for t in line["fresh"]}
    acked_before = {s for line in replied if line["op"] == "ack" for s in line["acked"]}
    assert committed_before and acked_before
    assert committed_before <= {f"s-{t}" for t in after["done"]}
    assert acked_before <= after["acked"]
    # The clients went on by themselves: each made calls after the restart and ended well.
    for name, log in lines.items():
        assert any(line.get("at", 0) > restarted_at for line in log), f"{name} did not go on after the restart"
        assert log[-1]["op"] == "exit"

    final = procs.verify_final_state(cp, task_ids)
    assert not final["failed"] and len(final["acked"]) == len(final["done"])
    acks = procs.acked_from_logs(tmp_path.glob("tr*.log"))
    assert len(acks) == len(set(acks)), "an ack was applied twice across the restart"
    assert set(acks) == final["acked"]
    commits = [t for log in lines.values() for line in log if line["op"] == "commit" for t in line["fresh"]]
    assert len(commits) == len(set(commits)) == len(final["done"])
    steps = [line["step"] for line in lines["tr0.log"] if line["op"] == "ack"]
    durable = cp.redis.hgetall(cp.keys.durable)
    assert int(durable["global_step"]) == max(steps)
    assert int(durable["durable_global_step"]) == max(s for s in steps if s % 2 == 0)
    print(f"\nrestart: server killed at {killed_at:.3f} with {len(before['acked'])} samples acked, "
          f"back {restarted_at - killed_at:.1f}s later; run finished with {len(final['acked'])} acked")


def test_client_gives_up_with_a_clear_error_after_retry_s(tmp_path):
    server = RedisServer(appendonly=True, appendfsync="always", password="s3cret-pw").start()
    try:
        cp = ControlPlane.from_url(server.url, "outage", retry_s=1.0)
        cp.configure(max_prompt_attempts=2)
        cp.ingest_prompts([{"task_id": "t0"}])
        worker = cp.rollout_worker("w0")
        server.kill()
        for call in (cp.status, lambda: worker.lease(1), lambda: cp.ingest_prompts([{"task_id": "t1"}])):
            started = time.monotonic()
            with pytest.raises(ConnectionFailed, match=r"Redis unreachable for 1\.\ds .*check that it is running") as info:
                call()
            # It retried with backoff (0.05 s doubling) for retry_s, then gave up.
            assert 1.0 <= time.monotonic() - started <= 1.0 + 10, "gave up before retry_s, or hung"
            assert "s3cret-pw" not in str(info.value)
        server.start()                    # the same client object works again, no operator action
        assert [t.task_id for t in worker.lease(1)] == ["t0"]
        assert cp.settings().max_prompt_attempts == 2
        assert cp.status()["prompts"] == 1, "the ingest that failed must not have been applied"
    finally:
        server.stop()


def test_ack_and_durable_marker_survive_kill_9_exactly(aof_server):
    """No concurrency: state right before the crash equals state after, key by key."""
    from conftest import dump_run

    cp = ControlPlane.from_url(aof_server.url, "exact", retry_s=10)
    cp.configure(max_prompt_attempts=3)
    cp.configure_backpressure(BackpressureConfig(high_watermark_bytes=4096, low_watermark_bytes=1024))
    cp.capacity_reporter("shard-0").report(5000)          # latch paused
    cp.ingest_prompts([{"task_id": f"t{i}"} for i in range(4)])
    cp.capacity_reporter("shard-0").report(100)           # latch resumed
    worker, trainer = cp.rollout_worker("w0"), cp.trainer("tr0")
    tasks = worker.lease(4)
    worker.commit([make_ref(cp, f"s{t.task_id}", t.task_id) for t in tasks[:3]])
    worker.fail([tasks[3].task_id], "bad prompt", retryable=False)
    refs = trainer.lease(3)
    assert trainer.ack([refs[0].sample_id], global_step=7, optimizer_durable=True) == [refs[0].sample_id]
    assert trainer.ack([refs[1].sample_id], global_step=8, optimizer_durable=False) == [refs[1].sample_id]
    before = dump_run(cp)
    aof_server.kill()
    aof_server.start()
    after = dump_run(cp)
    assert after == before
    status = cp.status()
    assert (status["durable_global_step"], status["checkpoint_global_step"]) == (8, 7)
    assert (status["samples_acked"], status["queue_in_flight"], status["prompts_failed"]) == (2, 1, 1)
    assert status["backpressure"]["pause_transitions"] == 1
    # The held lease survived too: the trainer finishes its work after the restart.
    assert trainer.ack([refs[2].sample_id], global_step=9, optimizer_durable=True) == [refs[2].sample_id]


def test_retry_s_counts_from_the_start_of_the_call_even_against_a_hung_server():
    """A server that accepts connections but does not answer (SIGSTOP: a long fork, a
    swapping host) costs each try a socket timeout. The call still gives up once
    retry_s has passed since it began, plus at most the try under way (one socket
    timeout: 5 s by default, 1 s here), and the message says how long it waited."""
    import os
    import signal

    with RedisServer() as server:
        cp = ControlPlane.from_url(server.url, "hung", retry_s=1.0, socket_timeout=1.0)
        cp.ingest_prompts([{"task_id": "t0"}])
        worker, reporter = cp.rollout_worker("w0"), cp.capacity_reporter("shard-0")
        os.kill(server.process.pid, signal.SIGSTOP)
        try:
            for call in (lambda: worker.lease(1), cp.settings, lambda: reporter.report(1)):
                started = time.monotonic()
                with pytest.raises(ConnectionFailed, match=r"Redis unreachable for (\d+\.\d)s") as info:
                    call()
                waited = time.monotonic() - started
                assert 1.0 <= waited <= 1.0 + 1.0 + 0.5, waited   # not two timeouts a try, nor more tries
                said = float(re.search(r"for (\d+\.\d)s", str(info.value)).group(1))
                assert abs(said - waited) < 0.2, (said, waited)
        finally:
            os.kill(server.process.pid, signal.SIGCONT)
        assert [t.task_id for t in worker.lease(1)] == ["t0"]


def test_plain_reads_ride_through_a_short_restart_as_scripts_do():
    """Reads that are not scripts (settings, events, dead letters, the first report's
    sequence lookup, the size check of a large ingest) retry like script calls."""
    import threading

    server = RedisServer(appendonly=True, appendfsync="always").start()
    try:
        cp = ControlPlane.from_url(server.url, "blip", retry_s=10.0)
        cp.configure(max_prompt_attempts=4)
        cp.ingest_prompts([{"task_id": "t0"}])
        reads = {
            "settings": lambda: cp.settings().max_prompt_attempts,
            "events": lambda: len(cp.events()) > 0,
            "dead_letters": cp.dead_letters,
            "is_done": lambda: cp.is_done(["t0"]),
            "first report of a new reporter": lambda: cp.capacity_reporter("shard-9").report(5).accepted,
            "ingest of 1,001 tasks": lambda: len(cp.ingest_prompts([{"task_id": f"b{i}"} for i in range(1001)])),
        }
        expected = {"settings": 4, "events": True, "dead_letters": [], "is_done": [False],
                    "first report of a new reporter": True, "ingest of 1,001 tasks": 1001}
        for name, read in reads.items():
            server.kill()
            restart = threading.Timer(0.5, server.start)
            restart.start()
            try:
                assert read() == expected[name], name
            finally:
                restart.join()
    finally:
        server.stop()


def test_without_aof_a_crash_loses_the_run():
    """The weakest setting: no AOF and no RDB save (``--save ''``). A kill -9 loses
    everything, which is why the docs ask for appendonly yes."""
    server = RedisServer(appendonly=False).start()
    try:
        cp = ControlPlane.from_url(server.url, "volatile", retry_s=10)
        cp.ingest_prompts([{"task_id": "t0"}])
        assert cp.exists()
        server.kill()
        server.start()
        assert not cp.exists()
        assert cp.status()["prompts"] == 0
    finally:
        server.stop()


def test_a_call_that_meets_a_replica_retries_until_the_endpoint_is_writable():
    """READONLY: the URL leads to a replica (a failover demoted the node, or the
    endpoint has not moved yet). Nothing was written; the call reconnects and retries
    within retry_s, applies once the node is a primary, and otherwise fails clearly."""
    import threading

    with RedisServer() as primary, RedisServer() as node:
        replica_of = ["REPLICAOF", "127.0.0.1", str(primary.port)]
        node.client().execute_command(*replica_of)
        impatient = ControlPlane.from_url(node.url, "ro-run", retry_s=0.3)
        with pytest.raises(ConnectionFailed, match="read-only replica for 0.3s"):
            impatient.ingest_prompts([{"task_id": "t0"}])
        assert impatient.status()["prompts"] == 0  # reads work on a replica; nothing was written

        cp = ControlPlane.from_url(node.url, "ro-run", retry_s=10)
        promote = threading.Timer(0.5, lambda: node.client().execute_command("REPLICAOF", "NO", "ONE"))
        promote.start()
        started = time.monotonic()
        assert cp.ingest_prompts([{"task_id": "t0"}]) == ["t0"]
        assert 0.4 <= time.monotonic() - started < 5
        promote.join()
        assert cp.status()["prompts"] == 1 and cp.status()["prompts_pending"] == 1
