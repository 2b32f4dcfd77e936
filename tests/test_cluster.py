"""Redis Cluster: every key of a run shares the {run} hash tag, so each script touches
one slot and the whole lifecycle runs unchanged on a 3-master cluster."""

from __future__ import annotations

import shutil
import subprocess
import time

import pytest
import redis
from redis.cluster import RedisCluster

from dataflow_redis import BackpressureConfig, ControlPlane
from dataflow_redis.embedded import RedisServer

from conftest import make_ref


@pytest.fixture(scope="module")
def cluster():
    if not shutil.which("redis-cli"):
        pytest.skip("redis-cli is needed to create a cluster")
    nodes = [RedisServer(extra_args=["--cluster-enabled", "yes", "--cluster-node-timeout", "2000"]).start()
             for _ in range(3)]
    try:
        addresses = [f"127.0.0.1:{n.port}" for n in nodes]
        subprocess.run(["redis-cli", "--cluster", "create", *addresses, "--cluster-replicas", "0",
                        "--cluster-yes"], check=True, capture_output=True, timeout=60)
        deadline = time.monotonic() + 30
        while redis.Redis(port=nodes[0].port).cluster("info").get("cluster_state") != "ok":
            assert time.monotonic() < deadline, "cluster did not converge"
            time.sleep(0.1)
        client = RedisCluster(host="127.0.0.1", port=nodes[0].port, decode_responses=True)
        yield client
        client.close()
    finally:
        for node in nodes:
            node.stop()


@pytest.mark.parametrize("run_id", ["alpha", "run-7", "exp.2026:11"])
def test_full_lifecycle_on_cluster(cluster, run_id):
    cp = ControlPlane(cluster, run_id=run_id)
    cp.configure(max_prompt_attempts=2)
    cp.configure_backpressure(BackpressureConfig(high_watermark_bytes=4096, low_watermark_bytes=1024))
    assert cp.ingest_prompts([{"task_id": f"t{i}", "payload": i} for i in range(4)]) == [f"t{i}" for i in range(4)]

    worker = cp.rollout_worker("w1")
    tasks = worker.lease(4)
    assert [t.task_id for t in tasks] == ["t0", "t1", "t2", "t3"]
    assert worker.commit([make_ref(cp, f"s{i}", f"t{i}") for i in range(3)]) == ["s0", "s1", "s2"]
    assert worker.fail(["t3"], "oom", retryable=True) == ["t3"]

    report = cp.capacity_reporter("shard-0").report(5000)
    assert report.paused
    assert worker.lease(1) == []

    trainer = cp.trainer("tr1")
    refs = trainer.lease(8, timeout_s=0.5)
    assert sorted(r.sample_id for r in refs) == ["s0", "s1", "s2"]
    assert sorted((row["id"], row["holder"]) for row in cp.leases("train")) == [
        ("s0", "tr1"), ("s1", "tr1"), ("s2", "tr1")]
    assert sorted(trainer.ack([r.sample_id for r in refs], global_step=1, optimizer_durable=True)) == ["s0", "s1", "s2"]

    status = cp.status()
    assert status["samples_acked"] == 3 and status["prompts_pending"] == 1
    assert status["backpressure"]["paused"] and status["backpressure"]["pause_transitions"] == 1

    # All of the run's keys live in one slot, on one node.
    keys = list(cluster.scan_iter(match=cp.keys.pattern()))
    assert len(keys) >= 10
    assert len({cluster.keyslot(k) for k in keys}) == 1
    assert cp.delete() == len(keys)


def test_a_cluster_client_keeps_its_settings_for_trainers_and_retries_a_cluster_in_transition(cluster, run_id,
                                                                                              monkeypatch):
    """A trainer on a RedisCluster client waits in slices of its socket timeout (the
    settings live in the nodes manager, not a pool), and CLUSTERDOWN / TRYAGAIN (a
    slot without its master, a slot being moved) are retried, not reported as a bug."""
    import redis as redis_module

    host, port = cluster.get_default_node().host, cluster.get_default_node().port
    client = RedisCluster(host=host, port=port, decode_responses=True, socket_timeout=1.0)
    try:
        cp = ControlPlane(client, run_id=run_id)
        assert cp.trainer("tr")._block_slice_s == pytest.approx(0.8)
        failures = iter([redis_module.exceptions.ClusterDownError("CLUSTERDOWN The cluster is down"),
                         redis_module.exceptions.TryAgainError("TRYAGAIN Multiple keys request during rehashing")])
        real = client.execute_command

        def flaky(*args, **kwargs):
            failure = next(failures, None) if args[0] == "EVALSHA" else None
            if failure:
                raise failure
            return real(*args, **kwargs)

        monkeypatch.setattr(client, "execute_command", flaky)
        assert cp.ingest_prompts([{"task_id": "t0"}]) == ["t0"]
        assert next(failures, "used") == "used"
    finally:
        client.close()
