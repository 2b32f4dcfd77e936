"""Process entry points for the backpressure and soak tests (real OS processes).

Every function here is a top-level function of an importable module, so it runs under
multiprocessing's "spawn" and "forkserver" contexts alike. Each one opens its own
Redis connection, waits on a shared ``go`` event so that all processes start
together, and hands its observations back through a multiprocessing queue as one
plain dict.

Roles:
- ``config_follower``: obeys commands from a pipe; shows that a config change made by
  another process is obeyed on the next call.
- ``latch_worker`` / ``latch_driver``: many workers lease under a per-worker cap while
  the driver moves resident bytes across the watermarks.
- ``pipeline_worker`` / ``pipeline_trainer``: the full pipeline with a simulated
  feature store: lease, put bytes (the store reports capacity), commit; lease
  refs, ack, evict.
"""

from __future__ import annotations

import multiprocessing
import random
import time
import traceback
from typing import Any

from dataflow_redis import ControlPlane, FeatureSpec, SampleRef
from dataflow_redis.simstore import SimulatedFeatureStore

JOIN_TIMEOUT_S = 120.0
"""Hang guard for joining child processes (never a speed assertion)."""


def context() -> Any:
    """The multiprocessing context for the tests: forkserver (children fork from a
    server that already imported the library, so starting 16 of them is cheap on a
    loaded 2-core machine), spawn where forkserver is unavailable."""
    try:
        ctx = multiprocessing.get_context("forkserver")
        ctx.set_forkserver_preload(["bp_procs", "dataflow_redis", "redis"])
        return ctx
    except ValueError:
        return multiprocessing.get_context("spawn")


def sample_ref(run_id: str, task_id: str, nbytes: int) -> SampleRef:
    """The one sample a task produces: id ``<task_id>.s``, ``nbytes`` estimated bytes."""
    sample_id = f"{task_id}.s"
    return SampleRef(
        sample_id=sample_id, run_id=run_id, source_task_id=task_id,
        feature_store_uri="sim://store", feature_keys=(f"{sample_id}/hidden",),
        feature_specs=(FeatureSpec("hidden", (4, 8), "bfloat16"),), strategy="eagle3",
        estimated_bytes=nbytes,
    )


def _report(results: Any, role: str, body) -> None:
    """Run ``body()`` and put its dict (or the traceback) on ``results``."""
    try:
        out = body()
        out["role"] = role
        out["error"] = None
    except BaseException:  # noqa: BLE001 -- the parent asserts on this text
        out = {"role": role, "error": traceback.format_exc()}
    results.put(out)


# --------------------------------------------------------------- config follower
def config_follower(url: str, run_id: str, conn: Any) -> None:
    """Serve commands from ``conn`` until "stop":
    ("lease", n) -> {"granted": k, "held": len(held), "version": stored config version};
    ("commit_all",) -> {"committed": k}."""
    cp = ControlPlane.from_url(url, run_id)
    worker = cp.rollout_worker("follower")
    held: dict[str, Any] = {}
    while True:
        command = conn.recv()
        try:
            if command[0] == "lease":
                tasks = worker.lease(command[1])
                held.update({t.task_id: t for t in tasks})
                conn.send({"granted": len(tasks), "held": len(worker.held), "version": cp.config_version()})
            elif command[0] == "commit_all":
                refs = [sample_ref(run_id, task_id, 1) for task_id in held]
                held.clear()
                conn.send({"committed": len(worker.commit(refs)) if refs else 0})
            else:
                conn.send({"stopped": True})
                return
        except Exception:  # noqa: BLE001 -- sent to the parent, which fails the test
            conn.send({"error": traceback.format_exc()})


# ------------------------------------------------------------------ latch test
def latch_worker(url: str, run_id: str, worker_id: str, cap: int, seed: int,
                 go: Any, stop: Any, results: Any) -> None:
    """Lease as fast as possible (asking for up to cap + 2 tasks per call), then commit
    or retryably fail a random part of what is held. After every lease the number of
    tasks held is recorded: it must never exceed ``cap``."""

    def body() -> dict:
        rng = random.Random(seed)
        cp = ControlPlane.from_url(url, run_id)
        worker = cp.rollout_worker(worker_id, lease_s=120.0)
        max_held, calls, granted, empty = 0, 0, 0, 0
        go.wait(JOIN_TIMEOUT_S)
        while not stop.is_set():
            tasks = worker.lease(rng.randint(1, cap + 2))
            calls += 1
            granted += len(tasks)
            empty += not tasks
            max_held = max(max_held, len(worker.held))
            held = worker.held
            if held and rng.random() < 0.7:
                part = rng.sample(held, rng.randint(1, len(held)))
                if rng.random() < 0.5:
                    worker.commit([sample_ref(run_id, t, 1) for t in part])
                else:
                    worker.fail(part, "latch test recycles the task", retryable=True)
            if not tasks:
                time.sleep(0.001)
        return {"worker_id": worker_id, "max_held": max_held, "calls": calls,
                "granted": granted, "empty": empty}

    _report(results, "latch_worker", body)


def latch_driver(url: str, run_id: str, low: int, high: int, crossings: int, cap: int,
                 dwell_s: float, go: Any, results: Any) -> None:
    """Move the run's resident bytes across the watermarks ``crossings`` times, through
    the band on the way up and on the way down, checking the latch after every report.

    While paused it also checks that no prompt lease is granted (the grant counter
    stands still) and it samples the worker_inflight hash (must stay <= cap)."""

    def body() -> dict:
        cp = ControlPlane.from_url(url, run_id)
        reporter = cp.capacity_reporter("driver-shard")
        mid = (low + high) // 2
        # (resident, latch expected after the report)
        up = [(low - 1, False), (mid, False), (high - 1, False), (high, True), (high + 100, True)]
        down = [(mid, True), (low + 1, True), (low, False), (low - 1, False)]
        mismatches, max_inflight, grants_while_paused, paused_checks = [], 0, 0, 0
        go.wait(JOIN_TIMEOUT_S)
        deadline = time.monotonic() + 30.0
        while int(cp.redis.hget(cp.keys.counters, "fence") or 0) == 0 and time.monotonic() < deadline:
            time.sleep(0.005)  # wait until the workers really lease
        for _ in range(crossings):
            for resident, expect in up + down:
                report = reporter.report(resident)
                if report.paused != expect or not report.accepted:
                    mismatches.append((resident, expect, report.paused, report.accepted))
                inflight = cp.redis.hvals(cp.keys.worker_inflight)
                max_inflight = max([max_inflight, *(int(v) for v in inflight)])
                if report.paused:
                    before = int(cp.redis.hget(cp.keys.counters, "fence") or 0)
                    time.sleep(dwell_s)
                    after = int(cp.redis.hget(cp.keys.counters, "fence") or 0)
                    grants_while_paused += after - before
                    paused_checks += 1
                else:
                    time.sleep(dwell_s)
        return {"mismatches": mismatches, "max_inflight_sampled": max_inflight,
                "grants_while_paused": grants_while_paused, "paused_checks": paused_checks}

    _report(results, "latch_driver", body)


# ------------------------------------------------------------------- pipeline
def pipeline_worker(url: str, run_id: str, worker_id: str, opts: dict,
                    go: Any, done: Any, results: Any) -> None:
    """A rollout worker with a simulated store.

    opts: shard, hard_cap (bytes or None), lease_max (tasks per lease call),
    gen_s (seconds of simulated generation per task), poll_s (sleep after an empty
    grant). The sample's real size is the task payload's ``nbytes``. Order per task:
    generate, put the bytes (the store reports capacity), then commit, so the task's
    reservation is released only once its bytes are counted as resident. A put refused
    by the hard cap fails the task retryably (it comes back with attempt + 1)."""

    def body() -> dict:
        cp = ControlPlane.from_url(url, run_id)
        store = SimulatedFeatureStore(cp, opts["shard"], opts.get("hard_cap"))
        worker = cp.rollout_worker(worker_id, lease_s=300.0)
        produced, refused, lease_calls, empty = 0, 0, 0, 0
        max_held, busy_s = 0, 0.0
        go.wait(JOIN_TIMEOUT_S)
        while not done.is_set():
            began = time.monotonic()
            tasks = worker.lease(opts["lease_max"])
            lease_calls += 1
            max_held = max(max_held, len(worker.held))
            if not tasks:
                empty += 1
                time.sleep(opts["poll_s"])
                continue
            for task in tasks:
                if opts["gen_s"]:
                    time.sleep(opts["gen_s"])
                nbytes = int(task.payload["nbytes"])
                ref = sample_ref(run_id, task.task_id, nbytes)
                if store.put(ref.sample_id, nbytes):
                    worker.commit([ref])
                    produced += 1
                else:
                    refused += 1
                    worker.fail([task.task_id], "feature store refused the put (hard cap)", retryable=True)
            busy_s += time.monotonic() - began  # time spent producing, not waiting out a refusal
        return {"worker_id": worker_id, "produced": produced, "refused_puts": refused,
                "lease_calls": lease_calls, "empty_leases": empty, "max_held": max_held,
                "busy_s": round(busy_s, 3)}

    _report(results, "pipeline_worker", body)


def pipeline_trainer(url: str, run_id: str, opts: dict, go: Any, results: Any) -> None:
    """A trainer with a simulated store: lease refs, ack them at the step, evict their
    bytes. opts: shard, hard_cap, expected (samples to ack before stopping), batch
    (refs asked per lease), step_s (sleep per step), act_every (acts only on every
    n-th step), rounds_mark (also record how many were acked after that many steps)."""

    def body() -> dict:
        cp = ControlPlane.from_url(url, run_id)
        store = SimulatedFeatureStore(cp, opts["shard"], opts.get("hard_cap"))
        trainer = cp.trainer("trainer-0", lease_s=300.0)
        acked_ids: set[str] = set()
        duplicates, step, acts, acked_at_mark = 0, 0, 0, None
        go.wait(JOIN_TIMEOUT_S)
        started = time.monotonic()
        deadline = started + JOIN_TIMEOUT_S
        while len(acked_ids) < opts["expected"] and time.monotonic() < deadline:
            step += 1
            if step % opts.get("act_every", 1) == 0:
                acts += 1
                refs = trainer.lease(opts["batch"])
                if refs:
                    ids = [r.sample_id for r in refs]
                    newly = trainer.ack(ids, global_step=step, optimizer_durable=True)
                    duplicates += len(set(newly) & acked_ids) + (len(ids) - len(newly))
                    acked_ids.update(newly)
                    store.evict(ids)
            if step == opts.get("rounds_mark"):
                acked_at_mark = len(acked_ids)
            time.sleep(opts["step_s"])
        return {"acked": len(acked_ids), "duplicates": duplicates, "steps": step, "acts": acts,
                "acked_at_mark": acked_at_mark, "seconds": round(time.monotonic() - started, 3)}

    _report(results, "pipeline_trainer", body)


def run_pipeline(url: str, run_id: str, workers: int, worker_opts: dict, trainer_opts: dict) -> dict:
    """Start ``workers`` pipeline workers and one trainer as OS processes, wait until
    the trainer has acked everything, stop the workers, and return every process's
    result dict: {"trainer": {...}, "workers": [...], "seconds": wall time}."""
    ctx = context()
    results = ctx.Queue()
    go, done = ctx.Event(), ctx.Event()
    procs = [ctx.Process(target=pipeline_worker,
                         args=(url, run_id, f"worker-{i}", worker_opts, go, done, results))
             for i in range(workers)]
    procs.append(ctx.Process(target=pipeline_trainer, args=(url, run_id, trainer_opts, go, results)))
    for p in procs:
        p.start()
    started = time.monotonic()
    go.set()
    collected: list[dict] = []
    trainer = None
    try:
        while trainer is None:
            item = results.get(timeout=JOIN_TIMEOUT_S)
            collected.append(item)
            if item["role"] == "pipeline_trainer" or item["error"]:
                trainer = item
        seconds = time.monotonic() - started
        done.set()
        while len(collected) < len(procs):
            collected.append(results.get(timeout=JOIN_TIMEOUT_S))
    finally:
        done.set()
        for p in procs:
            p.join(JOIN_TIMEOUT_S)
            if p.is_alive():
                p.kill()
                p.join()
    errors = [c["error"] for c in collected if c["error"]]
    assert not errors, "a pipeline process failed:\n" + "\n".join(errors)
    return {"trainer": trainer, "workers": [c for c in collected if c["role"] == "pipeline_worker"],
            "seconds": round(seconds, 3)}
