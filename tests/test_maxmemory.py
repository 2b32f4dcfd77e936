"""A Redis at its maxmemory (policy noeviction) refuses writes that add data. Then
producers get a clear OutOfMemory error and change nothing, while trainers keep
draining: heartbeats, train leases and acks go through, and acks free the memory
that lets producers go on."""

from __future__ import annotations

import pytest

from conftest import make_ref
from dataflow_redis import ControlPlane, OutOfMemory
from dataflow_redis.embedded import RedisServer

MAXMEMORY = 4 << 20


@pytest.fixture
def full():
    """A run with 60 committed samples on a Redis filled to its maxmemory."""
    with RedisServer(extra_args=["--maxmemory", str(MAXMEMORY), "--maxmemory-policy", "noeviction"]) as server:
        cp = ControlPlane.from_url(server.url, "full-run")
        cp.ingest_prompts([{"task_id": f"t{i}"} for i in range(60)])
        worker = cp.rollout_worker("w")
        worker.commit([make_ref(cp, f"s{i}", t.task_id) for i, t in enumerate(worker.lease(60))])
        trainer = cp.trainer("tr")
        leased = trainer.lease(20)
        with pytest.raises(OutOfMemory, match="maxmemory.*changed nothing"):
            for _ in range(10_000):
                cp.ingest_prompts([{"payload": "x" * 4000} for _ in range(50)])
        yield cp, trainer, leased


def fill(cp) -> None:
    """Ingest small tasks until Redis refuses one: it is then over its maxmemory, and
    stays so for the next call (a refused call frees nothing)."""
    with pytest.raises(OutOfMemory):
        for _ in range(100_000):
            cp.ingest_prompts([{"payload": "x" * 200}])


def test_producers_are_refused_cleanly_while_trainers_drain(full):
    cp, trainer, leased = full
    fill(cp)
    prompts = cp.status()["prompts"]
    with pytest.raises(OutOfMemory):
        cp.ingest_prompts([{"task_id": "more"}])
    assert cp.status()["prompts"] == prompts  # the refused ingest wrote nothing

    # Each trainer call right after a refused ingest, so Redis is over its limit.
    fill(cp)
    assert trainer.heartbeat() == []
    fill(cp)
    assert trainer.ack([r.sample_id for r in leased], global_step=1, optimizer_durable=True) == \
        [r.sample_id for r in leased]
    fill(cp)
    more = trainer.lease(20)
    assert len(more) == 20
    fill(cp)
    assert len(trainer.ack([r.sample_id for r in more], global_step=2, optimizer_durable=True)) == 20
    status = cp.status()
    assert status["samples_acked"] == 40 and status["queue_in_flight"] == 0


def test_a_server_that_cannot_persist_refuses_writes_with_a_clear_error_and_changes_nothing():
    """MISCONF: the last RDB save failed (here the dump file's path is a directory) and
    stop-writes-on-bgsave-error is on. Every write is refused, at a script's first
    write, so the call changed nothing; reads go on; a good save lifts it."""
    import os
    import time

    from conftest import dump_run
    from dataflow_redis import WritesRefused
    from dataflow_redis.cli import main
    from conftest import cli_runner

    args = ["--save", "3600 1", "--dbfilename", "dump.rdb", "--stop-writes-on-bgsave-error", "yes"]
    with RedisServer(extra_args=args) as server:
        cp = ControlPlane.from_url(server.url, "misconf-run")
        cp.ingest_prompts([{"task_id": "t0"}])
        blocker = os.path.join(server.dir, "dump.rdb")
        os.mkdir(blocker)
        client = server.client()

        def save_and_wait(status: str) -> None:
            client.bgsave()
            deadline = time.monotonic() + 10
            while (client.info("persistence")["rdb_bgsave_in_progress"]
                   or client.info("persistence")["rdb_last_bgsave_status"] != status):
                assert time.monotonic() < deadline, f"BGSAVE did not end as {status}"
                time.sleep(0.05)

        save_and_wait("err")
        before = dump_run(cp)
        for call in (lambda: cp.ingest_prompts([{"task_id": "t1"}]), lambda: cp.rollout_worker("w").lease(1),
                     lambda: cp.pause("maintenance")):
            with pytest.raises(WritesRefused, match=r"cannot persist.*MISCONF.*changed nothing"):
                call()
        assert dump_run(cp) == before and cp.status()["prompts_pending"] == 1
        # Reads go on even on a connection idle for long: connect() sets no health
        # check, whose PING Redis refuses under MISCONF.
        assert not cp.redis.connection_pool.connection_kwargs.get("health_check_interval")
        result = cli_runner().invoke(main, ["--redis-url", server.url, "--run", "misconf-run", "pause",
                                            "--reason", "x"])
        assert result.exit_code == 1 and "cannot persist" in result.output and "Traceback" not in result.output
        os.rmdir(blocker)
        save_and_wait("ok")
        assert [t.task_id for t in cp.rollout_worker("w").lease(1)] == ["t0"]
