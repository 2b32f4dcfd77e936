"""Stress: 16 OS processes on one run, 20,000 tasks, random delays and failures.

11 rollout workers, 4 trainers and 1 capacity reporter (a feature store that holds
each sample until a trainer acks or fails it) share one run on a real redis-server.
Workers randomly fail tasks (retryable and terminal) and keep some tasks across
rounds so that their leases run into the per-worker cap; trainers randomly fail refs
(retryable and terminal). Afterwards the test proves from Redis and from every
process's call log that:

* every task is in exactly one final state (sample acked, sample failed, or
  dead-lettered) and nothing is pending, leased or in flight;
* no sample was acked twice (the union of every ack call's reply has no repeat);
* the per-worker cap held on every single lease call (from the lease records);
* the latch transitions are exactly those the recorded capacity history implies.
"""

from __future__ import annotations

import time

import pytest

import reliability_procs as procs
from dataflow_redis import BackpressureConfig

pytestmark = pytest.mark.slow

TASKS = 20_000
WORKERS = 11
TRAINERS = 4
CAP = 8                    # max_inflight_prompts_per_worker
WORKER_REQUEST = 12        # asks for more than the cap: the cap formula decides
REF_BYTES = 1024
HIGH, LOW = 96 * REF_BYTES, 32 * REF_BYTES
MAX_ATTEMPTS = 3


def replay_latch(resident_history: list[int], high: int, low: int) -> tuple[list[tuple[str, int]], list[bool]]:
    """The hysteresis rule applied to a sequence of resident byte reports: returns the
    (transition, resident bytes) pairs and the latch state after each report."""
    paused = False
    transitions, after_each = [], []
    for resident in resident_history:
        if not paused and resident >= high:
            paused = True
            transitions.append(("pause", resident))
        elif paused and resident <= low and resident < high:
            paused = False
            transitions.append(("resume", resident))
        after_each.append(paused)
    return transitions, after_each


def test_sixteen_processes_twenty_thousand_tasks(make_cp, redis_url, tmp_path):
    cp = make_cp()
    cp.configure(max_prompt_attempts=MAX_ATTEMPTS)
    cp.configure_backpressure(BackpressureConfig(
        high_watermark_bytes=HIGH, low_watermark_bytes=LOW, max_inflight_prompts_per_worker=CAP))

    base = {"url": redis_url, "run_id": cp.run_id, "lease_s": 120.0}
    roles = []
    for i in range(WORKERS):
        roles.append((procs.rollout_worker, {
            **base, "worker_id": f"w{i:02d}", "request": WORKER_REQUEST, "p_retry": 0.08,
            "p_terminal": 0.01, "p_keep": 0.2, "delay_ms": 3, "idle_ms": 8, "seed": i,
            "log_path": str(tmp_path / f"w{i:02d}.log")}))
    for i in range(TRAINERS):
        roles.append((procs.trainer, {
            **base, "trainer_id": f"tr{i}", "request": 48, "p_retry": 0.03, "p_terminal": 0.01,
            "delay_ms": 12, "wait_s": 0.05, "seed": 100 + i, "log_path": str(tmp_path / f"tr{i}.log")}))
    roles.append((procs.capacity_reporter, {
        **base, "store_id": "store-0", "ref_bytes": REF_BYTES, "period_ms": 3,
        "log_path": str(tmp_path / "reporter.log")}))
    assert len(roles) >= 16

    ctx = procs.forkserver()
    go = ctx.Event()
    started = time.monotonic()
    processes = procs.start_roles(ctx, roles, go)
    try:
        # Ingest while the processes start up; they begin once every task is pending.
        task_ids = cp.ingest_prompts([{"task_id": f"t{i:05d}", "payload": {"n": i}} for i in range(TASKS)])
        assert len(task_ids) == TASKS
        go.set()
        procs.join_all(processes, timeout_s=240)
    finally:
        procs.kill_all(processes)
    elapsed = time.monotonic() - started

    # 1. Every task in exactly one final state, nothing left in flight.
    final = procs.verify_final_state(cp, set(task_ids))
    assert final["dead"] and final["failed"], "the random failures should reach both terminal states"
    dlq = {d["task_id"]: d for d in cp.dead_letters(count=10_000)}
    exhausted = [d for d in dlq.values() if d.get("attempts_exhausted")]
    assert exhausted, "some task should fail retryably max_prompt_attempts times"
    assert all(d["attempt"] == MAX_ATTEMPTS - 1 and "attempts exhausted" in d["reason"] for d in exhausted)

    # 2. No sample acked twice: every ack reply, from every trainer, is disjoint.
    acks = procs.acked_from_logs(tmp_path / f"tr{i}.log" for i in range(TRAINERS))
    assert len(acks) == len(set(acks)), "a sample was reported newly acked twice"
    assert set(acks) == final["acked"]

    # No task was ever granted beyond max_prompt_attempts tries, and no grant repeated
    # a task that was already done.
    worker_logs = {i: list(procs.read_log(tmp_path / f"w{i:02d}.log")) for i in range(WORKERS)}
    grants = [g for lines in worker_logs.values() for line in lines if line["op"] == "lease"
              for g in line["granted"]]
    assert all(attempt < MAX_ATTEMPTS for _, attempt, _ in grants)
    tokens = [token for _, _, token in grants]
    assert len(tokens) == len(set(tokens)), "two grants carried the same fencing token"
    committed_by_logs = [t for lines in worker_logs.values() for line in lines if line["op"] == "commit"
                         for t in line["fresh"]]
    assert len(committed_by_logs) == len(set(committed_by_logs)) == len(final["done"])

    # 3. The per-worker cap, on every lease call: held before + granted <= cap.
    capped_calls = 0
    for lines in worker_logs.values():
        for line in (line for line in lines if line["op"] == "lease"):
            granted = len(line["granted"])
            assert line["held"] == line["before"] + granted
            assert line["held"] <= CAP, f"a worker held {line['held']} leases, cap {CAP}"
            assert granted <= max(0, min(WORKER_REQUEST, CAP - line["before"]))
            if line["before"] > 0 and granted == CAP - line["before"]:
                capped_calls += 1
    assert capped_calls > 0, "the cap never limited a grant: the test did not exercise it"
    reporter_log = list(procs.read_log(tmp_path / "reporter.log"))
    sampled = [line["max"] for line in reporter_log if line["op"] == "inflight"]
    assert sampled and max(sampled) <= CAP

    # 4. Latch transitions agree with the recorded capacity history.
    reports = [line for line in reporter_log if line["op"] == "report"]
    assert [line["seq"] for line in reports] == sorted({line["seq"] for line in reports})
    assert all(line["accepted"] for line in reports)
    expected, latch_after = replay_latch([line["resident"] for line in reports], HIGH, LOW)
    assert [line["paused"] for line in reports] == latch_after
    events = [(e["type"], int(e["resident_bytes"])) for _, e in cp.redis.xrange(cp.keys.events)
              if e["type"] in ("pause", "resume")]
    assert events == expected
    bp = cp.status()["backpressure"]
    pauses = sum(1 for kind, _ in expected if kind == "pause")
    resumes = len(expected) - pauses
    assert (bp["pause_transitions"], bp["resume_transitions"]) == (pauses, resumes)
    assert pauses >= 2, "the load should cross the watermarks back and forth"

    print(f"\nstress: {len(roles)} processes, {TASKS} tasks in {elapsed:.1f}s; "
          f"acked {len(final['acked'])}, sample-failed {len(final['failed'])}, "
          f"dead-lettered {len(final['dead'])} ({len(exhausted)} attempts exhausted); "
          f"{len(grants)} grants, {capped_calls} capped lease calls, "
          f"{pauses} pauses / {resumes} resumes over {len(reports)} capacity reports")
