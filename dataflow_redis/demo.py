"""The demo pipeline: backpressure at work, as separate OS processes on one Redis.

    dataflow-redis demo                       # private redis-server, about 20 s
    dataflow-redis demo --json --plot demo.png

Roles (each a process of its own; ``--role`` runs one of them alone, which is how
docker-compose.yml spreads them over containers):

| role    | what it does                                                              |
|---------|---------------------------------------------------------------------------|
| setup   | configures the run (watermarks, caps), writes the plan, ingests prompts   |
| rollout | leases prompts, "generates" (sleeps), puts sample bytes in the store,     |
|         | commits sample refs                                                       |
| trainer | leases refs, "trains" (sleeps, slower than rollout), acks, evicts bytes   |
| store   | the feature-store simulator's owner: reports health (ages, cap) on a beat |

The feature store is :class:`~dataflow_redis.simstore.SimulatedFeatureStore`: byte
counts in Redis with a hard cap, reporting capacity to the control plane after every
put and evict. Each task carries ``estimated_bytes`` (6 tokens of 512 bytes), while
its real sample is 6 to 14 tokens, as generations run longer than estimated: the
reservation keeps most overshoot out, and the watermark latch catches the rest.

The demo keeps two keys of its own beside the run, outside the control plane's
schema: ``dfr-demo:{<run>}:plan`` (the plan every role reads, JSON) and
``dfr-demo:{<run>}:step`` (the trainers' shared global step counter).

In the default mode (``role='all'``) the parent process runs setup, starts the other
roles as child processes (``python -m dataflow_redis.demo ROLE INDEX``), samples
``status()`` every ``sample_s`` for progress and the plot, and ends with a summary
whose ``tasks_lost`` counts ingested tasks whose sample is not in the run's acked set
(it must be 0).
"""

from __future__ import annotations

import json
import os
import random
import socket
import subprocess
import sys
import time
import uuid
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Callable, Optional

from .config import BackpressureConfig
from .control_plane import ControlPlane
from .embedded import RedisServer, die_with_parent, exit_on_terminate
from .errors import ConnectionFailed, DataflowError, InvalidArgument, StepRegression
from .keys import DEFAULT_NAMESPACE
from .records import FeatureSpec, SampleRef
from .simstore import SimulatedFeatureStore

ROLES = ("all", "setup", "rollout", "trainer", "store")
BYTES_PER_TOKEN = 512
"""One bfloat16 hidden state of width 256 per token."""
HIDDEN_WIDTH = 256
KIB = 1024


@dataclass(frozen=True)
class DemoPlan:
    """Sizes and speeds of a demo run; stored in Redis so every role reads the same."""

    prompts: int = 1600
    workers: int = 4
    trainers: int = 2
    estimated_tokens: int = 6
    """Tokens each task's estimate assumes (estimated_bytes = this * 512)."""
    min_tokens: int = 6
    max_tokens: int = 14
    """A sample's real size: uniform in [min_tokens, max_tokens] tokens of 512 bytes."""
    high_watermark_bytes: int = 512 * KIB
    low_watermark_bytes: int = 256 * KIB
    store_cap_bytes: int = 768 * KIB
    """The simulated store's hard cap: a put over it is refused (the worker waits)."""
    worker_cap: int = 4
    """max_inflight_prompts_per_worker."""
    lease_batch: int = 4
    rollout_s: float = 0.03
    """Generation time per sample, seconds."""
    train_batch: int = 8
    train_step_s: float = 0.16
    """Time per training step of ``train_batch`` samples, seconds."""
    durable_every: int = 4
    """Every n-th step's ack is optimizer_durable (a checkpoint)."""
    lease_s: float = 30.0
    idle_s: float = 0.05
    """Pause before a worker retries a lease that granted nothing, seconds."""
    shard_id: str = "sim-0"
    started_ms: int = 0

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name in ("shard_id", "started_ms"):
                continue
            if type(value) not in (int, float) or value <= 0:
                raise InvalidArgument(f"demo {f.name.replace('_', '-')} must be a positive number, got {value!r}")
        if self.min_tokens > self.max_tokens:
            raise InvalidArgument("demo min-tokens must not exceed max-tokens")
        if self.low_watermark_bytes > self.high_watermark_bytes:
            raise InvalidArgument(f"demo low watermark {self.low_watermark_bytes} must not exceed the high watermark "
                                  f"{self.high_watermark_bytes} (bytes); give --low-watermark below --high-watermark")
        if self.store_cap_bytes < self.max_tokens * BYTES_PER_TOKEN:
            raise InvalidArgument("demo store cap is smaller than one sample; raise --store-cap")

    @property
    def estimated_bytes(self) -> int:
        return self.estimated_tokens * BYTES_PER_TOKEN

    def rollout_rate(self) -> float:
        """Samples per second the rollout side could produce unthrottled."""
        return self.workers / self.rollout_s

    def train_rate(self) -> float:
        """Samples per second the trainers can consume."""
        return self.trainers * self.train_batch / self.train_step_s


@dataclass
class Sample:
    """One status sample taken by the parent: seconds since start (Redis time), bytes."""

    t_s: float
    resident_bytes: int
    reserved_bytes: int
    paused: bool
    acked: int


@dataclass
class DemoResult:
    summary: dict[str, Any]
    samples: list[Sample] = field(default_factory=list)


def _demo_key(run_id: str, name: str) -> str:
    return f"dfr-demo:{{{run_id}}}:{name}"


def _server_ms(cp: ControlPlane) -> int:
    seconds, micros = cp.redis.time()
    return int(seconds) * 1000 + int(micros) // 1000


def read_plan(cp: ControlPlane, wait_s: float = 0.0) -> DemoPlan:
    """The plan stored by setup; waits up to ``wait_s`` seconds for it to appear."""
    deadline = time.monotonic() + wait_s
    while True:
        raw = cp.redis.get(_demo_key(cp.run_id, "plan"))
        if raw:
            return DemoPlan(**json.loads(raw))
        if time.monotonic() >= deadline:
            raise DataflowError(
                f"run {cp.run_id!r} has no demo plan: start the setup role first "
                "(dataflow-redis demo --role setup --run ...)"
            )
        time.sleep(0.2)


def sample_tokens(task_id: str, plan: DemoPlan) -> int:
    """The real length of a task's generation (deterministic per task id, so a retried
    task produces the same sample)."""
    return random.Random(task_id).randint(plan.min_tokens, plan.max_tokens)


def sample_id_of(task_id: str) -> str:
    return f"{task_id}.s0"


# --------------------------------------------------------------------------- roles
def setup(cp: ControlPlane, plan: DemoPlan) -> bool:
    """Configure the run, store the plan and ingest the prompts. Returns False (and
    does nothing) when the plan already exists, so a restarted setup is harmless."""
    plan_key = _demo_key(cp.run_id, "plan")
    stored = DemoPlan(**{**asdict(plan), "started_ms": _server_ms(cp)})
    if not cp.redis.set(plan_key, json.dumps(asdict(stored)), nx=True):
        return False
    cp.configure(max_prompt_attempts=5)
    cp.configure_backpressure(BackpressureConfig(
        high_watermark_bytes=plan.high_watermark_bytes,
        low_watermark_bytes=plan.low_watermark_bytes,
        max_inflight_prompts_per_worker=plan.worker_cap,
        max_train_lease=plan.train_batch,
        stale_after_s=10.0,
    ))
    SimulatedFeatureStore(cp, plan.shard_id, plan.store_cap_bytes).delete()
    cp.ingest_prompts(
        {"task_id": f"task-{i:06d}", "payload": {"prompt": f"demo prompt {i}"},
         "estimated_bytes": plan.estimated_bytes}
        for i in range(plan.prompts)
    )
    return True


def _rollout_done(cp: ControlPlane, plan: DemoPlan) -> bool:
    s = cp.status()
    return s["prompts"] >= plan.prompts and s["prompts_pending"] == 0 and s["prompts_leased"] == 0


def _all_done(cp: ControlPlane, plan: DemoPlan) -> bool:
    s = cp.status()
    return (s["prompts"] >= plan.prompts and s["prompts_pending"] == 0 and s["prompts_leased"] == 0
            and s["queue_depth"] == 0 and s["queue_in_flight"] == 0)


def rollout(cp: ControlPlane, plan: DemoPlan, worker_id: str) -> int:
    """Lease, generate, store, commit until every prompt is done. Returns samples committed."""
    store = SimulatedFeatureStore(cp, plan.shard_id, plan.store_cap_bytes)
    worker = cp.rollout_worker(worker_id, lease_s=plan.lease_s)
    committed = 0
    while True:
        tasks = worker.lease(plan.lease_batch)
        if not tasks:
            if _rollout_done(cp, plan):
                return committed
            time.sleep(plan.idle_s)
            continue
        refs = []
        for task in tasks:
            time.sleep(plan.rollout_s)  # the target model generating
            tokens = sample_tokens(task.task_id, plan)
            sample_id = sample_id_of(task.task_id)
            waited = time.monotonic()
            while not store.put(sample_id, tokens * BYTES_PER_TOKEN):
                # Over the store's hard cap: wait for trainers to free bytes.
                time.sleep(plan.idle_s)
                if time.monotonic() - waited > plan.lease_s / 3:
                    worker.heartbeat()
                    waited = time.monotonic()
            refs.append(SampleRef(
                sample_id=sample_id, run_id=cp.run_id, source_task_id=task.task_id,
                feature_store_uri=f"sim://{plan.shard_id}",
                feature_keys=(f"{sample_id}/hidden",),
                feature_specs=(FeatureSpec("hidden", (tokens, HIDDEN_WIDTH), "bfloat16"),),
                strategy="eagle3", num_tokens=tokens, estimated_bytes=tokens * BYTES_PER_TOKEN,
            ))
        committed += len(worker.commit(refs))


def _ack_at_next_step(cp: ControlPlane, trainer, ids: list[str], plan: DemoPlan) -> int:
    """Ack at the next shared global step. Two trainers can draw steps 5 and 6 and ack
    in the other order; the later ack is then refused (nothing written) and simply
    retried at a newer step."""
    while True:
        step = int(cp.redis.incr(_demo_key(cp.run_id, "step")))
        try:
            trainer.ack(ids, global_step=step, optimizer_durable=step % plan.durable_every == 0)
            return step
        except StepRegression:
            continue


def train(cp: ControlPlane, plan: DemoPlan, trainer_id: str) -> int:
    """Lease, train, ack, evict until every sample is acked. Returns samples acked."""
    store = SimulatedFeatureStore(cp, plan.shard_id, plan.store_cap_bytes)
    trainer = cp.trainer(trainer_id, lease_s=plan.lease_s)
    acked = 0
    while True:
        refs = trainer.lease(plan.train_batch, timeout_s=0.25)
        if not refs:
            if _all_done(cp, plan):
                return acked
            continue
        time.sleep(plan.train_step_s)  # a training step on these samples
        ids = [r.sample_id for r in refs]
        _ack_at_next_step(cp, trainer, ids, plan)
        acked += len(ids)
        store.evict(ids)  # features are freed only once the ack is recorded


def run_store(cp: ControlPlane, plan: DemoPlan, beat_s: float = 0.5) -> int:
    """The store's health beat: report resident bytes, cap and feature ages every
    ``beat_s`` seconds (with the store's own version as sequence number, so it never
    overrides a newer put or evict) until the run is done. Returns the store's peak bytes."""
    store = SimulatedFeatureStore(cp, plan.shard_id, plan.store_cap_bytes, report=False)
    reporter = cp.capacity_reporter(plan.shard_id)
    while True:
        state = store.state()
        reporter.report(state.resident_bytes, plan.store_cap_bytes, state.avg_age_s,
                        state.oldest_age_s, seq=state.version + 1)
        if _all_done(cp, plan) and state.resident_bytes == 0:
            return store.peak_bytes()
        time.sleep(beat_s)


def _holder_id(role: str, index: Optional[int]) -> str:
    if index is not None:
        return f"{role}-{index}"
    return f"{role}-{socket.gethostname()}-{os.getpid()}"


def run_role(role: str, redis_url: str, run_id: str, namespace: str = DEFAULT_NAMESPACE,
             index: Optional[int] = None, wait_s: float = 60.0, plan: Optional[DemoPlan] = None) -> Any:
    """Run one role in this process until the run is done (setup: until ingested)."""
    if role not in ROLES[1:]:
        raise InvalidArgument(f"unknown demo role {role!r}; use one of {', '.join(ROLES[1:])}")
    cp = ControlPlane.from_url(redis_url, run_id, namespace)
    try:
        if role == "setup":
            return setup(cp, plan or DemoPlan())
        stored = read_plan(cp, wait_s)
        if role == "rollout":
            return rollout(cp, stored, _holder_id("rollout", index))
        if role == "trainer":
            return train(cp, stored, _holder_id("trainer", index))
        return run_store(cp, stored)
    finally:
        cp.redis.close()


def child_main(argv: Optional[list[str]] = None) -> int:
    """Entry point of a role process the demo starts: ``python -m dataflow_redis.demo
    ROLE INDEX``, with the URL, run and namespace in the environment (so a password
    never shows in the process list). Errors become one line on stderr and exit code 1."""
    args = argv if argv is not None else sys.argv[1:]
    if len(args) != 2 or not args[1].isdigit() or "DATAFLOW_REDIS_URL" not in os.environ \
            or "DATAFLOW_RUN" not in os.environ:
        print("usage: DATAFLOW_REDIS_URL=... DATAFLOW_RUN=... python -m dataflow_redis.demo "
              "setup|rollout|trainer|store INDEX (or: dataflow-redis demo --role ...)", file=sys.stderr)
        return 2
    role, index = args
    try:
        run_role(role, os.environ["DATAFLOW_REDIS_URL"], os.environ["DATAFLOW_RUN"],
                 os.environ.get("DATAFLOW_NAMESPACE", DEFAULT_NAMESPACE), int(index), wait_s=10.0)
    except KeyboardInterrupt:
        return 130
    except Exception as exc:  # the parent names the role that failed
        print(f"demo {role}-{index}: {type(exc).__name__}: {exc}", file=sys.stderr, flush=True)
        return 1
    return 0


# -------------------------------------------------------------------------- parent
def _sample(status: dict, start_ms: int) -> Sample:
    bp = status.get("backpressure") or {}
    return Sample(t_s=(status["server_time_ms"] - start_ms) / 1000,
                  resident_bytes=bp.get("resident_bytes", 0), reserved_bytes=bp.get("reserved_bytes", 0),
                  paused=bool(bp.get("paused")), acked=status["samples_acked"])


def _count_unacked(cp: ControlPlane, prompts: int) -> int:
    """Ingested tasks whose sample is not in the run's acked set (read straight from it)."""
    missing = 0
    for start in range(0, prompts, 1000):
        ids = [sample_id_of(f"task-{i:06d}") for i in range(start, min(prompts, start + 1000))]
        missing += sum(1 for present in cp.is_acked(ids) if not present)
    return missing


def run_demo(plan: DemoPlan, redis_url: Optional[str] = None, run_id: Optional[str] = None,
             namespace: str = DEFAULT_NAMESPACE, sample_s: float = 0.05, timeout_s: float = 300.0,
             cleanup: Optional[bool] = None, progress: Optional[Callable[[dict, Sample], None]] = None,
             progress_every_s: float = 1.0) -> DemoResult:
    """Run the whole pipeline and return its summary and status samples.

    Without ``redis_url`` a private redis-server is started and stopped. ``cleanup``
    (default: only on the private server, where it goes away anyway) deletes the
    run's keys at the end; keep them to inspect the run with ``dataflow-redis status``.
    ``progress(status, sample)`` is called about every ``progress_every_s`` seconds.
    """
    with exit_on_terminate():
        return _run_demo(plan, redis_url, run_id, namespace, sample_s, timeout_s, cleanup, progress,
                         progress_every_s)


def _run_demo(plan: DemoPlan, redis_url: Optional[str], run_id: Optional[str], namespace: str,
              sample_s: float, timeout_s: float, cleanup: Optional[bool],
              progress: Optional[Callable[[dict, Sample], None]], progress_every_s: float) -> DemoResult:
    server = None
    if redis_url is None:
        server = RedisServer(tied_to_parent=True).launch()
        url = server.url
    else:
        url = redis_url
    run_id = run_id or f"demo-{uuid.uuid4().hex[:6]}"
    # On the private server a short retry: if it stops answering, it has died.
    cp = ControlPlane.from_url(url, run_id, namespace, retry_s=2.0 if server else 20.0)
    processes: list[tuple[str, subprocess.Popen]] = []
    try:
        if cp.exists() or cp.redis.exists(_demo_key(run_id, "plan")):
            raise InvalidArgument(f"run {run_id!r} already exists on this Redis; pick another --run")
        setup(cp, plan)
        plan = read_plan(cp)
        start_ms = plan.started_ms
        roles = ([("store", 0)] + [("trainer", i) for i in range(plan.trainers)]
                 + [("rollout", i) for i in range(plan.workers)])
        env = {**os.environ, "DATAFLOW_REDIS_URL": url, "DATAFLOW_RUN": run_id, "DATAFLOW_NAMESPACE": namespace}
        # `python -m` looks in the working directory first: start the roles where this
        # very package lives, so that they import it and not some other checkout.
        package_root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        for role, index in roles:
            command = [sys.executable, "-m", "dataflow_redis.demo", role, str(index)]
            processes.append((f"{role}-{index}", subprocess.Popen(command, env=env, cwd=package_root,
                                                                   stdin=subprocess.DEVNULL,
                                                                   stdout=subprocess.DEVNULL,
                                                                   preexec_fn=die_with_parent())))

        samples: list[Sample] = []
        deadline = time.monotonic() + timeout_s
        next_progress = 0.0
        while True:
            status = _status(cp, server)
            sample = _sample(status, start_ms)
            samples.append(sample)
            if progress and time.monotonic() >= next_progress:
                progress(status, sample)
                next_progress = time.monotonic() + progress_every_s
            codes = [(name, p.poll()) for name, p in processes]
            failed = [(name, code) for name, code in codes if code not in (None, 0)]
            if failed:
                raise DataflowError(
                    f"demo role {failed[0][0]} exited with code {failed[0][1]}; see its message above"
                )
            if all(code == 0 for _, code in codes):
                break
            if time.monotonic() > deadline:
                raise DataflowError(f"demo did not finish within {timeout_s:.0f} s; the machine may be overloaded")
            time.sleep(sample_s)

        status = _status(cp, server)
        samples.append(_sample(status, start_ms))
        if progress:
            progress(status, samples[-1])
        store = SimulatedFeatureStore(cp, plan.shard_id, plan.store_cap_bytes, report=False)
        summary = _summary(cp, plan, status, samples, store, server)
        if cleanup if cleanup is not None else server is not None:
            store.delete()
            cp.redis.delete(_demo_key(run_id, "plan"), _demo_key(run_id, "step"))
            cp.delete()
        return DemoResult(summary, samples)
    finally:
        try:
            for _, p in processes:
                if p.poll() is None:
                    p.terminate()
            for _, p in processes:
                try:
                    p.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()
            cp.redis.close()
        finally:  # a signal arriving during the steps above still stops the server
            if server is not None:
                server.stop()


def _status(cp: ControlPlane, server: Optional[RedisServer]) -> dict:
    """``cp.status()``; on the private server, a clear error if that server has died."""
    try:
        return cp.status()
    except ConnectionFailed:
        if server is None or server.process is None or server.process.poll() is None:
            raise
        log = server.log_tail(5).replace("\n", " | ")
        raise DataflowError(f"the demo's private redis-server exited (code {server.process.returncode}) "
                            f"during the run; its log ends: {log or '(empty)'}") from None


def _summary(cp: ControlPlane, plan: DemoPlan, status: dict, samples: list[Sample],
             store: SimulatedFeatureStore, server: Optional[RedisServer]) -> dict[str, Any]:
    bp = status["backpressure"]
    duration_s = max(0.001, (status["server_time_ms"] - plan.started_ms) / 1000)
    lost = _count_unacked(cp, plan.prompts)
    store_state = store.state()
    summary = {
        "run_id": cp.run_id,
        # The URL is never echoed: it may carry a password.
        "redis": f"private redis-server on 127.0.0.1:{server.port}" if server else "external (the given URL)",
        "prompts": plan.prompts,
        "rollout_workers": plan.workers,
        "trainers": plan.trainers,
        "duration_s": round(duration_s, 3),
        "samples_acked": status["samples_acked"],
        "tasks_lost": lost,
        "dead_lettered": status["prompts_failed"],
        "throughput_samples_per_s": round(status["samples_acked"] / duration_s, 1),
        "high_watermark_bytes": plan.high_watermark_bytes,
        "low_watermark_bytes": plan.low_watermark_bytes,
        "store_cap_bytes": plan.store_cap_bytes,
        "peak_resident_bytes": bp["peak_resident_bytes"],
        "store_peak_bytes": store.peak_bytes(),
        "peak_over_high_bytes": max(0, bp["peak_resident_bytes"] - plan.high_watermark_bytes),
        "peak_reserved_bytes": max((s.reserved_bytes for s in samples), default=0),
        "pause_transitions": bp["pause_transitions"],
        "resume_transitions": bp["resume_transitions"],
        "rollout_starved": bp["rollout_starved"],
        "rollout_starved_s": bp["rollout_starved_s"],
        "trainer_starved": bp["trainer_starved"],
        "trainer_starved_s": bp["trainer_starved_s"],
        "rollout_capped": bp["rollout_capped"],
        "durable_global_step": status["durable_global_step"],
        "checkpoint_global_step": status["checkpoint_global_step"],
        "resident_bytes_at_end": store_state.resident_bytes,
    }
    summary["ok"] = lost == 0 and store_state.resident_bytes == 0 and status["train_backlog"] == 0
    return summary


def write_plot(result: DemoResult, plan: DemoPlan, path: str) -> None:
    """Write a PNG of resident and reserved bytes against the watermarks over time."""
    plt = import_pyplot()
    samples = result.samples
    t = [s.t_s for s in samples]
    kib = 1 / KIB
    fig, ax = plt.subplots(figsize=(10, 5), dpi=110)
    # Shade the spans where the latch held prompt leases back.
    start = None
    labelled = False
    for s in samples + [Sample(samples[-1].t_s if samples else 0, 0, 0, False, 0)]:
        if s.paused and start is None:
            start = s.t_s
        elif not s.paused and start is not None:
            ax.axvspan(start, s.t_s, color="tab:red", alpha=0.12, lw=0,
                       label=None if labelled else "latch paused")
            labelled, start = True, None
    ax.plot(t, [s.resident_bytes * kib for s in samples], color="tab:blue", lw=1.6, label="resident bytes")
    ax.plot(t, [s.reserved_bytes * kib for s in samples], color="tab:orange", lw=1.2,
            label="reserved bytes (leased tasks)")
    ax.plot(t, [(s.resident_bytes + s.reserved_bytes) * kib for s in samples], color="tab:gray", lw=0.8,
            alpha=0.7, label="resident + reserved (admits work below high)")
    ax.axhline(plan.store_cap_bytes * kib, color="black", ls=":", lw=1.2, label="store hard cap")
    ax.axhline(plan.high_watermark_bytes * kib, color="tab:red", ls="--", lw=1.2, label="high watermark")
    ax.axhline(plan.low_watermark_bytes * kib, color="tab:green", ls="--", lw=1.2, label="low watermark")
    ax.set_xlabel("seconds since start (Redis server time)")
    ax.set_ylabel("KiB")
    ax.set_ylim(0, plan.store_cap_bytes * kib * 1.12)
    ax.set_xlim(0, max(t) if t else 1)
    s = result.summary
    ax.set_title(
        f"dataflow-redis demo: {plan.prompts} prompts, {plan.workers} rollout workers, {plan.trainers} trainers; "
        f"{s['pause_transitions']} pauses, peak {s['peak_resident_bytes'] * kib:.0f} KiB, "
        f"{s['tasks_lost']} lost", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.13), ncol=4, fontsize=8, frameon=False)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def import_pyplot():
    """matplotlib.pyplot on the file-only Agg backend, or a clear error."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise DataflowError("--plot needs matplotlib: pip install 'dataflow-redis[plot]'") from None
    return plt


if __name__ == "__main__":
    sys.exit(child_main())
