"""Model-based test: random sequences of every mutating call, the run's invariants
checked from Redis after each one (real redis-server; hypothesis drives the calls).

Two rollout workers and a trainer hold long leases. A third worker id and a second
trainer id each have two clients: a stalled one with 1 ms leases, which expire between
calls and are reclaimed by the next lease or by ``reclaim_expired``, and its restarted
successor with long leases, which takes such work over; the stalled clients' late
commits, acks and fails (after a heartbeat or not, retried) meet the fencing. Task
ids are a mix of generated ones and a small pool of caller ids
(so ingests collide with live and done tasks); sample ids come from a small pool per
task (so commits repeat ids). Every call may be replayed at once with its request id,
as after a lost reply: the replay must return the first reply and change nothing.

After every step, from a dump of the run:

* every task ever ingested is in exactly one of pending, prompt_leases, dlq or
  tasks_done; the live ones (and only they) have a record in ``tasks`` (and maybe
  its bytes and attempt);
* the lease bookkeeping agrees: deadlines = lease rows, worker_inflight = leases per
  holder, bp.reserved_bytes = the bytes of the lease rows, bp.resident_bytes = the
  bytes the registered shards last reported;
* every sample ever accepted is in exactly one of train_queue, train_leases, acked or
  failed_samples, holds a record exactly while it is queued, leased or acked without a
  durable ack, and no queue holds an id twice;
* the counters equal what they count, and the durable marker never runs behind.
"""

from __future__ import annotations

import collections
import time
import uuid

import pytest

pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, Phase, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule  # noqa: E402

from conftest import dump_run, make_ref  # noqa: E402
from dataflow_redis import BackpressureConfig, ControlPlane, idset  # noqa: E402

CALLER_TASK_IDS = [f"task-{i}" for i in range(8)]
BYTES = st.sampled_from([None, 0, 100, 5000])
SLOW_WORKERS = ("w0", "w1")
WORKERS = SLOW_WORKERS + ("wx", "wx-restarted")
SLOW_TRAINERS = ("t0",)
TRAINERS = SLOW_TRAINERS + ("tx", "tx-restarted")


class ControlPlaneModel(RuleBasedStateMachine):
    url = ""

    def __init__(self) -> None:
        super().__init__()
        self.cp = ControlPlane.from_url(self.url, run_id=f"model-{uuid.uuid4().hex[:10]}")
        self.cp.configure(max_prompt_attempts=3)
        self.workers = {name: self.cp.rollout_worker(name, lease_s=60.0) for name in SLOW_WORKERS}
        # Two clients under one holder id: a stalled process whose 1 ms leases expire,
        # and its restarted successor with long leases. Each holds only the tokens of
        # its own grants, so the stalled one's late hand-ins must be fenced.
        self.workers["wx"] = self.cp.rollout_worker("wx", lease_s=0.001)
        self.workers["wx-restarted"] = self.cp.rollout_worker("wx", lease_s=60.0)
        self.trainers = {name: self.cp.trainer(name, lease_s=60.0) for name in SLOW_TRAINERS}
        self.trainers["tx"] = self.cp.trainer("tx", lease_s=0.001)
        self.trainers["tx-restarted"] = self.cp.trainer("tx", lease_s=60.0)
        self.reporters = [self.cp.capacity_reporter(f"shard-{i}") for i in range(2)]
        self.ingested: set[str] = set()
        self.accepted: set[str] = set()
        self.held: dict[str, list] = collections.defaultdict(list)  # worker -> PromptTasks leased
        self.train_held: dict[str, list] = collections.defaultdict(list)  # trainer -> SampleRefs
        self.step = 0

    def teardown(self) -> None:
        self.cp.delete()
        self.cp.redis.close()

    # ------------------------------------------------------------------ helpers
    def replayed(self, call, replay: bool):
        """``call(request_id)``; with ``replay``, run it again with the same request id
        (a retry after a lost reply): same reply, nothing changed by the second run."""
        request_id = uuid.uuid4().hex
        first = call(request_id)
        if replay:
            before = dump_run(self.cp)
            again = call(request_id)
            assert again == first, "a retried call must return the first reply"
            if first:  # empty replies are not cached; their repeat may count starvation
                assert dump_run(self.cp) == before, "a retried call must change nothing"
        return first

    # ------------------------------------------------------------------ producers
    @rule(data=st.data(), n=st.integers(1, 4), replay=st.booleans())
    def ingest(self, data, n, replay):
        tasks = []
        for _ in range(n):
            task = {"payload": {"text": "p"}}
            if data.draw(st.booleans()):
                task["task_id"] = data.draw(st.sampled_from(CALLER_TASK_IDS))
            nbytes = data.draw(BYTES)
            if nbytes is not None:
                task["estimated_bytes"] = nbytes
            tasks.append(task)
        fresh = self.replayed(lambda rid: self.cp.ingest_prompts(tasks, request_id=rid), replay)
        assert not set(fresh) & self.ingested, "an id already ingested came back as fresh"
        self.ingested.update(fresh)

    @rule(data=st.data(), replay=st.booleans())
    def enqueue_offline(self, data, replay):
        ids = data.draw(st.lists(st.sampled_from([f"offline-{i}" for i in range(5)]), min_size=1, max_size=3))
        refs = [make_ref(self.cp, sample_id, nbytes=data.draw(st.sampled_from([0, 64, 4096]))) for sample_id in ids]
        fresh = self.replayed(lambda rid: self.cp.enqueue_offline_refs(refs, request_id=rid), replay)
        self.accept(fresh)

    @staticmethod
    def hand_back(data, held: dict) -> tuple[str, list]:
        """Draw a client that holds something and up to 3 of its items, which stop
        being held here whatever the call does with them."""
        name = data.draw(st.sampled_from(sorted(n for n, items in held.items() if items)))
        picked = data.draw(st.lists(st.sampled_from(held[name]), min_size=1, max_size=3))
        held[name] = [item for item in held[name] if item not in picked]
        return name, picked

    def fenced_to(self, holder, leases_key: str):
        """The ids ``holder`` may hand back now: those whose lease Redis records for its
        holder id under the token this client was granted."""
        leases = self.cp.redis.hgetall(leases_key)
        return {item_id for item_id, token in holder._tokens.items()
                if leases.get(item_id, "").startswith(f"{token}|")
                and leases[item_id].split("|", 3)[3] == holder.holder_id}

    def accept(self, fresh):
        assert len(set(fresh)) == len(fresh)
        assert not set(fresh) & self.accepted, "a sample id was accepted twice"
        self.accepted.update(fresh)

    # ------------------------------------------------------------------ rollout workers
    @rule(worker=st.sampled_from(WORKERS), n=st.integers(1, 3), replay=st.booleans())
    def lease(self, worker, n, replay):
        self.lease_into(self.workers[worker], self.held[worker], n, replay, "task_id", self.ingested)

    def lease_into(self, holder, held, n, replay, id_field, known):
        """A lease by a worker or a trainer: at most n items, all of them known ones."""
        items = self.replayed(lambda rid: holder.lease(n, request_id=rid), replay)
        assert len(items) <= n
        assert {getattr(item, id_field) for item in items} <= known
        held.extend(items)

    @rule()
    def take_over(self):
        """The restarted clients lease what the stalled ones let expire (reclaimed to
        the tail of the queue, so they lease a few)."""
        time.sleep(0.002)
        self.held["wx-restarted"].extend(self.workers["wx-restarted"].lease(4))
        self.train_held["tx-restarted"].extend(self.trainers["tx-restarted"].lease(4))

    @precondition(lambda self: self.held["wx"] or self.train_held["tx"])
    @rule(data=st.data(), heartbeat_first=st.booleans())
    def late_hand_back(self, data, heartbeat_first):
        """The stalled clients wake up and hand in everything they think they hold (after
        a heartbeat that reports what they lost, or not), retrying each call."""
        if heartbeat_first:
            self.workers["wx"].heartbeat()
            self.trainers["tx"].heartbeat()
        late, self.held["wx"] = self.held["wx"], []
        if late:
            self.commit_refs("wx", late, data, replay=True)
        late, self.train_held["tx"] = self.train_held["tx"], []
        if late:
            self.ack_refs("tx", late, data, durable=data.draw(st.booleans()), replay=True)

    @precondition(lambda self: any(self.held.values()))
    @rule(data=st.data(), replay=st.booleans())
    def commit(self, data, replay):
        worker, picked = self.hand_back(data, self.held)
        self.commit_refs(worker, picked, data, replay)

    def commit_refs(self, worker, picked, data, replay):
        refs = [make_ref(self.cp, f"{t.task_id}:{data.draw(st.integers(0, 1))}", t.task_id,
                         nbytes=data.draw(st.sampled_from([0, 64, 4096]))) for t in picked]
        allowed = self.fenced_to(self.workers[worker], self.cp.keys.prompt_leases)
        done_before = idset.members(self.cp.redis, self.cp.keys.tasks_done)
        fresh = self.replayed(lambda rid: self.workers[worker].commit(refs, request_id=rid), replay)
        self.accept(fresh)
        newly_done = idset.members(self.cp.redis, self.cp.keys.tasks_done) - done_before
        assert newly_done <= allowed, f"a commit released leases it did not hold: {newly_done - allowed}"
        sources = {r.sample_id: r.source_task_id for r in refs}
        assert all(idset.contains(self.cp.redis, self.cp.keys.tasks_done, [sources[s]])[0] for s in fresh)

    @precondition(lambda self: any(self.held.values()))
    @rule(data=st.data(), retryable=st.booleans(), replay=st.booleans())
    def fail_tasks(self, data, retryable, replay):
        worker, picked = self.hand_back(data, self.held)
        self.fail_items(self.workers[worker], [t.task_id for t in picked], self.cp.keys.prompt_leases,
                        retryable, replay)

    def fail_items(self, holder, ids, leases_key, retryable, replay):
        """A fail by a worker or a trainer affects only what it was granted."""
        allowed = self.fenced_to(holder, leases_key)
        affected = self.replayed(
            lambda rid: holder.fail(ids, "model", retryable=retryable, request_id=rid), replay)
        assert set(affected) <= set(ids) & allowed

    @rule(worker=st.sampled_from(WORKERS))
    def worker_heartbeat(self, worker):
        w = self.workers[worker]
        before = set(w.held)
        lost = w.heartbeat()
        assert set(lost) <= before
        assert not set(lost) & set(w.held)

    # ------------------------------------------------------------------ trainers
    @rule(trainer=st.sampled_from(TRAINERS), n=st.integers(1, 3), replay=st.booleans())
    def train_lease(self, trainer, n, replay):
        self.lease_into(self.trainers[trainer], self.train_held[trainer], n, replay, "sample_id", self.accepted)

    @precondition(lambda self: any(self.train_held.values()))
    @rule(data=st.data(), durable=st.booleans(), replay=st.booleans())
    def ack(self, data, durable, replay):
        trainer, picked = self.hand_back(data, self.train_held)
        self.ack_refs(trainer, picked, data, durable, replay)

    def ack_refs(self, trainer, picked, data, durable, replay):
        ids = [r.sample_id for r in picked]
        recorded = int(self.cp.redis.hget(self.cp.keys.durable, "global_step") or 0)
        step = recorded + data.draw(st.integers(0, 2))
        allowed = self.fenced_to(self.trainers[trainer], self.cp.keys.train_leases)
        acked = self.replayed(lambda rid: self.trainers[trainer].ack(
            ids, global_step=step, optimizer_durable=durable, request_id=rid), replay)
        assert set(acked) <= set(ids) & allowed and len(set(acked)) == len(acked)

    @precondition(lambda self: any(self.train_held.values()))
    @rule(data=st.data(), retryable=st.booleans(), replay=st.booleans())
    def fail_samples(self, data, retryable, replay):
        trainer, picked = self.hand_back(data, self.train_held)
        self.fail_items(self.trainers[trainer], [r.sample_id for r in picked], self.cp.keys.train_leases,
                        retryable, replay)

    @rule(trainer=st.sampled_from(TRAINERS))
    def trainer_heartbeat(self, trainer):
        t = self.trainers[trainer]
        before = set(t.held)
        assert set(t.heartbeat()) <= before

    # ------------------------------------------------------------------ operators, store
    @rule()
    def reclaim(self):
        time.sleep(0.002)  # the 1 ms leases are past their deadline
        assert self.cp.reclaim_expired(batch=2) >= 0

    @rule()
    def requeue_undurable(self):
        assert self.cp.requeue_undurable(batch=2) >= 0

    @rule(data=st.data())
    def requeue_dead_letters(self, data):
        buried = [d["task_id"] for d in self.cp.dead_letters(count=50)]
        ids = data.draw(st.lists(st.sampled_from(buried + ["task-unknown"]), max_size=3))
        assert set(self.cp.requeue_dead_letters(ids)) <= set(buried)

    @rule(resident=st.sampled_from([0, 1000, 6000, 20000]), shard=st.integers(0, 1),
          seq_jump=st.sampled_from([None, None, -1, 0, 5]))
    def report(self, resident, shard, seq_jump):
        reporter = self.reporters[shard]
        if seq_jump is None:
            assert reporter.report(resident_bytes=resident, max_resident_bytes=50000).accepted
        else:  # the caller's own seq: possibly late (ignored) or far ahead
            stored = self.cp.redis.hget(self.cp.keys.shards, reporter.store_id) or self.cp.redis.hget(
                self.cp.keys.retired_shards, reporter.store_id) or "0"
            seq = max(1, int(stored.split("|")[0]) + seq_jump)
            reporter.report(resident_bytes=resident, seq=seq)

    @rule(shard=st.integers(0, 1))
    def deregister(self, shard):
        self.reporters[shard].deregister()

    @rule(paused=st.booleans())
    def operator_pause(self, paused):
        (self.cp.pause if paused else self.cp.resume)("model")

    @rule(high=st.sampled_from([None, 5000, 10000]), cap=st.sampled_from([None, 1, 3]),
          default=st.sampled_from([None, 0, 700]), train_cap=st.sampled_from([None, 1, 2]))
    def configure(self, high, cap, default, train_cap):
        self.cp.configure_backpressure(BackpressureConfig(
            high_watermark_bytes=high, low_watermark_bytes=None if high is None else high // 2,
            max_inflight_prompts_per_worker=cap, default_task_bytes=default, max_train_lease=train_cap))

    # ------------------------------------------------------------------ invariants
    @invariant()
    def run_is_consistent(self):
        keys, r = self.cp.keys, self.cp.redis
        state = {key.rsplit(":", 1)[-1]: value for key, (_, value) in dump_run(self.cp).items()}
        get = state.get
        pending, dlq, tasks = get("pending", []), get("dlq", {}), get("tasks", {})
        leases = get("prompt_leases", {})
        done = idset.members(r, keys.tasks_done)
        assert len(pending) == len(set(pending)), f"a task is pending twice: {pending}"
        places = [set(pending), set(leases), set(dlq), done]
        for task_id in self.ingested:
            where = [i for i, place in enumerate(places) if task_id in place]
            assert len(where) == 1, f"task {task_id} in places {where} (pending, leased, dlq, done)"
        assert set(tasks) == set(pending) | set(leases) | set(dlq), "records of live tasks only"
        assert set(get("task_bytes", {})) | set(get("task_attempts", {})) <= set(tasks)
        assert {m for m, _ in get("prompt_deadlines", [])} == set(leases)
        holders = collections.Counter(v.split("|", 3)[3] for v in leases.values())
        assert {w: int(n) for w, n in get("worker_inflight", {}).items()} == dict(holders)
        reserved = sum(int(v.split("|")[1]) for v in leases.values())
        assert int(get("bp", {}).get("reserved_bytes", 0)) == reserved
        shards = get("shards", {})
        assert int(get("bp", {}).get("resident_bytes", 0)) == sum(int(v.split("|")[1]) for v in shards.values())
        assert not set(shards) & set(get("retired_shards", {}))

        queue, train_leases = get("train_queue", []), get("train_leases", {})
        acked = idset.members(r, keys.acked)
        failed = get("failed_samples", {})
        undurable = {m for m, _ in get("undurable", [])}
        assert len(queue) == len(set(queue)), f"a sample is queued twice: {queue}"
        places = [set(queue), set(train_leases), acked, set(failed)]
        for sample_id in self.accepted:
            where = [i for i, place in enumerate(places) if sample_id in place]
            assert len(where) == 1, f"sample {sample_id} in places {where} (queue, leased, acked, failed)"
        assert set(queue) | set(train_leases) | acked | set(failed) == self.accepted
        assert undurable <= acked
        assert set(get("samples", {})) == set(queue) | set(train_leases) | undurable
        assert {m for m, _ in get("train_deadlines", [])} == set(train_leases)

        counters = {k: int(v) for k, v in get("counters", {}).items()}
        assert counters.get("prompts", 0) == len(self.ingested)
        assert counters.get("prompts_done", 0) == len(done) == idset.count(r, keys.tasks_done)
        assert counters.get("samples_committed", 0) == len(self.accepted)
        assert counters.get("samples_acked", 0) == len(acked) == idset.count(r, keys.acked)
        marker = {k: int(v) for k, v in get("durable", {}).items() if k.endswith("global_step")}
        assert marker.get("durable_global_step", -1) <= marker.get("global_step", -1)


# No shrinking: a failure prints its whole call sequence at once, where shrinking a
# sequence of real Redis calls could run for minutes.
ControlPlaneModel.TestCase.settings = settings(
    max_examples=100, stateful_step_count=30, deadline=None, database=None,
    phases=(Phase.explicit, Phase.generate), suppress_health_check=list(HealthCheck))


def test_random_call_sequences_keep_every_invariant(redis_url):
    ControlPlaneModel.url = redis_url
    from hypothesis.stateful import run_state_machine_as_test
    run_state_machine_as_test(ControlPlaneModel, settings=ControlPlaneModel.TestCase.settings)
