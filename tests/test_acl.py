"""Access control: a Redis ACL user limited to the project's key prefix and the
commands the clients need runs everything; anything less fails with a clear
AuthenticationFailed; requirepass and rediss:// work; no password is ever printed.

The ACL line below is the one docs/reliability.md prints. Commands called inside the
Lua scripts count: Redis checks every ``redis.call`` against the calling user.
"""

from __future__ import annotations

import shutil
import subprocess
import uuid

import pytest

from conftest import cli_runner, make_ref
from dataflow_redis import AuthenticationFailed, BackpressureConfig, ControlPlane
from dataflow_redis.embedded import RedisServer, free_port
from dataflow_redis.scripts import load_scripts

ADMIN_PASSWORD = "admin-Xy9-never-printed"
USER_PASSWORD = "df-Pq4-never-printed"

# Commands the Python clients send themselves.
CLIENT_COMMANDS = ("evalsha eval blpop hgetall hget hmget hscan zmscore xrevrange exists scan "
                   "unlink time ping hello select cluster|slots command")
# Commands the Lua scripts call (lua/*.lua, lua/includes/*.lua).
SCRIPT_COMMANDS = ("del exists get hdel hget hgetall hincrby hlen hmget hset hsetnx llen lpop lpush ltrim "
                   "rename rpush sadd scard set smembers spop srem time type xadd zadd zcard zcount zmscore "
                   "zrangebyscore zrem")
COMMANDS = sorted(set(CLIENT_COMMANDS.split()) | set(SCRIPT_COMMANDS.split()))
ACL_RULES = f"on >{USER_PASSWORD} resetkeys ~dfr:* resetchannels -@all " + " ".join(f"+{c}" for c in COMMANDS)
"""``ACL SETUSER dataflow <ACL_RULES>`` (the password is the only site-specific part)."""


def test_acl_line_covers_every_command_the_scripts_call():
    """The list above cannot silently fall behind the scripts."""
    import re

    called = set()
    for script in load_scripts().values():
        # Direct calls, and the batch helpers of lua/includes/util.lua that take the
        # command name as their first argument.
        called |= {m.lower() for m in re.findall(r"(?:redis\.call|call_many|get_many)\('([A-Za-z]+)'",
                                                 script.source)}
    assert called and called <= set(COMMANDS), f"missing from the ACL line: {sorted(called - set(COMMANDS))}"


def test_docs_print_the_acl_line_these_tests_use():
    from pathlib import Path

    doc = (Path(__file__).resolve().parent.parent / "docs" / "reliability.md").read_text()
    assert "ACL SETUSER dataflow " + ACL_RULES.replace(USER_PASSWORD, "secret") in doc


@pytest.fixture(scope="module")
def server():
    server = RedisServer(password=ADMIN_PASSWORD).start()
    admin = server.client()
    admin.execute_command("ACL", "SETUSER", "dataflow", *ACL_RULES.split())
    # Same commands, another key prefix: may not touch the project's keys.
    admin.execute_command("ACL", "SETUSER", "outsider", *ACL_RULES.replace("~dfr:*", "~other:*").split())
    # The project's keys, but not the command the scripts are called with.
    admin.execute_command("ACL", "SETUSER", "no-scripts",
                          *ACL_RULES.replace("+evalsha", "").replace("+eval ", " ").split())
    # The scripts, but not one command they call.
    admin.execute_command("ACL", "SETUSER", "no-xadd", *ACL_RULES.replace("+xadd", "").split())
    admin.close()
    yield server
    server.stop()


def url(server, user, password=USER_PASSWORD, scheme="redis", port=None):
    return f"{scheme}://{user}:{password}@127.0.0.1:{port or server.port}/0"


def acl_denials(server) -> list:
    admin = server.client()
    try:
        return admin.execute_command("ACL", "LOG")
    finally:
        admin.close()


def test_restricted_user_runs_lifecycle_backpressure_and_status(server):
    admin = server.client()
    admin.execute_command("ACL", "LOG", "RESET")
    cp = ControlPlane.from_url(url(server, "dataflow"), f"acl-{uuid.uuid4().hex[:8]}", retry_s=5)
    cp.configure(max_prompt_attempts=2, reply_ttl_s=60)
    cp.configure_backpressure(BackpressureConfig(high_watermark_bytes=10_000, low_watermark_bytes=5_000,
                                                 max_inflight_prompts_per_worker=4, max_train_lease=4,
                                                 default_task_bytes=100, stale_after_s=60))
    reporter = cp.capacity_reporter("shard-0")
    assert reporter.report(20_000).paused                     # latch closes
    cp.ingest_prompts([{"task_id": f"t{i}"} for i in range(6)])
    worker = cp.rollout_worker("w0", lease_s=30)
    assert worker.lease(4) == []                              # paused: rollout starvation
    admin.script_flush()                                      # scripts must be re-loaded by the user
    assert not reporter.report(1_000).paused
    tasks = worker.lease(8)
    assert len(tasks) == 4                                    # the per-worker cap
    assert worker.heartbeat() == []
    assert worker.commit([make_ref(cp, f"s-{t.task_id}", t.task_id) for t in tasks[:2]]) == ["s-t0", "s-t1"]
    assert worker.fail([tasks[2].task_id], "flaky", True) == [tasks[2].task_id]
    assert worker.fail([tasks[3].task_id], "broken", False) == [tasks[3].task_id]
    cp.enqueue_offline_refs([make_ref(cp, "offline-0")])
    trainer = cp.trainer("tr0", lease_s=30)
    refs = trainer.lease(8, timeout_s=0.5)                    # BLPOP path, capped at max_train_lease
    assert len(refs) == 3
    assert trainer.heartbeat() == []
    assert trainer.ack(["s-t0"], global_step=1, optimizer_durable=False) == ["s-t0"]
    assert trainer.fail(["s-t1"], "bad features", False) == ["s-t1"]
    assert trainer.lease(1, timeout_s=0.2) == []              # a blocking wait that times out
    assert cp.requeue_undurable() == 1
    assert cp.reclaim_expired() == 0
    assert cp.pause("maintenance") and cp.resume("done")
    assert cp.requeue_dead_letters([tasks[3].task_id]) == [tasks[3].task_id]
    assert [e["type"] for e in cp.events()][:2] == ["config", "config"]
    assert cp.dead_letters() == []
    assert {row["holder"] for row in cp.leases("train")} == {"tr0"}
    assert cp.leases("prompt") == []
    assert cp.worker_inflight() == {}
    status = cp.status()
    assert status["samples_committed"] == 3 and status["backpressure"]["pause_transitions"] == 1
    assert cp.settings().max_prompt_attempts == 2 and cp.exists()
    assert reporter.deregister()
    assert cp.delete() > 0 and not cp.exists()
    assert acl_denials(server) == [], "some call needed a permission outside the ACL line"
    admin.close()


def test_restricted_user_runs_the_cli(server):
    from dataflow_redis import cli as cli_module

    run_id = f"acl-cli-{uuid.uuid4().hex[:8]}"
    cp = ControlPlane.from_url(url(server, "dataflow"), run_id)
    cp.configure_backpressure(BackpressureConfig(high_watermark_bytes=10_000))
    cp.ingest_prompts([{"task_id": "t0"}])
    cp.rollout_worker("w0").lease(1)
    env = {"DATAFLOW_REDIS_URL": url(server, "dataflow"), "DATAFLOW_RUN": run_id}
    runner = cli_runner(env=env)
    for args in (["status"], ["status", "--json"], ["leases"], ["dlq", "list"], ["events"], ["runs"],
                 ["config", "show"], ["metrics"], ["pause", "--reason", "acl"], ["resume"], ["reclaim"]):
        result = runner.invoke(cli_module.main, args)
        assert result.exit_code == 0, (args, result.output)
        assert USER_PASSWORD not in result.output
    cp.delete()


@pytest.mark.parametrize("user", ["outsider", "no-scripts"])
def test_user_without_the_needed_rights_gets_authentication_failed(server, user):
    cp = ControlPlane.from_url(url(server, user), "acl-denied", retry_s=1)
    calls = [cp.status, lambda: cp.ingest_prompts([{"task_id": "t0"}]), lambda: cp.rollout_worker("w").lease(1)]
    if user == "outsider":      # plain reads of the run's keys are refused too
        calls += [cp.exists, cp.settings, cp.events, cp.dead_letters, cp.worker_inflight]
    for call in calls:
        with pytest.raises(AuthenticationFailed, match="may not run this .*docs/reliability.md") as info:
            call()
        assert USER_PASSWORD not in str(info.value)
    admin = server.client()
    assert admin.keys("dfr:{acl-denied}*") == []
    admin.close()


def test_a_command_missing_inside_a_script_is_authentication_failed_not_a_raw_lua_error(server):
    """A user allowed EVALSHA but not XADD: the pause script fails at its event-log
    write. Redis keeps what the script wrote before (said in the message and in
    docs/reliability.md); the user is told which permission is missing."""
    run_id = f"acl-{uuid.uuid4().hex[:8]}"
    cp = ControlPlane.from_url(url(server, "no-xadd"), run_id, retry_s=1)
    with pytest.raises(AuthenticationFailed, match="may not run a command this call needs .*docs/reliability.md"):
        cp.pause("maintenance")
    from dataflow_redis import cli as cli_module

    result = cli_runner(env={"DATAFLOW_REDIS_URL": url(server, "no-xadd"), "DATAFLOW_RUN": run_id}).invoke(
        cli_module.main, ["resume", "--reason", "done"])
    assert result.exit_code == 4, result.output
    assert "Traceback" not in result.output and "user_script" not in result.output
    assert USER_PASSWORD not in result.output
    admin = server.client()
    admin.delete(*admin.keys(f"dfr:{{{run_id}}}*"))
    admin.close()


def test_cli_reports_a_missing_permission_in_one_line(server):
    from dataflow_redis import cli as cli_module

    result = cli_runner(env={"DATAFLOW_REDIS_URL": url(server, "outsider"), "DATAFLOW_RUN": "acl-denied"}).invoke(
        cli_module.main, ["status"])
    assert result.exit_code == 4
    assert "Traceback" not in result.output and USER_PASSWORD not in result.output
    assert "permission" in result.output


def test_requirepass_default_user(server):
    good = f"redis://:{ADMIN_PASSWORD}@127.0.0.1:{server.port}/0"
    cp = ControlPlane.from_url(good, f"pw-{uuid.uuid4().hex[:8]}")
    cp.ingest_prompts([{"task_id": "t0"}])
    assert cp.status()["prompts"] == 1
    cp.delete()
    for bad in (f"redis://:wrong-password@127.0.0.1:{server.port}/0", f"redis://127.0.0.1:{server.port}/0",
                url(server, "dataflow", password="not-" + USER_PASSWORD)):
        with pytest.raises(AuthenticationFailed, match="refused the credentials") as info:
            ControlPlane.from_url(bad, "pw-run").status()
        assert USER_PASSWORD not in str(info.value) and ADMIN_PASSWORD not in str(info.value)
        assert "wrong-password" not in str(info.value)


def _make_certs(directory) -> dict:
    """A throwaway CA and a server certificate for 127.0.0.1 (openssl)."""
    def run(*args):
        subprocess.run(["openssl", *args], cwd=directory, check=True, capture_output=True)

    run("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.pem",
        "-days", "1", "-subj", "/CN=dataflow-test-ca")
    run("req", "-newkey", "rsa:2048", "-nodes", "-keyout", "server.key", "-out", "server.csr",
        "-subj", "/CN=127.0.0.1")
    (directory / "san.ext").write_text("subjectAltName=IP:127.0.0.1\n")
    run("x509", "-req", "-in", "server.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
        "-out", "server.pem", "-days", "1", "-extfile", "san.ext")
    return {name: str(directory / f"{name}.pem") for name in ("ca", "server")} | {"key": str(directory / "server.key")}


def test_rediss_url_with_tls_and_acl_user(tmp_path):
    if not shutil.which("openssl"):
        pytest.skip("openssl not installed")
    certs = _make_certs(tmp_path)
    tls_port = free_port()
    server = RedisServer(password=ADMIN_PASSWORD, extra_args=[
        "--tls-port", str(tls_port), "--tls-cert-file", certs["server"], "--tls-key-file", certs["key"],
        "--tls-ca-cert-file", certs["ca"], "--tls-auth-clients", "no"])
    try:
        server.start()
    except Exception as exc:  # a redis-server built without TLS
        server.stop()
        pytest.skip(f"redis-server without TLS support: {exc}")
    try:
        admin = server.client()
        admin.execute_command("ACL", "SETUSER", "dataflow", *ACL_RULES.split())
        admin.close()
        tls_url = url(server, "dataflow", scheme="rediss", port=tls_port) + f"?ssl_ca_certs={certs['ca']}"
        cp = ControlPlane.from_url(tls_url, "tls-run")
        cp.ingest_prompts([{"task_id": "t0"}])
        [task] = cp.rollout_worker("w0").lease(1)
        assert task.task_id == "t0" and cp.status()["prompts_leased"] == 1
        # Without the CA the certificate is refused: TLS really is in use.
        with pytest.raises(Exception) as info:
            ControlPlane.from_url(url(server, "dataflow", scheme="rediss", port=tls_port), "tls-run",
                                  retry_s=0.2).status()
        assert "certificate" in str(info.value).lower() and USER_PASSWORD not in str(info.value)
        from dataflow_redis import cli as cli_module

        result = cli_runner(env={"DATAFLOW_REDIS_URL": tls_url, "DATAFLOW_RUN": "tls-run"}).invoke(
            cli_module.main, ["status"])
        assert result.exit_code == 0, result.output
        assert USER_PASSWORD not in result.output
    finally:
        server.stop()
