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
    slot without its master, a slot being moved), no node reachable and redirects
    exhausted are retried, not reported as a bug."""
    import redis as redis_module

    host, port = cluster.get_default_node().host, cluster.get_default_node().port
    client = RedisCluster(host=host, port=port, decode_responses=True, socket_timeout=1.0)
    try:
        cp = ControlPlane(client, run_id=run_id)
        assert cp.trainer("tr")._block_slice_s == pytest.approx(0.8)
        failures = iter([redis_module.exceptions.ClusterDownError("CLUSTERDOWN The cluster is down"),
                         redis_module.exceptions.TryAgainError("TRYAGAIN Multiple keys request during rehashing"),
                         # every node down or restarting, as the cluster client says it
                         redis_module.exceptions.RedisClusterException(
                             "Redis Cluster cannot be connected. Please provide at least one reachable node"),
                         # redirects or TRYAGAIN answers beyond redis-py's own 16 tries
                         redis_module.exceptions.ClusterError("TTL exhausted.")])
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


def _node_url(cluster) -> str:
    node = cluster.get_default_node()
    return f"redis://{node.host}:{node.port}/0?cluster=true"


def test_a_url_naming_any_node_reaches_runs_on_every_node(cluster):
    """With ?cluster=true, from_url and the CLI use a cluster client: runs whose slots
    live on other nodes work, and `runs` lists the runs of every node. Without it, a
    run on another node gets a clear error, not a raw MOVED."""
    from conftest import cli_runner
    from dataflow_redis import InvalidArgument
    from dataflow_redis.cli import EXIT_BAD_VALUE, main

    url = _node_url(cluster)
    run_ids = [f"any-node-{i}" for i in range(6)]
    assert len({cluster.get_node_from_key(ControlPlane(cluster, r).keys.config).name for r in run_ids}) > 1
    for run_id in run_ids:
        cp = ControlPlane.from_url(url, run_id)
        assert isinstance(cp.redis, RedisCluster)
        assert cp.ingest_prompts([{"task_id": "t0"}]) == ["t0"] and cp.is_done(["t0"]) == [False]
    runner = cli_runner(env={"DATAFLOW_REDIS_URL": None, "DATAFLOW_RUN": None, "DATAFLOW_NAMESPACE": None})
    listed = runner.invoke(main, ["--redis-url", url, "runs"])
    assert listed.exit_code == 0 and all(r in listed.stdout for r in run_ids), listed.output
    for run_id in run_ids:
        shown = runner.invoke(main, ["--redis-url", url, "--run", run_id, "status", "--json"])
        assert shown.exit_code == 0 and '"prompts": 1' in shown.stdout, shown.output
    other_db = url.replace("/0?", "/3?")
    assert runner.invoke(main, ["--redis-url", other_db, "--run", run_ids[0], "status"]).exit_code == EXIT_BAD_VALUE
    with pytest.raises(InvalidArgument, match="database 0 only"):
        ControlPlane.from_url(other_db, run_ids[0])
    plain = url.replace("?cluster=true", "")
    assert type(ControlPlane.from_url(url.replace("=true", "=false"), run_ids[0]).redis) is redis.Redis
    here = cluster.get_default_node().name
    for run_id in run_ids:
        cp = ControlPlane.from_url(plain, run_id)
        if cluster.get_node_from_key(cp.keys.config).name == here:
            assert cp.status()["prompts"] == 1
        else:
            with pytest.raises(InvalidArgument, match=r"another node .*; add \?cluster=true to the URL"):
                cp.status()
    moved = [runner.invoke(main, ["--redis-url", plain, "--run", r, "status"]) for r in run_ids]
    assert any(r.exit_code == EXIT_BAD_VALUE and "add ?cluster=true to the URL" in r.stderr for r in moved)
    for run_id in run_ids:
        ControlPlane(cluster, run_id).delete()


def test_calls_ride_through_a_migration_of_their_slot(cluster):
    """While the run's slot moves to another node, a script that creates a key (the
    reply cache) is answered TRYAGAIN until the move ends; the call waits it out
    (redis-py gives up after 16 redirects) and applies once."""
    import threading

    cp = ControlPlane.from_url(_node_url(cluster), f"moving-{time.time_ns()}", retry_s=20)
    cp.ingest_prompts([{"task_id": f"t{i}"} for i in range(20)])
    key = cp.keys.config
    slot = cluster.keyslot(key)
    source = cluster.get_node_from_key(key)
    target = next(n for n in cluster.get_primaries() if n.name != source.name)
    direct = {n.name: redis.Redis(host=n.host, port=n.port, decode_responses=True) for n in cluster.get_primaries()}
    ids = {name: client.execute_command("CLUSTER", "MYID") for name, client in direct.items()}
    direct[target.name].execute_command("CLUSTER", "SETSLOT", slot, "IMPORTING", ids[source.name])
    direct[source.name].execute_command("CLUSTER", "SETSLOT", slot, "MIGRATING", ids[target.name])

    def finish_the_move():
        keys = direct[source.name].execute_command("CLUSTER", "GETKEYSINSLOT", slot, 1000)
        direct[source.name].execute_command("MIGRATE", target.host, target.port, "", 0, 5000, "KEYS", *keys)
        for name in (target.name, source.name, *[n for n in direct if n not in (target.name, source.name)]):
            direct[name].execute_command("CLUSTER", "SETSLOT", slot, "NODE", ids[target.name])

    mover = threading.Timer(1.5, finish_the_move)
    mover.start()
    try:
        started = time.monotonic()
        assert cp.ingest_prompts([{"task_id": "during-the-move"}]) == ["during-the-move"]
        assert time.monotonic() - started >= 1.0, "the call did not meet the migration"
        mover.join()
        assert cp.status()["prompts"] == 21
        count = ("CLUSTER", "COUNTKEYSINSLOT", slot)
        assert direct[source.name].execute_command(*count) == 0 and direct[target.name].execute_command(*count) > 0
    finally:
        mover.join()
        for client in direct.values():
            client.close()
    cp.delete()


def test_server_warnings_ask_the_node_that_holds_the_run(cluster):
    run_ids = [f"warn-{i}" for i in range(6)]
    owners = {r: cluster.get_node_from_key(ControlPlane(cluster, r).keys.config) for r in run_ids}
    risky = owners[run_ids[0]]
    safe_run = next(r for r in run_ids if owners[r].name != risky.name)
    node = redis.Redis(host=risky.host, port=risky.port)
    node.config_set("maxmemory", "100mb")
    node.config_set("maxmemory-policy", "allkeys-lru")
    try:
        assert "allkeys-lru" in " ".join(ControlPlane(cluster, run_ids[0]).server_warnings())
        assert ControlPlane(cluster, safe_run).server_warnings() == []
    finally:
        node.config_set("maxmemory", "0")
        node.config_set("maxmemory-policy", "noeviction")
        node.close()


def test_the_benchmark_refuses_a_cluster_node(cluster):
    """Its figures come from one server's INFO: on a cluster node they would be another
    node's, so it says what to point it at instead."""
    from dataflow_redis import InvalidArgument
    from dataflow_redis.bench import run_bench

    plain = _node_url(cluster).replace("?cluster=true", "")
    for url in (plain, _node_url(cluster)):
        with pytest.raises(InvalidArgument, match="measures one standalone redis-server"):
            run_bench(url, quick=True, sections=("memory",))
