"""The prompt and sample lifecycle on a real Redis (issue point 4, and the seed's lifecycle).

Leases carry deadlines computed from Redis TIME; heartbeat extends them; expired prompt
leases go back to pending with attempt + 1 and expired train leases back to the queue,
with no daemon (reclaim runs inside lease calls, bounded per call, and through
reclaim_expired()); max_prompt_attempts ends in the dead-letter set with the reason.
"""

from __future__ import annotations

import time

import pytest

from conftest import dump_run, make_ref
from dataflow_redis import FeatureSpec, PromptTask, RecordTooLarge, SampleRef

SEED_STATUS_FIELDS = (
    "run_id", "prompts", "prompts_pending", "prompts_leased", "prompts_failed", "samples_committed",
    "train_backlog", "queue_depth", "queue_in_flight", "rollout_workers", "trainers",
    "durable_global_step", "durable_acked",
)


def redis_now_ms(client) -> int:
    seconds, micros = client.time()
    return seconds * 1000 + micros // 1000


def wait_for_redis_time(client, deadline_ms: int, timeout_s: float = 10.0) -> None:
    """Sleep until the Redis server's clock is past ``deadline_ms``."""
    give_up = time.monotonic() + timeout_s
    while redis_now_ms(client) <= deadline_ms:
        assert time.monotonic() < give_up, "Redis time did not reach the deadline"
        time.sleep(0.01)


def prompt_deadline(cp, task_id):
    score = cp.redis.zscore(cp.keys.prompt_deadlines, task_id)
    return None if score is None else int(score)


def train_deadline(cp, sample_id):
    score = cp.redis.zscore(cp.keys.train_deadlines, sample_id)
    return None if score is None else int(score)


# ------------------------------------------------------------------ basics

def test_full_lifecycle_and_every_seed_status_field(cp):
    assert cp.ingest_prompts([{"task_id": "t0", "payload": {"text": "hi"}}, {"task_id": "t1"}]) == ["t0", "t1"]
    status = cp.status()
    for field in SEED_STATUS_FIELDS:
        assert field in status, field
    assert (status["prompts"], status["prompts_pending"]) == (2, 2)

    w = cp.rollout_worker(worker_id="w1")
    tasks = w.lease(8)
    assert [t.task_id for t in tasks] == ["t0", "t1"]
    assert tasks[0].payload == {"text": "hi"} and tasks[0].attempt == 0 and tasks[0].run_id == cp.run_id
    status = cp.status()
    assert (status["prompts_pending"], status["prompts_leased"], status["rollout_workers"]) == (0, 2, 1)
    assert cp.worker_inflight() == {"w1": 2}

    assert w.commit([make_ref(cp, "s0", "t0"), make_ref(cp, "s1", "t1")]) == ["s0", "s1"]
    status = cp.status()
    assert (status["prompts_leased"], status["samples_committed"], status["queue_depth"],
            status["train_backlog"]) == (0, 2, 2, 2)
    assert cp.worker_inflight() == {}

    t = cp.trainer(trainer_id="tr1")
    refs = t.lease(1)
    assert [r.sample_id for r in refs] == ["s0"]
    status = cp.status()
    assert (status["queue_depth"], status["queue_in_flight"], status["trainers"]) == (1, 1, 1)
    assert t.ack(["s0"], global_step=1, optimizer_durable=True) == ["s0"]
    assert [r.sample_id for r in t.lease(4)] == ["s1"]
    assert t.ack(["s1"], global_step=2, optimizer_durable=True) == ["s1"]
    status = cp.status()
    assert status["train_backlog"] == 0 and status["queue_in_flight"] == 0 and status["queue_depth"] == 0
    assert status["checkpoint_global_step"] == 2 and status["durable_acked"] == 2
    assert status["prompts_failed"] == 0 and status["run_id"] == cp.run_id


def test_ingest_generates_missing_ids_and_pending_is_fifo(cp):
    ids = cp.ingest_prompts([{"payload": i} for i in range(5)] + [{"task_id": "named"}])
    assert len(ids) == 6 and len(set(ids)) == 6 and ids[-1] == "named"
    w = cp.rollout_worker()
    leased = [t.task_id for t in w.lease(2)] + [t.task_id for t in w.lease(10)]
    assert leased == ids
    assert [t.payload for t in w.lease(1)] == []


def test_records_round_trip_every_field(cp):
    task = PromptTask(task_id="full", run_id=cp.run_id, source_id="gsm8k", payload=[{"role": "user", "content": "x"}],
                      max_length=2048, chat_template="llama3", loss_mask_policy="assistant",
                      target_model_version="tm-1", draft_weight_version="dw-7",
                      metadata={"lang": "en", "nested": {"k": [1, 2.5, None, True]}}, estimated_bytes=4096)
    cp.ingest_prompts([task])
    w = cp.rollout_worker()
    (leased,) = w.lease(1)
    assert leased == task
    ref = SampleRef(sample_id="sx", run_id=cp.run_id, source_task_id="full", feature_store_uri="s3://b/x",
                    feature_keys=("sx/h", "sx/t"),
                    feature_specs=(FeatureSpec("h", (3, 4096), "bfloat16"), FeatureSpec("t", (3,), "int64")),
                    strategy="dflash", schema_version=2, versions={"target": "tm-1"}, num_tokens=3,
                    estimated_bytes=24576, metadata={"score": 0.5})
    assert w.commit([ref]) == ["sx"]
    (got,) = cp.trainer().lease(1)
    assert got == ref


def test_offline_refs_join_the_same_queue(cp):
    assert cp.enqueue_offline_refs([make_ref(cp, "off-0"), make_ref(cp, "off-1")]) == ["off-0", "off-1"]
    assert cp.enqueue_offline_refs([make_ref(cp, "off-0")]) == []
    t = cp.trainer()
    assert [r.sample_id for r in t.lease(5)] == ["off-0", "off-1"]
    assert cp.status()["samples_committed"] == 2


def test_a_large_offline_enqueue_goes_in_bounded_steps_and_retries_apply_once(cp):
    """2,500 refs: several script calls of at most 1,000 (each short), one reply; a
    retry with the request id returns it and adds nothing; a record over the limit
    anywhere refuses the whole call before any step is written."""
    refs = [make_ref(cp, f"off-{i}") for i in range(2500)]
    calls_before = cp.redis.info("commandstats").get("cmdstat_evalsha", {}).get("calls", 0)
    assert cp.enqueue_offline_refs(refs, request_id="bulk-1") == [r.sample_id for r in refs]
    assert cp.redis.info("commandstats")["cmdstat_evalsha"]["calls"] - calls_before >= 3
    assert cp.enqueue_offline_refs(refs, request_id="bulk-1") == [r.sample_id for r in refs]
    assert cp.status()["samples_committed"] == 2500 and cp.redis.llen(cp.keys.train_queue) == 2500
    cp.configure(max_record_bytes=4096)
    more = [make_ref(cp, f"more-{i}") for i in range(2000)]
    more[1800] = make_ref(cp, "more-big", metadata={"blob": "x" * 5000})
    before = dump_run(cp)
    with pytest.raises(RecordTooLarge, match="record more-big is"):
        cp.enqueue_offline_refs(more)
    assert dump_run(cp) == before


# ------------------------------------------------------ deadlines from TIME

def test_prompt_and_train_lease_deadlines_come_from_redis_time(cp, monkeypatch):
    # A client clock 30 years off must not matter: nothing stored comes from it.
    monkeypatch.setattr(time, "time", lambda: 1e9)
    cp.ingest_prompts([{"task_id": "t0"}])
    w = cp.rollout_worker(lease_s=30)
    before = redis_now_ms(cp.redis)
    w.lease(1)
    after = redis_now_ms(cp.redis)
    assert before + 30_000 <= prompt_deadline(cp, "t0") <= after + 30_000
    granted_ms = int(cp.redis.hget(cp.keys.prompt_leases, "t0").split("|")[2])
    assert before <= granted_ms <= after

    w.commit([make_ref(cp, "s0", "t0")])
    t = cp.trainer(lease_s=12.5)
    before = redis_now_ms(cp.redis)
    t.lease(1)
    after = redis_now_ms(cp.redis)
    assert before + 12_500 <= train_deadline(cp, "s0") <= after + 12_500
    (lease,) = cp.leases("train")
    assert lease["id"] == "s0" and lease["deadline_ms"] == train_deadline(cp, "s0")


def test_heartbeat_extends_prompt_and_train_leases(cp):
    cp.ingest_prompts([{"task_id": "t0"}, {"task_id": "t1"}])
    w = cp.rollout_worker(lease_s=1.0)
    w.lease(1)
    first_deadline = prompt_deadline(cp, "t0")
    # Keep the lease alive well past its first deadline by heartbeats alone.
    while redis_now_ms(cp.redis) <= first_deadline + 200:
        assert w.heartbeat() == []
        time.sleep(0.1)
    assert w.heartbeat() == []
    extended = prompt_deadline(cp, "t0")
    assert extended > first_deadline + 200
    assert extended <= redis_now_ms(cp.redis) + 1000
    assert cp.reclaim_expired() == 0
    assert w.commit([make_ref(cp, "s0", "t0")]) == ["s0"]

    t = cp.trainer(lease_s=1.0)
    t.lease(1)
    first_deadline = train_deadline(cp, "s0")
    while redis_now_ms(cp.redis) <= first_deadline + 200:
        assert t.heartbeat() == []
        time.sleep(0.1)
    assert t.heartbeat() == []
    assert train_deadline(cp, "s0") > first_deadline + 200
    assert cp.reclaim_expired() == 0
    assert t.ack(["s0"]) == ["s0"]


def test_a_heartbeat_of_many_leases_goes_in_chunks_and_extends_them_all(cp, monkeypatch):
    from dataflow_redis import holder
    monkeypatch.setattr(holder, "HEARTBEAT_CHUNK", 4)
    cp.ingest_prompts([{"task_id": f"t{i}"} for i in range(10)])
    w = cp.rollout_worker(lease_s=30.0)
    assert len(w.lease(10)) == 10
    before = {f"t{i}": prompt_deadline(cp, f"t{i}") for i in range(10)}
    time.sleep(0.05)
    calls = []
    run = cp._run
    monkeypatch.setattr(cp, "_run", lambda name, args, *rest, **kw: calls.append(name) or run(name, args, *rest, **kw))
    assert w.heartbeat() == []
    assert calls == ["extend_leases"] * 3  # 4 + 4 + 2 leases
    assert all(prompt_deadline(cp, task_id) > deadline for task_id, deadline in before.items())
    calls.clear()
    assert cp.rollout_worker(worker_id="idle").heartbeat() == [] and calls == ["extend_leases"]


@pytest.fixture
def small_steps(monkeypatch):
    """Hand-backs (commit, fail, ack) in steps of 4 items; returns the scripts run."""
    from dataflow_redis import holder, rollout
    monkeypatch.setattr(holder, "HAND_BACK_CHUNK", 4)
    monkeypatch.setattr(rollout, "HAND_BACK_CHUNK", 4)
    return monkeypatch


def before_step(cp, monkeypatch, n, action) -> None:
    """Run ``action()`` just before the ``n``-th script call from here on (it may raise:
    a process dying, Redis refusing)."""
    run, calls = cp._run, []

    def step(name, args, *rest, **kw):
        calls.append(name)
        if len(calls) == n:
            action()
        return run(name, args, *rest, **kw)

    monkeypatch.setattr(cp, "_run", step)


def record_scripts(cp, monkeypatch) -> list[str]:
    calls: list[str] = []
    run = cp._run
    monkeypatch.setattr(cp, "_run", lambda name, args, *rest, **kw: calls.append(name) or run(name, args, *rest, **kw))
    return calls


def test_a_large_commit_goes_in_steps_keeping_the_refs_of_a_task_together(cp, small_steps):
    cp.ingest_prompts([{"task_id": f"t{i}"} for i in range(5)])
    w = cp.rollout_worker("w", lease_s=60)
    assert len(w.lease(5)) == 5
    # t0 has a ref at each end of the call: split by position, its lease would be
    # released with the first step and the last ref fenced.
    refs = [make_ref(cp, f"s{i}", f"t{i}") for i in range(5)] + [make_ref(cp, "s0-b", "t0"),
                                                                   make_ref(cp, "s1", "t1")]
    calls = record_scripts(cp, small_steps)
    expected = ["s0", "s1", "s2", "s3", "s4", "s0-b"]
    assert w.commit(refs, request_id="big-commit") == expected        # call order, each id once
    assert calls == ["commit_samples"] * 2                          # {t0, t0, t1, t1}, then {t2, t3, t4}
    status = cp.status()
    assert (status["prompts_done"], status["queue_depth"], status["fenced_commits"]) == (5, 6, 0)
    assert cp.worker_inflight() == {} and w.held == []
    before = dump_run(cp)
    assert w.commit(refs, request_id="big-commit") == expected        # a retry applies nothing
    assert dump_run(cp) == before


def test_a_large_ack_goes_in_steps_and_moves_the_durable_marker_with_the_last(cp, small_steps):
    cp.enqueue_offline_refs([make_ref(cp, f"s{i}") for i in range(10)])
    t = cp.trainer("tr", lease_s=60)
    leased = [r.sample_id for r in t.lease(10)]
    run = cp._run

    def die():
        raise KeyboardInterrupt("the trainer dies between two steps")

    before_step(cp, small_steps, 3, die)
    with pytest.raises(KeyboardInterrupt):
        t.ack(leased, global_step=5, optimizer_durable=True)
    status = cp.status()
    # The first two steps were acked at step 5, not durably: the marker did not move.
    assert (status["samples_acked"], status["checkpoint_global_step"], status["uncheckpointed_acked"]) == (8, None, 8)
    assert cp.requeue_undurable() == 8                              # a restart replays them
    small_steps.setattr(cp, "_run", run)
    t2 = cp.trainer("tr2", lease_s=60)
    cp.reclaim_expired()
    replay = [r.sample_id for r in t2.lease(10)]
    assert sorted(replay) == sorted(leased[:8])
    assert sorted(t2.ack(replay, global_step=5, optimizer_durable=True)) == sorted(leased[:8])
    status = cp.status()
    assert (status["samples_acked"], status["checkpoint_global_step"], status["uncheckpointed_acked"]) == (8, 5, 0)


def test_a_large_ack_is_not_refused_halfway_when_another_trainer_moves_the_step(cp, small_steps):
    """Data-parallel ranks: rank B records step 6 between two steps of rank A's ack at
    step 5. A's later steps are not checked again (its first one was), and the durable
    marker never moves back."""
    cp.enqueue_offline_refs([make_ref(cp, f"s{i}") for i in range(10)])
    a, b = cp.trainer("rank-a", lease_s=60), cp.trainer("rank-b", lease_s=60)
    mine, theirs = [r.sample_id for r in a.lease(9)], [r.sample_id for r in b.lease(1)]
    before_step(cp, small_steps, 2, lambda: b.ack(theirs, global_step=6, optimizer_durable=True))
    assert sorted(a.ack(mine, global_step=5, optimizer_durable=True)) == sorted(mine)
    status = cp.status()
    assert (status["samples_acked"], status["durable_global_step"], status["checkpoint_global_step"]) == (10, 6, 6)
    assert status["uncheckpointed_acked"] == 0 and a.held == []


def test_a_large_durable_ack_without_a_step_is_durable_in_every_step(cp, small_steps):
    """No step named, none on record: there is no checkpoint for the last step to move,
    so every step carries optimizer_durable and nothing is left to replay."""
    cp.enqueue_offline_refs([make_ref(cp, f"s{i}") for i in range(9)])
    t = cp.trainer("tr", lease_s=60)
    ids = [r.sample_id for r in t.lease(9)]
    assert sorted(t.ack(ids, optimizer_durable=True)) == sorted(ids)
    assert cp.redis.zcard(cp.keys.undurable) == 0 and cp.requeue_undurable() == 0
    assert cp.redis.hlen(cp.keys.samples) == 0


def test_a_large_ack_under_way_when_the_run_is_rolled_back_does_not_undo_the_rollback(cp, small_steps):
    """requeue_undurable (a restart from the checkpoint at step 4) runs between two steps
    of an ack at step 7. The rest of that ack must not move the marker back over the
    rollback: the restarted trainer acks from step 5, and recovery still works."""
    cp.enqueue_offline_refs([make_ref(cp, f"s{i}") for i in range(10)])
    old = cp.trainer("old", lease_s=60)
    old.ack([r.sample_id for r in old.lease(1)], global_step=4, optimizer_durable=True)
    held = [r.sample_id for r in old.lease(9)]
    run, requeued = cp._run, []
    before_step(cp, small_steps, 2, lambda: requeued.append(cp.requeue_undurable()))
    old.ack(held, global_step=7, optimizer_durable=True)
    small_steps.setattr(cp, "_run", run)
    assert requeued == [4]                                       # the first step's 4 ids
    status = cp.status()
    assert (status["durable_global_step"], status["checkpoint_global_step"]) == (4, 4)
    restarted = cp.trainer("restarted", lease_s=60)
    replay = [r.sample_id for r in restarted.lease(10)]
    assert sorted(replay) == sorted(held[:4])
    assert sorted(restarted.ack(replay[:2], global_step=5)) == sorted(replay[:2])
    # Recovery is not wedged: it replays the restarted trainer's 2 and the old ack's
    # middle step (4 ids at step 7, consumed by a state the rollback discarded).
    assert cp.requeue_undurable(after_step=4) == 6


def test_the_rest_of_a_large_ack_after_a_crash_that_lost_its_first_step_goes_on(cp, small_steps):
    """With appendfsync everysec a crash can lose the first step's marker update. The
    later steps neither fail nor jump the marker: it stays where Redis has it."""
    cp.enqueue_offline_refs([make_ref(cp, f"s{i}") for i in range(9)])
    t = cp.trainer("tr", lease_s=60)
    t.ack([r.sample_id for r in t.lease(1)], global_step=6, optimizer_durable=True)
    ids = [r.sample_id for r in t.lease(8)]
    # The first step's update of the marker is lost; its acked ids are not.
    before_step(cp, small_steps, 2,
                lambda: cp.redis.hset(cp.keys.durable, mapping={"global_step": 6, "durable_global_step": 6}))
    assert sorted(t.ack(ids, global_step=7, optimizer_durable=True)) == sorted(ids)
    status = cp.status()
    assert (status["durable_global_step"], status["checkpoint_global_step"], status["samples_acked"]) == (6, 6, 9)


def test_a_large_commit_checks_every_record_before_its_first_step(cp, small_steps):
    cp.configure(max_record_bytes=2048)
    cp.ingest_prompts([{"task_id": f"t{i}"} for i in range(9)])
    w = cp.rollout_worker("w", lease_s=60)
    tasks = w.lease(9)
    refs = [make_ref(cp, f"s{i}", t.task_id) for i, t in enumerate(tasks)]
    refs[-1] = make_ref(cp, "s8", tasks[-1].task_id, metadata={"note": "x" * 4000})
    before = dump_run(cp)
    with pytest.raises(RecordTooLarge, match="record s8"):
        w.commit(refs)
    assert dump_run(cp) == before


def test_an_error_in_a_later_step_says_what_the_earlier_steps_did(cp, small_steps):
    from dataflow_redis import OutOfMemory
    cp.ingest_prompts([{"task_id": f"t{i}"} for i in range(9)])
    w = cp.rollout_worker("w", lease_s=60)
    ids = [t.task_id for t in w.lease(9)]
    def full():
        raise OutOfMemory("Redis is at its maxmemory ...; this call changed nothing. Trainers still lease")

    before_step(cp, small_steps, 2, full)
    with pytest.raises(OutOfMemory) as info:
        w.fail(ids, "bad batch", retryable=False)
    message = str(info.value)
    assert "this call changed nothing" not in message and "this step changed nothing" in message
    assert "earlier steps handled 4 of its 9 items" in message
    assert len(cp.dead_letters()) == 4


def test_a_bulk_terminal_fail_keeps_every_task_but_few_events(cp):
    """40 tasks dead-lettered in one call: all 40 are in the dead-letter list, but the
    capped events stream gets 16 of them and one line saying more followed, so the
    pause, resume and config events in it survive a bulk failure."""
    cp.ingest_prompts([{"task_id": f"t{i:02d}"} for i in range(40)])
    cp.pause("before")
    cp.resume("after")
    w = cp.rollout_worker("w", lease_s=60)
    ids = [t.task_id for t in w.lease(40)]
    assert w.fail(ids, "bad shard", retryable=False) == ids
    assert len(cp.dead_letters(count=100)) == 40
    dead = [e for e in cp.events(count=1000) if e["type"] == "dead_letter"]
    assert len(dead) == 17 and dead[0]["reason"] == "t00: bad shard"
    assert dead[-1]["reason"] == "more tasks in the same call: see the dead-letter list"
    assert [e["type"] for e in cp.events(count=1000)][:2] == ["operator_pause", "operator_resume"]


def test_a_large_fail_goes_in_steps(cp, small_steps):
    cp.ingest_prompts([{"task_id": f"t{i}"} for i in range(9)])
    w = cp.rollout_worker("w", lease_s=60)
    ids = [t.task_id for t in w.lease(9)]
    calls = record_scripts(cp, small_steps)
    assert w.fail(ids, "bad batch", retryable=False) == ids
    assert calls == ["fail_prompts"] * 3
    assert len(cp.dead_letters()) == 9 and cp.worker_inflight() == {}


def test_heartbeat_reports_leases_lost_meanwhile(cp):
    cp.ingest_prompts([{"task_id": "t0"}])
    slow = cp.rollout_worker(worker_id="slow", lease_s=0.05)
    slow.lease(1)
    wait_for_redis_time(cp.redis, prompt_deadline(cp, "t0"))
    cp.rollout_worker(worker_id="fast", lease_s=30).lease(1)
    deadline_of_new_holder = prompt_deadline(cp, "t0")
    assert slow.heartbeat() == ["t0"]
    assert slow.held == []
    assert prompt_deadline(cp, "t0") == deadline_of_new_holder, "a lost lease must not be extended"


# --------------------------------------------------------------- reclaim

def test_expired_prompt_lease_returns_to_pending_with_attempt_plus_one(cp):
    cp.ingest_prompts([{"task_id": "t0"}, {"task_id": "t1"}])
    w = cp.rollout_worker(worker_id="w1", lease_s=0.05)
    w.lease(1)
    wait_for_redis_time(cp.redis, prompt_deadline(cp, "t0"))
    assert cp.reclaim_expired() == 1
    assert cp.redis.lrange(cp.keys.pending, 0, -1) == ["t1", "t0"]  # back to the tail
    assert cp.worker_inflight() == {}
    assert cp.status()["prompts_leased"] == 0
    again = cp.rollout_worker(lease_s=30)
    assert [(t.task_id, t.attempt) for t in again.lease(2)] == [("t1", 0), ("t0", 1)]


def test_a_lease_call_reclaims_expired_leases_itself(cp):
    cp.ingest_prompts([{"task_id": "t0"}])
    crashed = cp.rollout_worker(worker_id="crashed", lease_s=0.05)
    crashed.lease(1)
    wait_for_redis_time(cp.redis, prompt_deadline(cp, "t0"))
    survivor = cp.rollout_worker(worker_id="survivor", lease_s=30)
    (task,) = survivor.lease(1)
    assert (task.task_id, task.attempt) == ("t0", 1)
    assert cp.worker_inflight() == {"survivor": 1}


def test_reclaim_inside_a_lease_call_is_bounded(cp):
    cp.ingest_prompts([{"task_id": f"t{i:03d}"} for i in range(100)])
    crashed = cp.rollout_worker(worker_id="crashed", lease_s=0.05)
    assert len(crashed.lease(100)) == 100
    wait_for_redis_time(cp.redis, max(prompt_deadline(cp, f"t{i:03d}") for i in range(100)))
    cp.rollout_worker(worker_id="next", lease_s=30).lease(1)
    # One lease call reclaimed exactly 32 (RECLAIM_PER_CALL) and granted one of them.
    assert cp.redis.hlen(cp.keys.prompt_leases) == 100 - 32 + 1
    assert cp.redis.llen(cp.keys.pending) == 31
    assert cp.worker_inflight() == {"crashed": 68, "next": 1}
    assert cp.reclaim_expired() == 68
    assert cp.worker_inflight() == {"next": 1}
    assert cp.redis.llen(cp.keys.pending) == 99


def test_expired_train_lease_returns_to_the_queue(cp):
    cp.enqueue_offline_refs([make_ref(cp, "s0"), make_ref(cp, "s1")])
    t = cp.trainer(trainer_id="crashed", lease_s=0.05)
    assert [r.sample_id for r in t.lease(1)] == ["s0"]
    wait_for_redis_time(cp.redis, train_deadline(cp, "s0"))
    assert cp.reclaim_expired() == 1
    assert cp.redis.lrange(cp.keys.train_queue, 0, -1) == ["s0", "s1"]  # back to the head
    assert cp.status()["queue_in_flight"] == 0

    # And through a lease call, without reclaim_expired():
    t.lease(1)
    wait_for_redis_time(cp.redis, train_deadline(cp, "s0"))
    other = cp.trainer(trainer_id="other", lease_s=30)
    assert [r.sample_id for r in other.lease(2)] == ["s0", "s1"]
    assert t.ack(["s0"]) == []  # the crashed trainer's lease is gone
    assert other.ack(["s0", "s1"]) == ["s0", "s1"]


def test_three_attempts_by_expiry_then_dead_letter_with_reason(cp):
    cp.configure(max_prompt_attempts=3)
    cp.ingest_prompts([{"task_id": "t0"}])
    seen_attempts = []
    for _ in range(3):
        w = cp.rollout_worker(lease_s=0.05)
        (task,) = w.lease(1)
        seen_attempts.append(task.attempt)
        wait_for_redis_time(cp.redis, prompt_deadline(cp, "t0"))
    assert cp.reclaim_expired() == 1
    assert seen_attempts == [0, 1, 2]
    assert cp.rollout_worker().lease(1) == []
    (dead,) = cp.dead_letters()
    assert dead["task_id"] == "t0" and dead["attempt"] == 2
    assert "attempts exhausted" in dead["reason"] and "max_prompt_attempts=3" in dead["reason"]
    assert "expired" in dead["reason"]
    status = cp.status()
    assert (status["prompts_failed"], status["prompts_pending"], status["prompts_leased"]) == (1, 0, 0)
    assert cp.worker_inflight() == {}


def test_three_attempts_by_retryable_fail_then_dead_letter(cp):
    cp.configure(max_prompt_attempts=3)
    cp.ingest_prompts([{"task_id": "t0"}])
    w = cp.rollout_worker()
    seen_attempts = []
    for _ in range(3):
        (task,) = w.lease(1)
        seen_attempts.append(task.attempt)
        assert w.fail(["t0"], "worker died before its write", retryable=True) == ["t0"]
    assert seen_attempts == [0, 1, 2]
    assert w.lease(1) == []
    (dead,) = cp.dead_letters()
    assert "attempts exhausted" in dead["reason"] and "worker died before its write" in dead["reason"]
    assert cp.worker_inflight() == {}


def test_terminal_fail_is_visible_and_an_operator_can_requeue(cp):
    cp.ingest_prompts([{"task_id": "t0", "payload": "keep me"}])
    w = cp.rollout_worker()
    w.lease(1)
    assert w.fail(["t0"], "missing feature", retryable=False) == ["t0"]
    (dead,) = cp.dead_letters()
    assert (dead["task_id"], dead["reason"], dead["attempt"]) == ("t0", "missing feature", 0)
    assert cp.status()["prompts_failed"] == 1
    assert cp.requeue_dead_letters(["t0", "unknown"]) == ["t0"]
    (task,) = w.lease(1)
    assert (task.task_id, task.attempt, task.payload) == ("t0", 0, "keep me")


def test_fail_touches_only_the_callers_leases(cp):
    cp.ingest_prompts([{"task_id": "t0"}])
    owner = cp.rollout_worker(worker_id="owner")
    owner.lease(1)
    before = dump_run(cp)
    assert cp.rollout_worker(worker_id="intruder").fail(["t0", "nope"], "x", retryable=False) == []
    after = dump_run(cp)
    after = {k: v for k, v in after.items() if ":reply:" not in k}
    assert after == {k: v for k, v in before.items() if ":reply:" not in k}


@pytest.mark.parametrize("kind", ["prompt", "train"])
def test_leases_listing_shows_holder_and_deadline(cp, kind):
    cp.ingest_prompts([{"task_id": "t0"}])
    w = cp.rollout_worker(worker_id="w1", lease_s=30)
    w.lease(1)
    if kind == "train":
        w.commit([make_ref(cp, "s0", "t0")])
        cp.trainer(trainer_id="tr1", lease_s=30).lease(1)
    (row,) = cp.leases(kind)
    assert row["holder"] == ("w1" if kind == "prompt" else "tr1")
    assert row["deadline_ms"] > row["granted_ms"]


@pytest.mark.parametrize("kind", ["prompt", "train"])
def test_leases_listing_never_pairs_an_old_holder_with_a_new_deadline(cp, kind, monkeypatch):
    """A lease re-granted while the listing runs shows its new holder with that holder's
    token and deadline: the row is read whole, in one step, after the scan found the id."""
    if kind == "prompt":
        cp.ingest_prompts([{"task_id": "t0"}])
        cp.rollout_worker(worker_id="old", lease_s=0.05).lease(1)
    else:
        cp.enqueue_offline_refs([make_ref(cp, "s0")])
        cp.trainer(trainer_id="old", lease_s=0.05).lease(1)
    (stale,) = cp.leases(kind)
    wait_for_redis_time(cp.redis, stale["deadline_ms"])

    scan = type(cp.redis).hscan_iter

    def scan_then_regrant(self, *args, **kwargs):
        for item in scan(self, *args, **kwargs):
            yield item
        # The old lease expires and goes to "new" after the scan, before the rows are read.
        if kind == "prompt":
            assert [t.task_id for t in cp.rollout_worker(worker_id="new", lease_s=30).lease(1)] == ["t0"]
        else:
            assert [r.sample_id for r in cp.trainer(trainer_id="new", lease_s=30).lease(1)] == ["s0"]

    monkeypatch.setattr(type(cp.redis), "hscan_iter", scan_then_regrant)
    (row,) = cp.leases(kind)
    assert row["holder"] == "new" and row["token"] > stale["token"]
    assert row["deadline_ms"] == row["granted_ms"] + 30_000
    if kind == "prompt":
        assert row["attempt"] == 1
