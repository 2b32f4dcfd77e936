"""Bad input: every case raises a specific, clear error and leaves the run untouched.

Each case runs against a run with live state (config, backpressure levers, pending,
leased, committed, acked and dead-lettered work, a shard report, events). A dump of
every key of the run (tests/conftest.py ``dump_run``) is taken before and after the
call and must be identical: a refused call writes nothing, not even a reply cache
entry or a counter. The CLI cases at the end check the same through click's runner
(exit code, one line, no traceback, no password).
"""

from __future__ import annotations

import math
import re
import types
from dataclasses import replace

import numpy as np
import pytest

from conftest import cli_runner, dump_run, make_ref
from dataflow_redis import (AuthenticationFailed, BackpressureConfig, ConfigError, ConnectionFailed,
                            ControlPlane, FeatureSpec, InvalidArgument, PromptTask, RecordTooLarge,
                            StepRegression)
from dataflow_redis.embedded import RedisServer, free_port

PASSWORD = "pw-Zq7-never-printed"


@pytest.fixture(scope="module")
def password_server():
    server = RedisServer(password=PASSWORD).start()
    yield server
    server.stop()


@pytest.fixture
def run(make_cp, redis_url, password_server):
    """A run mid-flight, and the clients that hold its leases."""
    cp = make_cp()
    cp.configure(max_prompt_attempts=3, max_record_bytes=4096)
    cp.configure_backpressure(BackpressureConfig(high_watermark_bytes=100_000, low_watermark_bytes=50_000,
                                                 max_inflight_prompts_per_worker=4, max_train_lease=8))
    reporter = cp.capacity_reporter("shard-0")
    reporter.report(1_000, max_resident_bytes=200_000, avg_age_s=1.5, oldest_age_s=3.0)
    cp.ingest_prompts([{"task_id": f"t{i}", "payload": {"text": f"prompt {i}"}} for i in range(8)])
    worker = cp.rollout_worker("w0", lease_s=600)
    tasks = worker.lease(4)
    worker.commit([make_ref(cp, f"s-{t.task_id}", t.task_id) for t in tasks[:2]])
    worker.fail([tasks[2].task_id], "cannot render", retryable=False)
    trainer = cp.trainer("tr0", lease_s=600)
    trainer.lease(2)
    trainer.ack(["s-t0"], global_step=5, optimizer_durable=True)
    cp.pause("maintenance")
    cp.resume("done")
    return types.SimpleNamespace(cp=cp, worker=worker, trainer=trainer, reporter=reporter,
                                 url=redis_url, password_server=password_server)


def ref(r, sample_id="s-new", task_id=None, **changes):
    return replace(make_ref(r.cp, sample_id, task_id), **changes)


# (case id, call, exception class, regex the message must match)
CASES = [
    # ---- ingest: wrong types, bad ids, non-JSON values, tensors, oversized records
    ("ingest-a-string", lambda r: r.cp.ingest_prompts("t9"), InvalidArgument, "must be a list"),
    ("ingest-a-number-item", lambda r: r.cp.ingest_prompts([42]), InvalidArgument, "PromptTask or a dict, got int"),
    ("ingest-empty-id", lambda r: r.cp.ingest_prompts([{"task_id": ""}]), InvalidArgument, "invalid task id ''"),
    ("ingest-id-with-space", lambda r: r.cp.ingest_prompts([{"task_id": "t 9"}]), InvalidArgument, "invalid task id"),
    ("ingest-id-too-long", lambda r: r.cp.ingest_prompts([{"task_id": "t" * 300}]), InvalidArgument,
     "1-256 printable"),
    ("ingest-unknown-field", lambda r: r.cp.ingest_prompts([{"task_id": "t9", "colour": "red"}]),
     InvalidArgument, "unknown prompt task field.*colour"),
    ("ingest-nan", lambda r: r.cp.ingest_prompts([{"task_id": "t9", "payload": {"x": math.nan}}]),
     InvalidArgument, r"payload\.x: nan cannot be stored as JSON"),
    ("ingest-infinity", lambda r: r.cp.ingest_prompts([{"task_id": "t9", "payload": [1.0, math.inf]}]),
     InvalidArgument, r"payload\[1\]: inf cannot be stored as JSON"),
    ("ingest-bytes", lambda r: r.cp.ingest_prompts([{"task_id": "t9", "payload": b"raw"}]),
     InvalidArgument, "a bytes cannot be stored as JSON"),
    ("ingest-set", lambda r: r.cp.ingest_prompts([{"task_id": "t9", "payload": {"a", "b"}}]),
     InvalidArgument, "a set cannot be stored as JSON"),
    ("ingest-int-key", lambda r: r.cp.ingest_prompts([{"task_id": "t9", "payload": {1: "x"}}]),
     InvalidArgument, "key 1 is not a string"),
    ("ingest-object", lambda r: r.cp.ingest_prompts([{"task_id": "t9", "payload": object()}]),
     InvalidArgument, "a object cannot be stored as JSON"),
    ("ingest-lone-surrogate", lambda r: r.cp.ingest_prompts([{"task_id": "t9", "payload": "\ud800"}]),
     InvalidArgument, "not valid Unicode"),
    ("ingest-ndarray", lambda r: r.cp.ingest_prompts([{"task_id": "t9", "payload": np.zeros((2, 3))}]),
     TypeError, r"task\[t9\]\.payload: a numpy\.ndarray is a tensor/array"),
    ("ingest-numpy-scalar-nested", lambda r: r.cp.ingest_prompts(
        [{"task_id": "t9", "metadata": {"deep": [{"score": np.float32(1.0)}]}}]),
     TypeError, r"task\[t9\]\.metadata\.deep\[0\]\.score: a numpy\.float32"),
    ("ingest-negative-max-length", lambda r: r.cp.ingest_prompts([{"task_id": "t9", "max_length": -5}]),
     InvalidArgument, "max_length must be an int >= 1"),
    ("ingest-negative-bytes", lambda r: r.cp.ingest_prompts([{"task_id": "t9", "estimated_bytes": -1}]),
     InvalidArgument, "estimated_bytes must be an int from 0 to 549755813888"),
    ("ingest-bytes-over-cap", lambda r: r.cp.ingest_prompts([{"task_id": "t9", "estimated_bytes": 2**39 + 1}]),
     InvalidArgument, "estimated_bytes must be an int from 0 to 549755813888 or None, got 549755813889"),
    ("ingest-oversized", lambda r: r.cp.ingest_prompts([{"task_id": "t9", "payload": "x" * 5000}]),
     RecordTooLarge, "record t9 is 50\\d\\d bytes of JSON, over max_record_bytes=4096"),
    ("ingest-other-run", lambda r: r.cp.ingest_prompts([PromptTask(task_id="t9", run_id="other-run")]),
     InvalidArgument, "belongs to run 'other-run'"),
    ("ingest-good-then-bad", lambda r: r.cp.ingest_prompts(
        [{"task_id": "t9"}, {"task_id": "t10", "payload": np.ones(2)}]), TypeError, r"task\[t10\]\.payload"),
    ("ingest-not-a-list", lambda r: r.cp.ingest_prompts(5), InvalidArgument, "must be a list .*got int"),
    ("ingest-none", lambda r: r.cp.ingest_prompts(None), InvalidArgument, "must be a list .*got NoneType"),
    ("ingest-non-str-field", lambda r: r.cp.ingest_prompts([{1: "x"}]), InvalidArgument,
     "unknown prompt task field.*1"),
    # Python's "$" matches before a final newline: the id checks must not.
    ("ingest-id-final-newline", lambda r: r.cp.ingest_prompts([{"task_id": "t9\n"}]), InvalidArgument,
     "invalid task id"),
    ("commit-id-final-newline", lambda r: r.worker.commit([ref(r, "s-t3\n", "t3")]), InvalidArgument,
     "invalid sample id"),
    ("ingest-attempt", lambda r: r.cp.ingest_prompts([{"task_id": "t9", "attempt": 2}]), InvalidArgument,
     "attempt is counted by the control plane, got 2"),
    ("ingest-nested-mappingproxy", lambda r: r.cp.ingest_prompts(
        [{"task_id": "t9", "payload": {"a": types.MappingProxyType({"b": 1})}}]), InvalidArgument,
     r"payload\.a: a mappingproxy cannot be stored as JSON; use a dict"),
    ("ingest-empty-request-id", lambda r: r.cp.ingest_prompts([{"task_id": "t9"}], request_id=""),
     InvalidArgument, "invalid request id ''"),
    # ---- counts: zero, negative, huge, wrong type
    ("lease-zero", lambda r: r.worker.lease(0), InvalidArgument, "max_tasks must be an int from 1 to 10000, got 0"),
    ("lease-negative", lambda r: r.worker.lease(-3), InvalidArgument, "max_tasks must be an int from 1"),
    ("lease-huge", lambda r: r.worker.lease(10**12), InvalidArgument, "max_tasks must be an int from 1"),
    ("lease-float", lambda r: r.worker.lease(2.5), InvalidArgument, "got 2.5"),
    ("lease-string", lambda r: r.worker.lease("4"), InvalidArgument, "got '4'"),
    ("lease-bool", lambda r: r.worker.lease(True), InvalidArgument, "got True"),
    ("train-lease-zero", lambda r: r.trainer.lease(0), InvalidArgument, "max_refs must be an int from 1"),
    ("train-lease-negative-timeout", lambda r: r.trainer.lease(2, timeout_s=-1), InvalidArgument,
     "timeout_s must be a number of seconds"),
    ("train-lease-nan-timeout", lambda r: r.trainer.lease(2, timeout_s=math.nan), InvalidArgument,
     "timeout_s must be a number of seconds"),
    ("worker-zero-lease-s", lambda r: r.cp.rollout_worker("w9", lease_s=0), InvalidArgument,
     "lease_s must be a number of seconds"),
    ("worker-nan-lease-s", lambda r: r.cp.rollout_worker("w9", lease_s=math.nan), InvalidArgument, "lease_s"),
    ("trainer-huge-lease-s", lambda r: r.cp.trainer("tr9", lease_s=1e12), InvalidArgument, "lease_s"),
    ("worker-bad-id", lambda r: r.cp.rollout_worker("worker one"), InvalidArgument, "invalid worker id"),
    ("events-zero", lambda r: r.cp.events(count=0), InvalidArgument, "count must be an int from 1"),
    ("leases-bad-kind", lambda r: r.cp.leases("both"), InvalidArgument, "kind must be 'prompt' or 'train'"),
    # ---- commit: wrong types, tensors, NaN, oversized, mixed schema, other run
    ("commit-a-string", lambda r: r.worker.commit("s-t1"), InvalidArgument, "refs must be a list of SampleRef"),
    ("commit-a-dict", lambda r: r.worker.commit([{"sample_id": "s-t3"}]), InvalidArgument,
     "expected a SampleRef, got dict"),
    ("commit-tensor-in-metadata", lambda r: r.worker.commit([ref(r, "s-t3", "t3", metadata={"h": np.zeros(4)})]),
     TypeError, r"ref\[s-t3\]\.metadata\.h: a numpy\.ndarray"),
    ("commit-numpy-float-in-metadata", lambda r: r.worker.commit(
        [ref(r, "s-t3", "t3", metadata={"s": np.float64(1.5)})]), TypeError,
     r"ref\[s-t3\]\.metadata\.s: a numpy\.float64"),
    ("commit-nan-in-versions", lambda r: r.worker.commit([ref(r, "s-t3", "t3", versions={"lr": math.nan})]),
     InvalidArgument, r"ref\[s-t3\]\.versions\.lr: nan"),
    ("commit-oversized", lambda r: r.worker.commit([ref(r, "s-t3", "t3", metadata={"blob": "x" * 5000})]),
     RecordTooLarge, "record s-t3 is \\d+ bytes of JSON, over max_record_bytes=4096"),
    ("commit-negative-tokens", lambda r: r.worker.commit([ref(r, "s-t3", "t3", num_tokens=-1)]),
     InvalidArgument, "num_tokens must be an int >= 0"),
    ("commit-mixed-schema", lambda r: r.worker.commit(
        [ref(r, "s-t3", "t3"), ref(r, "s-x", "t3", schema_version=2)]), InvalidArgument, "mixed schema versions"),
    ("commit-other-run", lambda r: r.worker.commit([ref(r, "s-t3", "t3", run_id="other")]), InvalidArgument,
     "belongs to run 'other'"),
    ("commit-bad-dtype", lambda r: r.worker.commit(
        [ref(r, "s-t3", "t3", feature_specs=(FeatureSpec("h", (4,), "complex128"),))]),
     InvalidArgument, "unsupported dtype 'complex128'"),
    ("commit-dtype-a-list", lambda r: r.worker.commit(
        [ref(r, "s-t3", "t3", feature_specs=(FeatureSpec("h", (4,), ["float32"]),))]),
     InvalidArgument, "unsupported dtype \\['float32'\\]"),
    ("lease-empty-request-id", lambda r: r.worker.lease(1, request_id=""), InvalidArgument,
     "invalid request id ''"),
    ("ack-int-request-id", lambda r: r.trainer.ack(["s-t1"], request_id=0), InvalidArgument,
     "invalid request id 0"),
    ("commit-empty-strategy", lambda r: r.worker.commit([ref(r, "s-t3", "t3", strategy="")]), InvalidArgument,
     "strategy must be a non-empty string"),
    # ---- ack / fail: bad ids, bad steps, bad flags, step regression
    ("ack-a-string", lambda r: r.trainer.ack("s-t1"), InvalidArgument, "sample ids must be a list"),
    ("ack-int-ids", lambda r: r.trainer.ack([1, 2]), InvalidArgument, "invalid sample id 1"),
    ("ack-negative-step", lambda r: r.trainer.ack(["s-t1"], global_step=-1), InvalidArgument,
     "global_step must be an int >= 0"),
    ("ack-string-step", lambda r: r.trainer.ack(["s-t1"], global_step="6"), InvalidArgument, "global_step"),
    ("ack-huge-step", lambda r: r.trainer.ack(["s-t1"], global_step=2**60), InvalidArgument, "global_step"),
    ("ack-durable-not-bool", lambda r: r.trainer.ack(["s-t1"], optimizer_durable="yes"), InvalidArgument,
     "optimizer_durable must be True or False"),
    ("ack-step-regression", lambda r: r.trainer.ack(["s-t1"], global_step=3), StepRegression,
     "global_step 3 is below the recorded global_step 5"),
    ("ack-too-many", lambda r: r.trainer.ack([f"s{i}" for i in range(10_001)]), InvalidArgument,
     "at most 10000 sample ids per call"),
    ("fail-reason-not-str", lambda r: r.worker.fail(["t3"], 404, True), InvalidArgument, "reason must be a string"),
    ("fail-retryable-not-bool", lambda r: r.trainer.fail(["s-t1"], "x", "no"), InvalidArgument,
     "retryable must be True or False"),
    # Batch sizes of the looping operations: 0 or less would loop for ever.
    ("reclaim-zero-batch", lambda r: r.cp.reclaim_expired(batch=0), InvalidArgument,
     "batch must be an int from 1 to 10000, got 0"),
    ("requeue-undurable-negative-batch", lambda r: r.cp.requeue_undurable(batch=-1), InvalidArgument,
     "batch must be an int from 1 to 10000, got -1"),
    ("migrate-zero-batch", lambda r: r.cp.migrate(batch=0), InvalidArgument, "batch must be an int from 1"),
    ("requeue-undurable-str-step", lambda r: r.cp.requeue_undurable(after_step="3"), InvalidArgument,
     "after_step must be an int"),
    # ---- capacity reports
    ("report-negative", lambda r: r.reporter.report(-1), InvalidArgument, "resident_bytes must be an int"),
    ("report-float", lambda r: r.reporter.report(1.5), InvalidArgument, "resident_bytes must be an int"),
    ("report-nan-age", lambda r: r.reporter.report(10, avg_age_s=math.nan), InvalidArgument, "avg_age_s"),
    ("report-huge-age", lambda r: r.reporter.report(10, avg_age_s=1e308), InvalidArgument,
     "avg_age_s must be a number of seconds from 0 to 1e\\+09"),
    ("report-zero-seq", lambda r: r.reporter.report(10, seq=0), InvalidArgument, "seq must be an int >= 1"),
    ("report-health-empty", lambda r: r.reporter.report_health({}), InvalidArgument,
     "health must be a dict with at least 'resident_bytes'"),
    ("reporter-bad-id", lambda r: r.cp.capacity_reporter("shard {0}"), InvalidArgument, "invalid store id"),
    # ---- config: low > high, negative, NaN, unknown field, wrong type
    ("config-unknown-field", lambda r: r.cp.configure(max_attempts=3), ConfigError,
     r"unknown run setting\(s\) \['max_attempts'\]"),
    ("config-zero-attempts", lambda r: r.cp.configure(max_prompt_attempts=0), ConfigError,
     "max_prompt_attempts must be an integer from 1 to"),
    ("config-string-attempts", lambda r: r.cp.configure(max_prompt_attempts="3"), ConfigError,
     "max_prompt_attempts must be an integer"),
    ("config-nan-ttl", lambda r: r.cp.configure(reply_ttl_s=math.nan), ConfigError, "reply_ttl_s must be a number"),
    ("bp-low-above-high", lambda r: r.cp.configure_backpressure(
        BackpressureConfig(high_watermark_bytes=10, low_watermark_bytes=20)), ConfigError,
     "low_watermark_bytes 20 > high_watermark_bytes 10"),
    ("set-config-low-above-high-exact", lambda r: r.cp.set_config(
        "op", high_watermark_bytes=100_000_000_000_000, low_watermark_bytes=100_000_000_000_001), ConfigError,
     "low_watermark_bytes 100000000000001 > high_watermark_bytes 100000000000000"),
    ("bp-negative-high", lambda r: BackpressureConfig(high_watermark_bytes=-1), ConfigError,
     "high_watermark_bytes must be an integer from 1 to"),
    ("bp-default-task-bytes-over-cap", lambda r: BackpressureConfig(default_task_bytes=2**39 + 1), ConfigError,
     "default_task_bytes must be an integer from 0 to 549755813888 or None"),
    ("bp-low-without-high", lambda r: BackpressureConfig(low_watermark_bytes=5), ConfigError,
     "needs high_watermark_bytes"),
    ("bp-not-a-config", lambda r: r.cp.configure_backpressure({"high_watermark_bytes": 5}), ConfigError,
     "takes a BackpressureConfig"),
    ("set-config-low-above-stored-high", lambda r: r.cp.set_config("op", low_watermark_bytes=200_000),
     ConfigError, "low_watermark_bytes 200000 > high_watermark_bytes 100000"),
    # ---- run ids, namespaces, URLs, credentials, a Redis that is not there
    ("run-id-with-braces", lambda r: ControlPlane(r.cp.redis, "run{1}"), InvalidArgument, "invalid run id"),
    ("run-id-empty", lambda r: ControlPlane(r.cp.redis, ""), InvalidArgument, "invalid run id ''"),
    ("run-id-too-long", lambda r: ControlPlane(r.cp.redis, "r" * 200), InvalidArgument, "1-128 characters"),
    ("run-id-none", lambda r: ControlPlane(r.cp.redis, None), InvalidArgument, "invalid run id None"),
    ("run-id-final-newline", lambda r: ControlPlane(r.cp.redis, "run\n"), InvalidArgument, "invalid run id"),
    ("namespace-final-newline", lambda r: ControlPlane(r.cp.redis, "ok", namespace="dfr\n"), InvalidArgument,
     "invalid namespace"),
    ("namespace-with-colon-space", lambda r: ControlPlane(r.cp.redis, "ok", namespace="a b"), InvalidArgument,
     "invalid namespace"),
    ("negative-retry-s", lambda r: ControlPlane(r.cp.redis, "ok", retry_s=-1), InvalidArgument, "retry_s"),
    ("url-http-scheme", lambda r: ControlPlane.from_url("http://127.0.0.1:6379", "ok"), InvalidArgument,
     "bad Redis URL"),
    ("url-empty", lambda r: ControlPlane.from_url("", "ok"), InvalidArgument, "bad Redis URL"),
    ("url-cluster-flag-unclear", lambda r: ControlPlane.from_url("redis://127.0.0.1:6379/0?cluster=maybe", "ok"),
     InvalidArgument, "cluster='maybe'; use cluster=true or cluster=false"),
    ("url-cluster-on-a-unix-socket", lambda r: ControlPlane.from_url("unix:///tmp/r.sock?cluster=true", "ok"),
     InvalidArgument, "cluster=true needs redis:// or rediss://"),
    ("url-cluster-nobody-there", lambda r: ControlPlane.from_url(f"redis://127.0.0.1:{free_port()}/0?cluster=1", "ok"),
     ConnectionFailed, "cannot reach the Redis Cluster through this URL"),
    ("url-database-not-a-number", lambda r: ControlPlane.from_url("redis://127.0.0.1:6379/abc", "ok"),
     InvalidArgument, "database 'abc' is not a number"),
    ("url-ipv6-unclosed", lambda r: ControlPlane.from_url("redis://[::1:6379/0", "ok"), InvalidArgument,
     "bad Redis URL: Invalid IPv6 URL"),
    ("url-database-out-of-range", lambda r: ControlPlane.from_url(r.url.rsplit("/", 1)[0] + "/99", "ok").status(),
     InvalidArgument, "database number in the Redis URL does not exist on this server"),
    ("wrong-password", lambda r: ControlPlane.from_url(
        f"redis://:wrong-{PASSWORD[:4]}@127.0.0.1:{r.password_server.port}/0", "ok").status(),
     AuthenticationFailed, "Redis refused the credentials"),
    ("no-password", lambda r: ControlPlane.from_url(f"redis://127.0.0.1:{r.password_server.port}/0", "ok").status(),
     AuthenticationFailed, "the server requires a password and the URL gives none; put it in the URL"),
    ("wrong-password-on-a-read", lambda r: ControlPlane.from_url(
        f"redis://:wrong@127.0.0.1:{r.password_server.port}/0", "ok").exists(),
     AuthenticationFailed, "Redis refused the credentials"),
    ("redis-not-there-on-a-read", lambda r: ControlPlane.from_url(f"redis://127.0.0.1:{free_port()}/0", "ok",
                                                                  retry_s=0.3).settings(),
     ConnectionFailed, r"Redis unreachable for 0\.\ds .*check that it is running"),
    ("redis-not-there", lambda r: ControlPlane.from_url(f"redis://127.0.0.1:{free_port()}/0", "ok",
                                                        retry_s=0.3).status(),
     ConnectionFailed, "Redis unreachable .*check that it is running"),
]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_refused_and_changes_nothing(run, case):
    _, call, exc_class, pattern = case
    before = dump_run(run.cp)
    with pytest.raises(exc_class, match=pattern) as info:
        call(run)
    assert type(info.value) is exc_class or exc_class is TypeError
    message = str(info.value)
    assert message and "Traceback" not in message and "user_script" not in message
    assert PASSWORD not in message
    assert dump_run(run.cp) == before


def test_there_are_at_least_forty_api_cases():
    assert len(CASES) >= 40


UNKNOWN_ID_CASES = [
    ("fail-unknown-task", lambda r: r.worker.fail(["nope"], "x", True)),
    ("fail-task-held-by-another", lambda r: r.cp.rollout_worker("w9").fail(["t3"], "x", False)),
    ("fail-unknown-sample", lambda r: r.trainer.fail(["nope"], "x", False)),
    ("fail-acked-sample", lambda r: r.trainer.fail(["s-t0"], "x", True)),
    ("requeue-unknown-dead-letter", lambda r: r.cp.requeue_dead_letters(["nope"])),
    ("fail-sample-held-by-another", lambda r: r.cp.trainer("tr9").fail(["s-t1"], "x", True)),
]


@pytest.mark.parametrize("case", UNKNOWN_ID_CASES, ids=[c[0] for c in UNKNOWN_ID_CASES])
def test_unknown_or_foreign_ids_affect_nothing(run, case):
    """Not errors (a late duplicate from an at-least-once sender must be harmless),
    but they return nothing and write nothing."""
    _, call = case
    before = dump_run(run.cp)
    assert call(run) == []
    assert dump_run(run.cp) == before


def test_ack_and_commit_of_unknown_ids_only_leave_an_audit_trace(run):
    before = dump_run(run.cp)
    k = run.cp.keys
    assert run.trainer.ack(["nope", "s-t0"]) == []              # unknown, and already acked
    assert run.worker.commit([ref(run, "s-zz", "unknown-task")]) == []
    after = dump_run(run.cp)
    changed = {key for key in before.keys() | after.keys() if before.get(key) != after.get(key)}
    # Both calls changed state (the ack log, the fenced count): their empty replies are
    # cached, to expire.
    replies = {key for key in changed if ":reply:" in key}
    assert len(replies) == 2 and all(0 < run.cp.redis.pttl(key) <= 30_000 for key in replies)
    assert changed - {key for key in changed if ":reply:" in key} == {k.ack_log, k.counters}
    assert len(after[k.ack_log][1]) == len(before[k.ack_log][1]) + 1
    assert after[k.ack_log][1][-1][1]["acked"] == "0"
    diff = {f: v for f, v in after[k.counters][1].items() if before[k.counters][1].get(f) != v}
    assert diff == {"fenced_commits": "1"}


# --------------------------------------------------------------------------- CLI
from dataflow_redis import cli as cli_module  # noqa: E402


def cli(*args):

    env = {"DATAFLOW_REDIS_URL": None, "DATAFLOW_RUN": None, "DATAFLOW_NAMESPACE": None,
           "DATAFLOW_REDIS_DEBUG": None}
    return cli_runner(env=env).invoke(cli_module.main, list(args))


CLI_CASES = [
    # (case id, args (URL and run filled in), exit code, regex on the one output line)
    ("config-set-zero", ["config", "set", "max_prompt_attempts=0"], 2,
     "max_prompt_attempts must be an integer from 1 to 9007199254740992"),
    ("config-set-above-the-limit", ["config", "set", "high_watermark_bytes=9007199254740993"], 2,
     "high_watermark_bytes must be an integer from 1 to 9007199254740992"),
    ("config-set-empty-value", ["config", "set", "high_watermark_bytes="], 2,
     "high_watermark_bytes has no value; give one, or high_watermark_bytes=none to unset it"),
    ("config-set-twice", ["config", "set", "max_train_lease=4", "max_train_lease=8"], 2,
     "max_train_lease is given twice"),
    ("config-set-not-a-number", ["config", "set", "max_train_lease=lots"], 2, "max_train_lease must be an integer"),
    ("config-set-unknown", ["config", "set", "colour=red"], 2, "unknown config field 'colour'"),
    ("config-set-low-above-high", ["config", "set", "low_watermark_bytes=200000"], 2,
     "low_watermark_bytes 200000 > high_watermark_bytes 100000"),
    ("config-set-no-equals", ["config", "set", "max_prompt_attempts"], 2, "KEY=VALUE"),
    ("pause-without-reason", ["pause"], 2, "--reason"),
    ("pause-with-an-empty-reason", ["pause", "--reason", " "], 2, "--reason is empty"),
    ("leases-count-zero", ["leases", "--count", "0"], 2, "--count"),
    ("events-count-negative", ["events", "--count", "-5"], 2, "--count"),
    ("bad-run-id", ["--run", "bad{run}", "status"], 2, "invalid run id"),
    ("unknown-run", ["--run", "no-such-run", "status"], 5, "run 'no-such-run' has no state"),
    ("bad-url", ["--redis-url", "http://127.0.0.1:1", "status"], 2, "bad Redis URL"),
    ("wrong-password", ["--redis-url", "PASSWORD_URL", "status"], 4, "refused the credentials"),
    ("redis-not-there", ["--redis-url", "DEAD_URL", "status"], 3, "cannot reach Redis"),
    ("database-out-of-range", ["--redis-url", "DB99_URL", "status"], 2, "does not exist on this server"),
    ("database-not-a-number", ["--redis-url", "DBABC_URL", "status"], 2, "database 'abc' is not a number"),
    ("url-ipv6-unclosed", ["--redis-url", "redis://[::1:6379/0", "status"], 2, "bad Redis URL: Invalid IPv6"),
    ("url-without-scheme", ["--redis-url", "127.0.0.1:6379/0", "status"], 2,
     r"^Error: bad Redis URL: it must start with redis://, rediss:// or unix:// \(it has none\); use redis://"),
    ("url-scheme-without-slashes", ["--redis-url", "redis:/127.0.0.1:6379/0", "status"], 2,
     r"bad Redis URL: it must start with redis://, rediss:// or unix:// \(it starts with 'redis:'\)"),
    ("watch-interval-nan", ["watch", "--interval", "nan"], 2, "'nan' is not a number"),
    ("watch-interval-inf", ["watch", "--interval", "inf"], 2, "--interval"),
]


@pytest.mark.parametrize("case", CLI_CASES, ids=[c[0] for c in CLI_CASES])
def test_cli_bad_input_is_one_clear_line_and_changes_nothing(run, case):
    _, args, code, pattern = case
    wrong_url = f"redis://:{PASSWORD}-wrong@127.0.0.1:{run.password_server.port}/0"
    base = run.url.rsplit("/", 1)[0]
    urls = {"PASSWORD_URL": wrong_url, "DEAD_URL": f"redis://127.0.0.1:{free_port()}/0",
            "DB99_URL": base + "/99", "DBABC_URL": base + "/abc"}
    args = [urls.get(a, a) for a in args]
    full = ["--redis-url", run.url, "--run", run.cp.run_id] + args
    before = dump_run(run.cp)
    result = cli(*full)
    assert dump_run(run.cp) == before
    assert result.exit_code == code, result.output
    assert "Traceback" not in result.output and PASSWORD not in result.output
    lines = [line for line in result.output.strip().splitlines() if line.strip()]
    assert lines and any(re.search(pattern, line) for line in lines), result.output
