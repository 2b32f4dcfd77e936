"""Process entry points for the reliability tests (multiprocessing "spawn"/"forkserver").

Each role runs the real client API in its own OS process and appends one JSON line
per call result to its own log file, written with a single ``os.write`` on an
O_APPEND descriptor, so a process killed with SIGKILL leaves at most its last line
cut short (readers skip it). The tests read the logs and Redis to decide what
happened; a role never asserts anything itself.

Every role takes one ``params`` dict (picklable) with at least ``url``, ``run_id``
and ``log_path``, and optionally a ``go`` Event: it connects, then waits for ``go``
before its first call (so the test can start processes while it ingests). Lease
log lines carry ``at`` (the local clock, seconds), which the tests compare with
lease deadlines from Redis TIME: same machine, same clock.
"""

from __future__ import annotations

import json
import os
import random
import time
from typing import Any, Iterator

from dataflow_redis import ControlPlane, FeatureSpec, SampleRef, idset


class Log:
    """Append-only JSON-lines log, one ``write`` call per line (survives SIGKILL)."""

    def __init__(self, path: str) -> None:
        self.fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)

    def write(self, **record: Any) -> None:
        os.write(self.fd, (json.dumps(record, separators=(",", ":")) + "\n").encode())


def read_log(path: str) -> Iterator[dict]:
    """The complete lines of a log (a line cut short by a kill is skipped)."""
    if not os.path.exists(path):
        return
    with open(path, "rb") as f:
        for line in f:
            if line.endswith(b"\n"):
                yield json.loads(line)


def sample_ref(run_id: str, task_id: str, nbytes: int = 1024) -> SampleRef:
    """The one sample a rollout worker produces for ``task_id`` (id ``s-<task_id>``)."""
    sample_id = f"s-{task_id}"
    return SampleRef(
        sample_id=sample_id, run_id=run_id, source_task_id=task_id,
        feature_store_uri="mem://store", feature_keys=(f"{sample_id}/hidden",),
        feature_specs=(FeatureSpec("hidden", (4, 8), "bfloat16"),), strategy="eagle3",
        estimated_bytes=nbytes,
    )


def _open(params: dict) -> ControlPlane:
    return ControlPlane.from_url(params["url"], params["run_id"], retry_s=params.get("retry_s", 20.0))


def _prompts_finished(cp: ControlPlane) -> bool:
    # MULTI/EXEC: read apart, a reclaim between the reads could hide a task from both.
    pipe = cp.redis.pipeline(transaction=True)
    pipe.llen(cp.keys.pending)
    pipe.hlen(cp.keys.prompt_leases)
    return sum(pipe.execute()) == 0


def _all_finished(cp: ControlPlane) -> bool:
    pipe = cp.redis.pipeline(transaction=True)
    for key in (cp.keys.pending, cp.keys.train_queue):
        pipe.llen(key)
    for key in (cp.keys.prompt_leases, cp.keys.train_leases):
        pipe.hlen(key)
    return sum(pipe.execute()) == 0


def _started(params: dict, go=None) -> "Log":
    """The role's log, its start line written, once the test lets the roles go (``go``)."""
    log = Log(params["log_path"])
    log.write(op="start", pid=os.getpid())
    if go is not None:
        go.wait(120)
    return log


def _may_stop(params: dict) -> bool:
    """Roles stop once the run is drained, and, when the test still adds work while
    they run, only after it created ``stop_file``."""
    return params.get("stop_file") is None or os.path.exists(params["stop_file"])


def _sleep_ms(rng: random.Random, max_ms: float) -> None:
    if max_ms > 0:
        time.sleep(rng.uniform(0, max_ms) / 1000)


def rollout_worker(params: dict, go=None) -> None:
    """Lease prompt tasks, then per task: retryable fail, terminal fail, commit its
    sample, or keep it for the next round (so later leases meet the per-worker cap).

    params: worker_id, lease_s, request (max_tasks per lease), p_retry, p_terminal,
    p_keep, delay_ms (random pause per round, ms), idle_ms (pause after an empty
    grant), seed.
    Log lines: {"op": "lease", "before": held before, "granted": [[task_id, attempt, token]],
    "held": held after}, {"op": "commit", "sent": [...], "fresh": [...]},
    {"op": "fail", "retryable": bool, "sent": [...], "affected": [...]}, {"op": "exit"}.
    """
    cp = _open(params)
    w = cp.rollout_worker(params["worker_id"], lease_s=params["lease_s"])
    rng = random.Random(params.get("seed"))
    log = _started(params, go)
    kept: list[str] = []
    while True:
        before = len(w.held)
        tasks = w.lease(params["request"])
        log.write(op="lease", before=before, held=len(w.held), at=time.time(),
                  granted=[[t.task_id, t.attempt, w._tokens[t.task_id]] for t in tasks])
        work = kept + [t.task_id for t in tasks]
        kept = []
        if not work:
            if _prompts_finished(cp) and _may_stop(params):
                break
            _sleep_ms(rng, params.get("idle_ms", 5))
            continue
        _sleep_ms(rng, params.get("delay_ms", 0))
        retry, terminal, kept, commit = _sort_by_roll(rng, work, params, ("p_retry", "p_terminal", "p_keep"))
        _fail_and_log(log, w, retry, terminal, "flaky rollout", "prompt cannot be rendered")
        if commit:
            fresh = w.commit([sample_ref(cp.run_id, t, params.get("ref_bytes", 1024)) for t in commit])
            log.write(op="commit", sent=commit, fresh=fresh, at=time.time())
    log.write(op="exit")


def _sort_by_roll(rng: random.Random, ids: list, params: dict, odds: tuple) -> list[list]:
    """One roll per id: the id goes to the first outcome whose cumulative probability
    (params[name] for each name in ``odds``) exceeds the roll, else to the last list."""
    out: list[list] = [[] for _ in range(len(odds) + 1)]
    for item_id in ids:
        roll, bound = rng.random(), 0.0
        for i, name in enumerate(odds):
            bound += params.get(name, 0)
            if roll < bound:
                out[i].append(item_id)
                break
        else:
            out[-1].append(item_id)
    return out


def _fail_and_log(log: "Log", holder, retry: list, terminal: list, retry_reason: str, terminal_reason: str) -> None:
    """Fail ``retry`` retryably and ``terminal`` for good, logging what each call affected."""
    if retry:
        log.write(op="fail", retryable=True, sent=retry, affected=holder.fail(retry, retry_reason, True))
    if terminal:
        log.write(op="fail", retryable=False, sent=terminal, affected=holder.fail(terminal, terminal_reason, False))


def trainer(params: dict, go=None) -> None:
    """Lease sample refs, then per ref: retryable fail, terminal fail, or ack.

    params: trainer_id, lease_s, request (max_refs), p_retry, p_terminal, delay_ms,
    wait_s (blocking lease timeout), step_from_redis (ack with increasing
    global_step and optimizer_durable every other ack), seed.
    Log lines: {"op": "lease", "ids": [...], "tokens": [...], "at": ...}, {"op": "ack", "sent": [...], "acked": [...],
    "step": ..., "at": ...}, {"op": "fail", "retryable": bool, "sent": [...], "affected": [...]}.
    """
    cp = _open(params)
    t = cp.trainer(params["trainer_id"], lease_s=params["lease_s"])
    rng = random.Random(params.get("seed"))
    log = _started(params, go)
    step = 0
    while True:
        refs = t.lease(params["request"], timeout_s=params.get("wait_s", 0.05))
        ids = [r.sample_id for r in refs]
        log.write(op="lease", ids=ids, tokens=[t._tokens[i] for i in ids], at=time.time())
        if not ids:
            if _all_finished(cp) and _may_stop(params):
                break
            continue
        _sleep_ms(rng, params.get("delay_ms", 0))
        retry, terminal, ack = _sort_by_roll(rng, ids, params, ("p_retry", "p_terminal"))
        _fail_and_log(log, t, retry, terminal, "loader hiccup", "feature missing in store")
        if ack:
            if params.get("step_from_redis"):
                step += 1
                durable = step % 2 == 0
                acked = t.ack(ack, global_step=step, optimizer_durable=durable)
                log.write(op="ack", sent=ack, acked=acked, step=step, durable=durable, at=time.time())
            else:
                acked = t.ack(ack, optimizer_durable=True)
                log.write(op="ack", sent=ack, acked=acked, at=time.time())
    log.write(op="exit")


def capacity_reporter(params: dict, go=None) -> None:
    """The feature store's capacity reporter: every few ms it reports resident bytes =
    (samples queued or leased for training) x ref_bytes, i.e. a store that holds each
    sample's features until a trainer acks or fails it. Between reports it samples
    the worker_inflight hash (largest value seen).

    params: store_id, ref_bytes, period_ms.
    Log lines: {"op": "report", "seq", "resident", "accepted", "paused", "total"},
    {"op": "inflight", "max": ...}.
    """
    cp = _open(params)
    reporter = cp.capacity_reporter(params["store_id"])
    log = _started(params, go)
    k = cp.keys
    while True:
        pipe = cp.redis.pipeline(transaction=True)
        pipe.llen(k.train_queue)
        pipe.hlen(k.train_leases)
        pipe.hvals(k.worker_inflight)
        queued, leased, inflight = pipe.execute()
        resident = (queued + leased) * params.get("ref_bytes", 1024)
        report = reporter.report(resident)
        log.write(op="report", seq=reporter._seq, resident=resident, accepted=report.accepted,
                  paused=report.paused, total=report.run_resident_bytes)
        log.write(op="inflight", max=max((int(v) for v in inflight), default=0))
        if queued + leased == 0 and _all_finished(cp):
            break
        time.sleep(params.get("period_ms", 3) / 1000)
    log.write(op="exit")


def stalled_holder(params: dict) -> None:
    """Lease one item, log it, then wait until the file ``go_file`` exists and hand the
    item in: a holder that stalls (the test freezes it with SIGSTOP) past its deadline.
    (A file, not an Event: a process frozen inside Event.wait would hold its lock.)

    params: kind ('prompt' or 'train'), holder_id, lease_s, go_file.
    Log lines: {"op": "leased", "id", "token"}, {"op": "late", "returned": [...]}.
    """
    cp = _open(params)
    log = Log(params["log_path"])
    if params["kind"] == "prompt":
        holder = cp.rollout_worker(params["holder_id"], lease_s=params["lease_s"])
        item_ids = [t.task_id for t in holder.lease(1)]
    else:
        holder = cp.trainer(params["holder_id"], lease_s=params["lease_s"])
        item_ids = [r.sample_id for r in holder.lease(1)]
    log.write(op="leased", id=item_ids[0] if item_ids else None,
              token=holder._tokens.get(item_ids[0]) if item_ids else None)
    deadline = time.monotonic() + 60
    while not os.path.exists(params["go_file"]) and time.monotonic() < deadline:
        time.sleep(0.01)
    if not item_ids:
        return
    if params["kind"] == "prompt":
        returned = holder.commit([sample_ref(cp.run_id, item_ids[0])])
    else:
        returned = holder.ack(item_ids, global_step=None, optimizer_durable=True)
    log.write(op="late", returned=returned)


# ------------------------------------------------------------------ verification
def forkserver():
    """A forkserver context with the client stack preloaded: a (replacement) process
    starts in milliseconds instead of re-importing everything."""
    import multiprocessing

    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(["reliability_procs", "dataflow_redis", "redis"])
    return ctx


def start_roles(ctx, roles: list[tuple], go=None) -> list:
    """Start ``(target, params)`` pairs as processes of context ``ctx``."""
    procs = []
    for target, params in roles:
        args = (params,) if go is None else (params, go)
        proc = ctx.Process(target=target, args=args, name=params.get("worker_id") or
                           params.get("trainer_id") or params.get("store_id"))
        proc.start()
        procs.append(proc)
    return procs


def kill_all(procs) -> None:
    """SIGKILL whatever is still running (cleanup after a failed test)."""
    for proc in procs:
        if proc.is_alive():
            proc.kill()
            proc.join(5)


def join_all(procs: list, timeout_s: float) -> None:
    """Wait for every process (hang guard ``timeout_s``); kill leftovers and fail if
    any was still running or exited with an error."""
    deadline = time.monotonic() + timeout_s
    for proc in procs:
        proc.join(max(0.1, deadline - time.monotonic()))
    stuck = [p.name for p in procs if p.is_alive()]
    kill_all(procs)
    assert not stuck, f"processes still running after {timeout_s}s: {stuck}"
    failed = [(p.name, p.exitcode) for p in procs if p.exitcode != 0]
    assert not failed, f"processes exited with errors: {failed}"


def acked_from_logs(paths) -> list[str]:
    """Every sample id some trainer's ack call reported as newly acked (with repeats)."""
    out: list[str] = []
    for path in paths:
        for line in read_log(path):
            if line["op"] == "ack":
                out += line["acked"]
    return out


def verify_final_state(cp: ControlPlane, task_ids: set[str]) -> dict:
    """Assert that every task reached exactly one final state and nothing is left in
    flight, from Redis alone; return the final sets for further checks.

    Final states: a task is either done (its one sample ``s-<task>`` committed) or
    dead-lettered; a committed sample is either acked or terminally failed.
    """
    r, k = cp.redis, cp.keys
    for key in (k.pending, k.train_queue):
        assert r.llen(key) == 0, f"{key} not empty: {r.lrange(key, 0, 10)}"
    for key in (k.prompt_leases, k.train_leases, k.worker_inflight):
        assert r.hlen(key) == 0, f"{key} not empty: {list(r.hscan_iter(key, count=10))[:10]}"
    for key in (k.prompt_deadlines, k.train_deadlines):
        assert r.zcard(key) == 0, f"{key} not empty"
    assert int(r.hget(k.bp, "reserved_bytes") or 0) == 0

    done = idset.members(r, k.tasks_done)
    dead = set(r.hkeys(k.dlq))
    assert not done & dead, f"tasks both done and dead-lettered: {sorted(done & dead)[:10]}"
    assert done | dead == task_ids, (
        f"lost tasks: {sorted(task_ids - done - dead)[:10]}; unknown: {sorted((done | dead) - task_ids)[:10]}")
    assert set(r.hkeys(k.tasks)) == dead, "a finished task kept its record, or a dead letter lost it"

    acked = idset.members(r, k.acked)
    failed = set(r.hkeys(k.failed_samples))
    committed = {f"s-{t}" for t in done}
    assert not acked & failed, f"samples both acked and failed: {sorted(acked & failed)[:10]}"
    assert acked | failed == committed, (
        f"lost samples: {sorted(committed - acked - failed)[:10]}; "
        f"unknown: {sorted((acked | failed) - committed)[:10]}")
    # Records kept only for samples acked without a durable checkpoint yet.
    assert set(r.hkeys(k.samples)) == set(r.zrange(k.undurable, 0, -1))

    counters = {name: int(v) for name, v in r.hgetall(k.counters).items()}
    assert counters.get("prompts", 0) == len(task_ids)
    assert counters.get("prompts_done", 0) == len(done)
    assert counters.get("samples_committed", 0) == len(committed)
    assert counters.get("samples_acked", 0) == len(acked), "samples_acked counts an ack twice"
    assert counters.get("samples_failed", 0) == len(failed)
    return {"done": done, "dead": dead, "acked": acked, "failed": failed, "counters": counters}
