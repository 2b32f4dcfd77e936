"""The operator CLI against a real Redis: through click's test runner and as a subprocess.

Each command's output is checked against what the library reads from Redis itself;
each error (unreachable Redis, wrong password, unknown run, bad value) must print one
line on stderr, exit non-zero with its documented code, never show a traceback and
never echo a password.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import types
import uuid
from pathlib import Path

import click
import pytest

from conftest import cli_runner, dump_run, make_ref
from dataflow_redis import BackpressureConfig
from dataflow_redis.cli import (EXIT_AUTH, EXIT_BAD_VALUE, EXIT_UNKNOWN_RUN, EXIT_UNREACHABLE, main,
                                mask_url, scrub, watch_frame, watermark_bar, Target)
from dataflow_redis.embedded import RedisServer, free_port
from dataflow_redis.metrics import BACKPRESSURE, TOP_LEVEL, render

CLEAN_ENV = {"DATAFLOW_REDIS_URL": None, "DATAFLOW_RUN": None, "DATAFLOW_NAMESPACE": None,
             "DATAFLOW_REDIS_DEBUG": None}
# Status fields that move with the clock between two reads.
CLOCK_FIELDS = {"server_time_ms", "rollout_starved_s", "trainer_starved_s", "since_s",
                "avg_feature_age_s", "oldest_feature_age_s"}


def cli(*args, env=None):
    """Invoke the CLI in-process; returns click's Result (stdout and stderr apart)."""
    return cli_runner(env={**CLEAN_ENV, **(env or {})}).invoke(main, list(args))


def cli_proc(*args, env=None, entry_point=False, timeout=60):
    """Run the CLI as a subprocess (``python -m dataflow_redis.cli`` or the installed script)."""
    command = ([str(Path(sys.executable).parent / "dataflow-redis")] if entry_point
               else [sys.executable, "-m", "dataflow_redis.cli"])
    full_env = {k: v for k, v in os.environ.items() if k not in CLEAN_ENV}
    full_env.update(env or {})
    return subprocess.run(command + list(args), capture_output=True, text=True, env=full_env, timeout=timeout)


def assert_one_line_error(stderr: str, exit_code: int, expected_code: int, *forbidden: str) -> str:
    assert exit_code == expected_code, stderr
    assert "Traceback" not in stderr
    line = stderr.strip()
    assert line and "\n" not in line, f"expected one line, got: {stderr!r}"
    for secret in forbidden:
        assert secret not in stderr
    return line


def without_clock(value):
    """The status dict minus fields that change with time alone."""
    if isinstance(value, dict):
        return {k: without_clock(v) for k, v in value.items() if k not in CLOCK_FIELDS}
    return value


@pytest.fixture
def busy_cp(make_cp):
    """A run mid-flight: watermarks set, two tasks leased, one committed and leased by a
    trainer, one dead-lettered, resident over the high watermark (latch paused)."""
    cp = make_cp()
    cp.configure(max_prompt_attempts=3)
    cp.configure_backpressure(BackpressureConfig(high_watermark_bytes=10_000, low_watermark_bytes=5_000,
                                                 max_inflight_prompts_per_worker=4, default_task_bytes=1_000))
    cp.ingest_prompts([{"task_id": f"t{i}", "payload": {"i": i}} for i in range(6)])
    worker = cp.rollout_worker("worker-a", lease_s=60)
    tasks = worker.lease(3)
    worker.commit([make_ref(cp, "s0", tasks[0].task_id)])
    worker.fail([tasks[1].task_id], "bad prompt", retryable=False)
    trainer = cp.trainer("trainer-a", lease_s=60)
    assert [r.sample_id for r in trainer.lease(4)] == ["s0"]
    cp.capacity_reporter("shard-0").report(12_000, max_resident_bytes=20_000)
    return cp


def base(cp):
    return ["--redis-url", cp_url(cp), "--run", cp.run_id]


def cp_url(cp) -> str:
    """The URL a ControlPlane was opened with (rebuilt from its connection settings)."""
    kw = cp.redis.connection_pool.connection_kwargs
    auth = f"{kw.get('username') or ''}:{kw['password']}@" if kw.get("password") else ""
    return f"redis://{auth}{kw['host']}:{kw['port']}/{kw.get('db', 0)}"


# ---------------------------------------------------------------------- status
def test_status_table_shows_what_redis_holds(busy_cp):
    result = cli(*base(busy_cp), "status")
    assert result.exit_code == 0, result.stderr
    out = result.stdout
    status = busy_cp.status()
    assert busy_cp.run_id in out
    assert "PAUSED by the watermark latch" in out  # resident 12000 >= high 10000
    assert f"ingested                {status['prompts']}" in out
    assert "dead-lettered           1" in out
    assert "in flight               worker-a=1" in out
    assert "11.7 KiB" in out and "9.8 KiB / 4.9 KiB" in out  # resident, high / low
    assert "[" in out and "H" in out.split("resident", 1)[1]


def test_status_warns_of_an_eviction_policy_that_could_drop_the_run(busy_cp):
    assert "warning" not in cli(*base(busy_cp), "status").stdout  # the test server: no maxmemory
    from dataflow_redis import ControlPlane
    from dataflow_redis.embedded import RedisServer

    with RedisServer(extra_args=["--maxmemory", "64mb", "--maxmemory-policy", "allkeys-lru"]) as server:
        cp = ControlPlane.from_url(server.url, "lru-run")
        cp.ingest_prompts([{"task_id": "t0"}])
        [warning] = cp.server_warnings()
        assert "maxmemory-policy is allkeys-lru" in warning and "noeviction" in warning
        result = cli("--redis-url", server.url, "--run", "lru-run", "status")
        assert result.exit_code == 0 and result.stdout.rstrip().endswith("warning: " + warning)
        server.client().config_set("maxmemory-policy", "noeviction")
        assert cp.server_warnings() == []


def test_status_json_is_exactly_the_api_dict(busy_cp):
    result = cli(*base(busy_cp), "status", "--json")
    assert result.exit_code == 0, result.stderr
    printed = json.loads(result.stdout)
    assert without_clock(printed) == without_clock(busy_cp.status())
    assert set(printed) == set(busy_cp.status())


def test_status_as_subprocess_module_and_entry_point(busy_cp):
    for entry_point in (False, True):
        proc = cli_proc("status", "--json", env={"DATAFLOW_REDIS_URL": cp_url(busy_cp),
                                                 "DATAFLOW_RUN": busy_cp.run_id}, entry_point=entry_point)
        assert proc.returncode == 0, proc.stderr
        assert without_clock(json.loads(proc.stdout)) == without_clock(busy_cp.status())


# ----------------------------------------------------------------------- watch
def test_watch_prints_frames_with_bar_latch_inflight_and_rates(busy_cp):
    result = cli(*base(busy_cp), "watch", "--interval", "0.05", "--iterations", "3")
    assert result.exit_code == 0, result.stderr
    frames = result.stdout.strip().split("\n\n")
    assert len(frames) == 3
    assert "rates /s    (after the next refresh)" in frames[0]
    for frame in frames[1:]:
        assert "rates /s    ingested 0.0  committed 0.0  acked 0.0" in frame
    for frame in frames:
        assert "latch PAUSED" in frame and "worker-a=1" in frame and "H" in frame and "#" in frame


def test_watch_rates_come_from_successive_snapshots(busy_cp):
    before = busy_cp.status()
    after = dict(before, server_time_ms=before["server_time_ms"] + 2000,
                 prompts=before["prompts"] + 10, samples_acked=before["samples_acked"] + 4)
    frame = watch_frame(after, before, Target("redis://h:1/0", busy_cp.run_id, "dfr"), {})
    assert "ingested 5.0  committed 0.0  acked 2.0" in frame


def test_watch_exits_cleanly_on_ctrl_c(busy_cp):
    proc = subprocess.Popen(
        [sys.executable, "-m", "dataflow_redis.cli", "--redis-url", cp_url(busy_cp), "--run", busy_cp.run_id,
         "watch", "--interval", "0.1"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().startswith(f"run {busy_cp.run_id}")
        proc.send_signal(signal.SIGINT)
        _, stderr = proc.communicate(timeout=20)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, stderr
    assert "Traceback" not in stderr and "Aborted" not in stderr


def test_watermark_bar_places_resident_reserved_and_marks():
    bar = watermark_bar(resident=50, reserved=25, high=100, low=50, width=20)
    assert len(bar) == 22 and bar[0] == "[" and bar[-1] == "]"
    cells = bar[1:-1]
    assert cells.index("H") == 16 and cells.index("L") == 8  # scale is 125 = high * 1.25
    assert cells[:8] == "#" * 8 and cells[9:12] == "+++" and cells[-1] == "."


# ---------------------------------------------------------------------- config
def test_config_show_and_set_go_through_the_api(busy_cp):
    shown = json.loads(cli(*base(busy_cp), "config", "show", "--json").stdout)
    assert shown["backpressure"]["high_watermark_bytes"] == 10_000
    assert shown["settings"]["max_prompt_attempts"] == 3
    version = shown["version"]

    result = cli(*base(busy_cp), "config", "set", "high_watermark_bytes=20000", "low_watermark_bytes=15000",
                 "stale_after_s=2.5", "max_train_lease=none", "--reason", "more room")
    assert result.exit_code == 0, result.stderr
    assert f"config version {version + 1}" in result.stdout
    cfg = busy_cp.backpressure_config()
    assert (cfg.high_watermark_bytes, cfg.low_watermark_bytes, cfg.stale_after_s, cfg.max_train_lease) == \
        (20_000, 15_000, 2.5, None)
    assert busy_cp.config_version() == version + 1
    assert any(e["type"] == "config" and "more room" in e["reason"] for e in busy_cp.events())
    # The new watermarks apply at once: 12000 resident is now below low = 15000.
    assert busy_cp.status()["backpressure"]["paused"] is False
    text = cli(*base(busy_cp), "config", "show").stdout
    assert "high_watermark_bytes              20000" in text and "max_train_lease                   -" in text


@pytest.mark.parametrize("assignment, words", [
    ("high_watermark_bytes=abc", "must be an integer"),
    ("high_watermark_bytes=-5", "must be an integer from 1 to"),
    ("stale_after_s=nan", "stale_after_s"),
    ("no_such_field=1", "unknown config field"),
    ("high_watermark_bytes", "expected KEY=VALUE"),
    ("low_watermark_bytes=50000", "must not exceed"),  # merged with the stored high (Lua check)
])
def test_config_set_refuses_bad_values_and_changes_nothing(busy_cp, assignment, words):
    before = dump_run(busy_cp)
    result = cli(*base(busy_cp), "config", "set", assignment)
    line = assert_one_line_error(result.stderr, result.exit_code, EXIT_BAD_VALUE)
    assert words in line
    assert dump_run(busy_cp) == before


def test_config_set_on_an_unknown_run_needs_create(make_cp):
    cp = make_cp()
    result = cli(*base(cp), "config", "set", "max_prompt_attempts=4")
    assert_one_line_error(result.stderr, result.exit_code, EXIT_UNKNOWN_RUN)
    assert not cp.exists()
    result = cli(*base(cp), "config", "set", "max_prompt_attempts=4", "--create")
    assert result.exit_code == 0, result.stderr
    assert cp.settings().max_prompt_attempts == 4


# ------------------------------------------------------------- pause / resume
def test_pause_and_resume_are_the_operator_override(make_cp):
    cp = make_cp()
    cp.ingest_prompts([{"task_id": "a"}, {"task_id": "b"}])
    worker = cp.rollout_worker("w")
    result = cli(*base(cp), "pause", "--reason", "store maintenance")
    assert result.exit_code == 0 and "paused: store maintenance" in result.stdout
    assert cp.status()["operator_pause"]["reason"] == "store maintenance"
    assert worker.lease(1) == []
    again = cli(*base(cp), "pause", "--reason", "disk swap").stdout
    assert "already paused ('store maintenance'); nothing changed" in again
    assert "PAUSED: 'store maintenance'" in cli(*base(cp), "status").stdout

    result = cli(*base(cp), "resume", "--reason", "done")
    assert result.exit_code == 0 and "resumed: done" in result.stdout
    assert cp.status()["operator_pause"] is None
    assert [t.task_id for t in worker.lease(1)] == ["a"]
    kinds = [e["type"] for e in cp.events()]
    assert "operator_pause" in kinds and "operator_resume" in kinds


# ------------------------------------------------------------ leases, dlq, events
def test_leases_show_owner_age_deadline_attempt(busy_cp):
    result = cli(*base(busy_cp), "leases", "--json")
    printed = json.loads(result.stdout)
    assert printed["kind"] == "prompt"
    assert [(r["id"], r["holder"], r["attempt"]) for r in printed["leases"]] == \
        [(r["id"], r["holder"], r["attempt"]) for r in busy_cp.leases("prompt")]
    assert printed["leases"][0]["holder"] == "worker-a"

    text = cli(*base(busy_cp), "leases").stdout.splitlines()
    assert text[0].split() == ["ID", "HOLDER", "AGE_S", "DEADLINE_IN_S", "ATTEMPT", "RESERVED_BYTES"]
    row = text[1].split()
    assert row[1] == "worker-a" and 0 <= float(row[2]) < 30 and 30 < float(row[3]) <= 60 and row[4] == "0"

    train = cli(*base(busy_cp), "leases", "--kind", "train").stdout.splitlines()
    assert train[1].split()[:2] == ["s0", "trainer-a"]


def test_dlq_list_and_requeue(busy_cp):
    dead = busy_cp.dead_letters()
    assert len(dead) == 1
    task_id = dead[0]["task_id"]
    result = cli(*base(busy_cp), "dlq", "list")
    assert task_id in result.stdout and "bad prompt" in result.stdout
    pending = busy_cp.status()["prompts_pending"]

    result = cli(*base(busy_cp), "dlq", "requeue", task_id, "nope-1", "--reason", "fixed the prompt")
    assert result.exit_code == 0, result.stderr
    assert f"requeued 1 of 2 task(s): {task_id}" in result.stdout
    assert "not dead-lettered (left alone): nope-1" in result.stderr
    assert busy_cp.dead_letters() == []
    assert busy_cp.status()["prompts_pending"] == pending + 1
    assert "no dead-lettered tasks" in cli(*base(busy_cp), "dlq", "list").stdout


def test_events_list_the_transitions(busy_cp):
    result = cli(*base(busy_cp), "events", "--json")
    printed = json.loads(result.stdout)
    assert printed == busy_cp.events(50)
    assert [e["type"] for e in printed].count("pause") == 1
    text = cli(*base(busy_cp), "events").stdout
    assert "pause" in text and "11.7 KiB" in text


# --------------------------------------------------------------- runs, reclaim
def test_runs_lists_the_runs_of_the_namespace(make_cp):
    namespace = f"ns{uuid.uuid4().hex[:8]}"
    first, second = make_cp(namespace=namespace), make_cp(namespace=namespace)
    first.configure(max_prompt_attempts=2)
    second.configure_backpressure(BackpressureConfig(high_watermark_bytes=100))
    second.ingest_prompts([{"task_id": "x"}])
    other = make_cp()  # default namespace: not listed
    other.configure(max_prompt_attempts=2)

    result = cli("--redis-url", cp_url(first), "--namespace", namespace, "runs", "--json")
    assert result.exit_code == 0, result.stderr
    listed = {r["run_id"]: r for r in json.loads(result.stdout)}
    assert set(listed) == {first.run_id, second.run_id}
    assert listed[second.run_id]["prompts_pending"] == 1
    empty = cli("--redis-url", cp_url(first), "--namespace", f"{namespace}x", "runs")
    assert "no runs in namespace" in empty.stdout


def test_runs_lists_every_run_and_survives_odd_keys(make_cp):
    """A run known only by its backpressure state (a shard reported first) is listed,
    as status and exists() accept it; a key whose run id this tool could never have
    written is skipped with a warning; a run whose status fails is listed with why."""
    namespace = f"ns{uuid.uuid4().hex[:8]}"
    store_first, broken = make_cp(namespace=namespace), make_cp(namespace=namespace)
    store_first.capacity_reporter("shard-0").report(100)
    broken.configure(max_prompt_attempts=2)
    broken.redis.delete(broken.keys.counters)
    broken.redis.set(broken.keys.counters, "not a hash")
    odd = f"{namespace}:{{bad id}}:config"
    store_first.redis.hset(odd, "version", 1)
    try:
        result = cli("--redis-url", cp_url(store_first), "--namespace", namespace, "runs", "--json")
        assert result.exit_code == 0, result.output
        listed = {r["run_id"]: r for r in json.loads(result.stdout)}
        assert set(listed) == {store_first.run_id, broken.run_id}
        assert listed[store_first.run_id]["resident_bytes"] is None and "error" not in listed[store_first.run_id]
        assert "another type" in listed[broken.run_id]["error"]
        assert "skipped keys whose run id is not valid: 'bad id'" in result.stderr
        table = cli("--redis-url", cp_url(store_first), "--namespace", namespace, "runs")
        assert table.exit_code == 0 and "error: " in table.stdout and store_first.run_id in table.stdout
    finally:
        store_first.redis.delete(odd)


def test_status_shows_low_equal_to_high_when_only_high_is_set(make_cp):
    cp = make_cp()
    result = cli("--redis-url", cp_url(cp), "--run", cp.run_id, "config", "set", "--create",
                 "high_watermark_bytes=1000")
    assert result.exit_code == 0, result.output
    assert cp.status()["backpressure"]["low_watermark_bytes"] == 1000
    assert "1000 B / 1000 B" in cli("--redis-url", cp_url(cp), "--run", cp.run_id, "status").stdout


def test_reclaim_returns_expired_leases(make_cp):
    cp = make_cp()
    cp.ingest_prompts([{"task_id": "slow"}])
    cp.rollout_worker("w", lease_s=0.05).lease(1)
    time.sleep(0.15)
    result = cli(*base(cp), "reclaim")
    assert result.exit_code == 0 and "reclaimed 1 expired lease(s)" in result.stdout
    status = cp.status()
    assert (status["prompts_pending"], status["prompts_leased"]) == (1, 0)


# --------------------------------------------------------------------- metrics
def test_metrics_are_valid_prometheus_text_matching_status(busy_cp):
    from prometheus_client.parser import text_string_to_metric_families

    result = cli(*base(busy_cp), "metrics")
    assert result.exit_code == 0, result.stderr
    families = {f.name: f for f in text_string_to_metric_families(result.stdout)}
    status = busy_cp.status()

    def value(name, **labels):
        family = families[name.removesuffix("_total")]
        matches = [s.value for s in family.samples if s.labels == {"run": busy_cp.run_id, **labels}]
        assert len(matches) == 1, name
        return matches[0]

    assert value("dataflow_redis_prompts_ingested_total") == status["prompts"] == 6
    assert value("dataflow_redis_prompts_dead_lettered") == 1
    assert value("dataflow_redis_latch_paused") == 1
    assert value("dataflow_redis_resident_bytes") == 12_000
    assert value("dataflow_redis_high_watermark_bytes") == 10_000
    assert value("dataflow_redis_pause_transitions_total") == 1
    assert value("dataflow_redis_worker_inflight_prompts", worker="worker-a") == 1
    # requeue_undurable takes acks back: a gauge, since a counter that falls reads as a reset.
    assert families["dataflow_redis_samples_acked"].type == "gauge"
    assert "dataflow_redis_durable_global_step" not in families  # None: left out, not invented


def test_every_numeric_status_field_has_a_metric(busy_cp):
    busy_cp.pause("so that operator_reason holds its text")
    status = busy_cp.status()
    exported_top = {f for f, *_ in TOP_LEVEL}
    exported_bp = {f for f, *_ in BACKPRESSURE}
    numeric = lambda v: v is None or isinstance(v, (bool, int, float, list))  # noqa: E731
    assert {k for k, v in status.items() if k not in ("run_id", "backpressure", "operator_pause")
            and numeric(v)} <= exported_top
    assert {k for k, v in status["backpressure"].items() if numeric(v)} <= exported_bp


def test_status_names_a_few_stale_shards_and_counts_the_rest(cp):
    cp.configure_backpressure(BackpressureConfig(high_watermark_bytes=10_000, stale_after_s=0.2))
    for i in range(8):
        cp.capacity_reporter(f"shard-{i}").report(100)
    time.sleep(0.3)
    table = cli(*base(cp), "status")
    assert table.exit_code == 0, table.output
    line = next(x for x in table.stdout.splitlines() if x.startswith("  store cap") or "stale:" in x)
    assert "stale: shard-0, shard-1, shard-2, shard-3, shard-4 and 3 more)" in line, line
    assert len(json.loads(cli(*base(cp), "status", "--json").stdout)["backpressure"]["stale_shards"]) == 8


def test_cli_doc_lists_every_metric_with_its_status_field():
    doc = (Path(__file__).resolve().parent.parent / "docs" / "cli.md").read_text()
    table = doc.split("<!-- metrics-table -->")[1].split("<!-- /metrics-table -->")[0]
    rows = [[cell.strip().strip("`") for cell in line.strip("|").split("|")]
            for line in table.strip().splitlines()[2:]]
    expected = [[field, f"dataflow_redis_{metric}", kind] for field, metric, kind, _ in TOP_LEVEL]
    expected += [[f"backpressure.{field}", f"dataflow_redis_{metric}", kind] for field, metric, kind, _ in BACKPRESSURE]
    expected += [["backpressure` is set (a policy is configured)", "dataflow_redis_backpressure_enabled", "gauge"],
                 ["ControlPlane.worker_inflight()`, label `worker", "dataflow_redis_worker_inflight_prompts", "gauge"]]
    assert rows == expected
    # Every family render() can print is in the table.
    full = {"run_id": "r", **{f: 1 for f, *_ in TOP_LEVEL}, "backpressure": {f: 1 for f, *_ in BACKPRESSURE}}
    printed = {line.split()[2] for line in render(full, {"w": 1}).splitlines() if line.startswith("# TYPE")}
    assert printed == {row[1] for row in rows}


def test_metrics_escape_label_values():
    text = render({"run_id": 'a"b\\c', "prompts": 1, "operator_pause": None})
    assert 'run="a\\"b\\\\c"' in text


# ---------------------------------------------------------------------- errors
def test_unreachable_redis_is_one_line_exit_3():
    url = f"redis://127.0.0.1:{free_port()}/0"  # nothing listens there
    result = cli("--redis-url", url, "--run", "r1", "status")
    line = assert_one_line_error(result.stderr, result.exit_code, EXIT_UNREACHABLE)
    assert "cannot reach Redis" in line and url in line
    proc = cli_proc("--redis-url", url, "--run", "r1", "leases")
    assert_one_line_error(proc.stderr, proc.returncode, EXIT_UNREACHABLE)
    assert proc.stdout == ""


@pytest.fixture(scope="module")
def password_server():
    server = RedisServer(password="right-password-1").start()
    client = server.client()
    client.execute_command("ACL", "SETUSER", "alice", "on", ">alice-password-2", "~*", "+@all")
    client.execute_command("ACL", "SETUSER", "carol", "on", ">carol-password-3", "~elsewhere:*", "+@all")
    client.close()
    yield server
    server.stop()


def test_wrong_password_and_acl_user_never_echo_the_password(password_server):
    port = password_server.port
    for url in (f"redis://:wrong-password-9@127.0.0.1:{port}/0",
                f"redis://alice:wrong-password-9@127.0.0.1:{port}/0",
                f"redis://127.0.0.1:{port}/0?password=wrong-password-9"):
        result = cli("--redis-url", url, "--run", "r1", "status")
        line = assert_one_line_error(result.stderr, result.exit_code, EXIT_AUTH, "wrong-password-9")
        assert "refused the credentials" in line and "***" in line
        assert "wrong-password-9" not in result.stdout
    proc = cli_proc("--redis-url", f"redis://alice:wrong-password-9@127.0.0.1:{port}/0", "--run", "r1", "status")
    assert_one_line_error(proc.stderr, proc.returncode, EXIT_AUTH, "wrong-password-9")
    # No password at all against requirepass.
    result = cli("--redis-url", f"redis://127.0.0.1:{port}/0", "--run", "r1", "status")
    assert_one_line_error(result.stderr, result.exit_code, EXIT_AUTH)
    # The right ACL credentials get through to the next check (the run is unknown there).
    result = cli("--redis-url", f"redis://alice:alice-password-2@127.0.0.1:{port}/0", "--run", "r1", "status")
    line = assert_one_line_error(result.stderr, result.exit_code, EXIT_UNKNOWN_RUN, "alice-password-2")
    assert "redis://alice:***@127.0.0.1" in line
    # A user whose ACL does not cover the run's keys: a permission error, exit 4.
    result = cli("--redis-url", f"redis://carol:carol-password-3@127.0.0.1:{port}/0", "--run", "r1", "status")
    line = assert_one_line_error(result.stderr, result.exit_code, EXIT_AUTH, "carol-password-3")
    assert "permission" in line


@pytest.mark.parametrize("command", [["status"], ["watch", "--iterations", "1"], ["leases"], ["metrics"],
                                     ["pause", "--reason", "r"], ["dlq", "list"], ["events"], ["reclaim"],
                                     ["config", "show"]])
def test_unknown_run_is_one_line_exit_5_and_writes_nothing(redis_url, command):
    run_id = f"missing-{uuid.uuid4().hex[:8]}"
    result = cli("--redis-url", redis_url, "--run", run_id, *command)
    line = assert_one_line_error(result.stderr, result.exit_code, EXIT_UNKNOWN_RUN)
    assert run_id in line and "dataflow-redis runs" in line
    from dataflow_redis import ControlPlane
    assert not ControlPlane.from_url(redis_url, run_id).exists()


def test_unknown_run_as_subprocess(redis_url):
    proc = cli_proc("--redis-url", redis_url, "--run", "never-created-run", "status")
    assert_one_line_error(proc.stderr, proc.returncode, EXIT_UNKNOWN_RUN)


@pytest.mark.parametrize("args, words", [
    (["--run", "bad{run}", "status"], "invalid run id"),
    (["--namespace", "bad ns", "--run", "r", "status"], "invalid namespace"),
    (["status"], "no run given"),
    (["--redis-url", "http://u:secret-in-url@h/0", "--run", "r", "status"], "bad Redis URL"),
    (["--redis-url", "redis://u:secret-in-url@h:notaport/0", "--run", "r", "status"], "bad Redis URL"),
])
def test_bad_values_are_one_line_exit_2(redis_url, args, words):
    if "--redis-url" not in args:
        args = ["--redis-url", redis_url, *args]
    result = cli(*args)
    line = assert_one_line_error(result.stderr, result.exit_code, EXIT_BAD_VALUE, "secret-in-url")
    assert words in line


# ------------------------------------------------------------------ odds and ends
@pytest.mark.parametrize("url, masked, secret", [
    ("redis://:pw123@h:6379/0", "redis://:***@h:6379/0", "pw123"),
    ("redis://alice:pw123@h:6379/0", "redis://alice:***@h:6379/0", "pw123"),
    ("rediss://alice:p%40ss@h:6380/1", "rediss://alice:***@h:6380/1", "p@ss"),
    ("unix:///run/redis.sock?db=2&password=pw123", "unix:///run/redis.sock?db=2&password=***", "pw123"),
    ("redis://alice@h:6379/0", "redis://alice@h:6379/0", None),
    ("redis://h:6379/0", "redis://h:6379/0", None),
])
def test_mask_url_and_scrub(url, masked, secret):
    assert mask_url(url) == masked
    message = scrub(f"failed for {url} with {secret}", url)
    assert masked in message
    if secret:
        assert secret not in message


def test_unix_socket_url_works(tmp_path):
    sock = tmp_path / "r.sock"
    with RedisServer(extra_args=["--unixsocket", str(sock)]):
        result = cli("--redis-url", f"unix://{sock}?db=0", "runs")
        assert result.exit_code == 0, result.stderr
        assert "no runs in namespace 'dfr'" in result.stdout


def test_bench_is_registered_lazily(monkeypatch):
    @click.command("bench")
    def fake_bench():
        click.echo("bench ran")

    monkeypatch.setitem(sys.modules, "dataflow_redis.bench", types.SimpleNamespace(bench_command=fake_bench))
    assert "bench" in cli("--help").stdout
    assert cli("bench").stdout == "bench ran\n"


def test_cli_works_without_the_bench_module(monkeypatch):
    monkeypatch.setitem(sys.modules, "dataflow_redis.bench", None)  # import raises ModuleNotFoundError
    result = cli("--help")
    assert result.exit_code == 0 and "status" in result.stdout and "bench" not in result.stdout
