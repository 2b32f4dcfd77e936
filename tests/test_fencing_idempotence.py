"""Fencing and idempotence (issue point 5, and the request-id retries the lifecycle promises).

A late commit, fail or ack from a holder whose lease expired and was re-granted is
rejected; duplicates never enqueue twice nor leak in-flight slots; unknown ids ack
nothing; an acked ref is never requeued; re-ingest never duplicates; a call retried with
the same request id returns the first reply and applies once.
"""

from __future__ import annotations

import time

import pytest

from conftest import dump_run, make_ref
from dataflow_redis import ControlPlane, idset


def redis_now_ms(client) -> int:
    seconds, micros = client.time()
    return seconds * 1000 + micros // 1000


def wait_past(client, deadline_ms: float) -> None:
    give_up = time.monotonic() + 10
    while redis_now_ms(client) <= deadline_ms:
        assert time.monotonic() < give_up
        time.sleep(0.01)


def without_replies(dump: dict) -> dict:
    return {k: v for k, v in dump.items() if ":reply:" not in k}


def regrant_prompt(cp, task_id="t0", late_id="late", new_id="new"):
    """Lease task_id to worker late_id with a tiny lease, let it expire, re-grant it to
    a new client with id new_id (the same id: a restarted process)."""
    late = cp.rollout_worker(worker_id=late_id, lease_s=0.05)
    (task,) = late.lease(1)
    assert task.task_id == task_id
    wait_past(cp.redis, cp.redis.zscore(cp.keys.prompt_deadlines, task_id))
    new = cp.rollout_worker(worker_id=new_id, lease_s=30)
    (task,) = new.lease(1)
    assert (task.task_id, task.attempt) == (task_id, 1)
    return late, new


# ----------------------------------------------------------------- fencing

def test_late_commit_from_an_expired_and_regranted_lease_is_rejected(cp):
    cp.ingest_prompts([{"task_id": "t0"}])
    late, new = regrant_prompt(cp)
    before = cp.status()
    assert late.commit([make_ref(cp, "s-late", "t0")]) == []
    after = cp.status()
    assert after["samples_committed"] == before["samples_committed"] == 0
    assert after["queue_depth"] == 0 and after["fenced_commits"] == 1
    assert not cp.redis.hexists(cp.keys.samples, "s-late")
    assert cp.worker_inflight() == {"new": 1}
    # The new holder's commit goes through.
    assert new.commit([make_ref(cp, "s-new", "t0")]) == ["s-new"]
    assert cp.worker_inflight() == {}


def test_late_commit_is_fenced_even_when_the_same_worker_id_got_the_task_back(cp):
    cp.ingest_prompts([{"task_id": "t0"}])
    first, second = regrant_prompt(cp, late_id="w", new_id="w")
    assert first.commit([make_ref(cp, "old", "t0")]) == []  # stale fencing token
    assert second.commit([make_ref(cp, "fresh", "t0")]) == ["fresh"]


def test_a_stale_client_stays_fenced_after_its_heartbeat_reported_the_lease_lost(cp):
    """The heartbeat drops the tokens of lost leases; the stale client's next hand-back
    then carries no token, and no token holds nothing (it used to mean "any lease of
    this holder id", which let a restarted process's lease be taken over)."""
    cp.ingest_prompts([{"task_id": "t0"}])
    old, new = regrant_prompt(cp, late_id="w", new_id="w")
    assert old.heartbeat() == ["t0"] and old.held == []
    assert old.commit([make_ref(cp, "s-old", "t0")]) == []
    assert old.fail(["t0"], "late") == []
    assert new.commit([make_ref(cp, "s-new", "t0")]) == ["s-new"]

    old_trainer = cp.trainer(trainer_id="tr", lease_s=0.05)
    old_trainer.lease(1)
    wait_past(cp.redis, cp.redis.zscore(cp.keys.train_deadlines, "s-new"))
    new_trainer = cp.trainer(trainer_id="tr", lease_s=30)
    assert [r.sample_id for r in new_trainer.lease(1)] == ["s-new"]
    assert old_trainer.heartbeat() == ["s-new"]
    assert old_trainer.ack(["s-new"], global_step=1) == []
    assert old_trainer.fail(["s-new"], "late") == []
    assert new_trainer.ack(["s-new"], global_step=1) == ["s-new"]


def test_late_fail_from_an_expired_and_regranted_lease_is_rejected(cp):
    cp.ingest_prompts([{"task_id": "t0"}])
    late, new = regrant_prompt(cp)
    before = without_replies(dump_run(cp))
    assert late.fail(["t0"], "late", retryable=False) == []
    assert late.fail(["t0"], "late", retryable=True) == []
    assert without_replies(dump_run(cp)) == before
    assert new.fail(["t0"], "real", retryable=False) == ["t0"]


def test_late_ack_and_fail_from_an_expired_and_regranted_train_lease_are_rejected(cp):
    cp.enqueue_offline_refs([make_ref(cp, "s0")])
    late = cp.trainer(trainer_id="late", lease_s=0.05)
    late.lease(1)
    wait_past(cp.redis, cp.redis.zscore(cp.keys.train_deadlines, "s0"))
    new = cp.trainer(trainer_id="new", lease_s=30)
    assert [r.sample_id for r in new.lease(1)] == ["s0"]
    before = without_replies(dump_run(cp))
    assert late.fail(["s0"], "late", retryable=True) == []
    assert without_replies(dump_run(cp)) == before
    assert late.ack(["s0"], global_step=1) == []
    assert cp.status()["samples_acked"] == 0
    assert idset.contains(cp.redis, cp.keys.acked, ["s0"]) == [False]
    assert new.ack(["s0"], global_step=1) == ["s0"]


# ------------------------------------------------------------ duplicates

def test_duplicate_commit_neither_enqueues_twice_nor_leaks_the_inflight_slot(cp):
    cp.ingest_prompts([{"task_id": "t0"}, {"task_id": "t1"}])
    w = cp.rollout_worker(worker_id="w")
    w.lease(2)
    assert w.commit([make_ref(cp, "s0", "t0")]) == ["s0"]
    assert cp.worker_inflight() == {"w": 1}
    # A re-sent commit (e.g. after a crash between write and commit) together with new work.
    assert w.commit([make_ref(cp, "s0", "t0"), make_ref(cp, "s1", "t1")]) == ["s1"]
    assert cp.redis.lrange(cp.keys.train_queue, 0, -1) == ["s0", "s1"]
    assert cp.worker_inflight() == {}
    assert cp.status()["samples_committed"] == 2


def test_duplicate_sample_id_from_another_held_task_releases_that_lease(cp):
    cp.ingest_prompts([{"task_id": "t0"}, {"task_id": "t1"}])
    w = cp.rollout_worker(worker_id="w")
    w.lease(2)
    assert w.commit([make_ref(cp, "s0", "t0")]) == ["s0"]
    assert w.commit([make_ref(cp, "s0", "t1")]) == []  # same sample id: dropped
    assert cp.redis.lrange(cp.keys.train_queue, 0, -1) == ["s0"]
    assert cp.worker_inflight() == {}
    assert cp.status()["prompts_leased"] == 0


def test_duplicate_ids_inside_one_commit_enqueue_once(cp):
    cp.ingest_prompts([{"task_id": "t0"}])
    w = cp.rollout_worker(worker_id="w")
    w.lease(1)
    assert w.commit([make_ref(cp, "s0", "t0"), make_ref(cp, "s0", "t0"), make_ref(cp, "s1", "t0")]) == ["s0", "s1"]
    assert cp.redis.lrange(cp.keys.train_queue, 0, -1) == ["s0", "s1"]
    assert cp.worker_inflight() == {}


def test_commit_of_an_already_acked_or_failed_sample_is_not_enqueued(cp):
    cp.enqueue_offline_refs([make_ref(cp, "done"), make_ref(cp, "bad")])
    t = cp.trainer()
    t.lease(2)
    t.ack(["done"], global_step=1, optimizer_durable=True)
    t.fail(["bad"], "corrupt", retryable=False)
    cp.ingest_prompts([{"task_id": "t0"}])
    w = cp.rollout_worker(worker_id="w")
    w.lease(1)
    assert w.commit([make_ref(cp, "done", "t0"), make_ref(cp, "bad", "t0")]) == []
    assert cp.status()["queue_depth"] == 0
    assert cp.worker_inflight() == {}
    assert cp.enqueue_offline_refs([make_ref(cp, "done"), make_ref(cp, "bad")]) == []


def test_acking_unknown_or_unleased_ids_acks_nothing_and_backlog_stays_non_negative(cp):
    cp.enqueue_offline_refs([make_ref(cp, "queued"), make_ref(cp, "held")])
    t = cp.trainer()
    assert [r.sample_id for r in t.lease(1)] == ["queued"]
    other = cp.trainer()
    before = cp.status()
    assert other.ack(["unknown", "held", "queued"]) == []  # unknown, not leased, leased by t
    assert t.ack(["unknown", "held"]) == []
    after = cp.status()
    assert after["samples_acked"] == before["samples_acked"] == 0
    assert after["train_backlog"] == 2
    assert t.ack(["queued"]) == ["queued"]
    assert t.ack(["queued"]) == []  # twice: nothing more
    status = cp.status()
    assert status["samples_acked"] == 1 and status["train_backlog"] == 1
    for _ in range(3):
        cp.trainer().ack(["queued", "nope", "held"])
    status = cp.status()
    assert status["train_backlog"] == 1 and status["samples_acked"] == 1
    assert status["train_backlog"] >= 0


def test_retryable_fail_of_an_acked_ref_does_not_requeue_it(cp):
    cp.enqueue_offline_refs([make_ref(cp, "s0")])
    t = cp.trainer()
    t.lease(1)
    t.ack(["s0"], global_step=1)
    before = without_replies(dump_run(cp))
    assert t.fail(["s0"], "oops", retryable=True) == []
    assert cp.trainer().fail(["s0"], "oops", retryable=True) == []
    assert without_replies(dump_run(cp)) == before
    assert cp.status()["queue_depth"] == 0


def test_reingesting_an_existing_task_id_never_duplicates_it(cp):
    assert cp.ingest_prompts([{"task_id": "t0"}, {"task_id": "t0"}, {"task_id": "t1"}]) == ["t0", "t1"]
    assert cp.ingest_prompts([{"task_id": "t0"}]) == []  # pending
    w = cp.rollout_worker()
    w.lease(1)
    assert cp.ingest_prompts([{"task_id": "t0"}]) == []  # leased
    w.commit([make_ref(cp, "s0", "t0")])
    assert cp.ingest_prompts([{"task_id": "t0"}]) == []  # done
    w.lease(1)
    w.fail(["t1"], "broken", retryable=False)
    assert cp.ingest_prompts([{"task_id": "t1"}]) == []  # dead-lettered
    status = cp.status()
    assert status["prompts"] == 2 and status["prompts_pending"] == 0
    assert cp.redis.llen(cp.keys.pending) == 0


# --------------------------------------------------- retries by request id

def test_retried_prompt_lease_returns_the_same_grant_once(cp):
    cp.ingest_prompts([{"task_id": f"t{i}"} for i in range(5)])
    w = cp.rollout_worker(worker_id="w")
    first = w.lease(2, request_id="lease-1")
    again = w.lease(2, request_id="lease-1")
    assert [t.task_id for t in again] == [t.task_id for t in first] == ["t0", "t1"]
    assert cp.worker_inflight() == {"w": 2}
    assert cp.status()["prompts_pending"] == 3
    assert [t.task_id for t in w.lease(2, request_id="lease-2")] == ["t2", "t3"]


def test_retried_commit_returns_the_same_reply_and_applies_once(cp):
    cp.ingest_prompts([{"task_id": "t0"}])
    w = cp.rollout_worker(worker_id="w")
    w.lease(1)
    refs = [make_ref(cp, "s0", "t0")]
    assert w.commit(refs, request_id="commit-1") == ["s0"]
    assert w.commit(refs, request_id="commit-1") == ["s0"]
    status = cp.status()
    assert status["samples_committed"] == 1 and status["queue_depth"] == 1
    assert status["fenced_commits"] == 0
    assert cp.worker_inflight() == {}


def test_retried_train_lease_and_ack_apply_once(cp):
    cp.enqueue_offline_refs([make_ref(cp, f"s{i}") for i in range(4)])
    t = cp.trainer(trainer_id="tr")
    first = [r.sample_id for r in t.lease(2, request_id="tl-1")]
    assert [r.sample_id for r in t.lease(2, request_id="tl-1")] == first == ["s0", "s1"]
    assert cp.status()["queue_in_flight"] == 2
    assert t.ack(first, global_step=3, request_id="ack-1") == first
    assert t.ack(first, global_step=3, request_id="ack-1") == first
    status = cp.status()
    assert status["samples_acked"] == 2 and status["train_backlog"] == 2
    assert cp.redis.xlen(cp.keys.ack_log) == 1


def test_a_retried_waiting_train_lease_applies_once_whatever_its_timeout(cp):
    # The caller's request id goes with the first attempt even when there is no time
    # to wait (timeout_s=0): the retry gets the same grant, not a second one.
    cp.enqueue_offline_refs([make_ref(cp, f"s{i}") for i in range(4)])
    t = cp.trainer(trainer_id="tr")
    for timeout_s, request_id in ((0.0, "tl-0"), (0.5, "tl-1")):
        first = [r.sample_id for r in t.lease(1, timeout_s=timeout_s, request_id=request_id)]
        again = [r.sample_id for r in t.lease(1, timeout_s=timeout_s, request_id=request_id)]
        assert again == first and len(first) == 1, (timeout_s, first, again)
    assert cp.status()["queue_in_flight"] == 2


def test_retried_ingest_and_fail_apply_once(cp):
    ids = cp.ingest_prompts([{"payload": "a"}, {"payload": "b"}], request_id="ing-1")
    assert cp.status()["prompts"] == 2
    w = cp.rollout_worker()
    w.lease(2)
    assert w.fail(ids[:1], "boom", retryable=True, request_id="fail-1") == ids[:1]
    assert w.fail(ids[:1], "boom", retryable=True, request_id="fail-1") == ids[:1]
    assert int(cp.redis.hget(cp.keys.task_attempts, ids[0])) == 1
    assert cp.redis.llen(cp.keys.pending) == 1


def test_producers_reusing_a_request_id_each_apply_and_retries_still_apply_once(make_cp):
    # Producers have no caller id: the reply cache keys their calls by content too, so
    # two producers that pass the same request id are not handed each other's reply.
    cp = make_cp()
    other = ControlPlane(cp.redis, cp.run_id, cp.keys.namespace)
    first = cp.ingest_prompts([{"payload": "a"}, {"payload": "b"}], request_id="batch-1")
    second = other.ingest_prompts([{"payload": "c"}], request_id="batch-1")
    assert len(first) == 2 and len(second) == 1 and cp.status()["prompts"] == 3
    # A retry of the same call (its generated ids differ) replays the first reply.
    assert cp.ingest_prompts([{"payload": "a"}, {"payload": "b"}], request_id="batch-1") == first
    assert cp.ingest_prompts([{"task_id": "t9", "payload": "x"}], request_id="batch-2") == ["t9"]
    assert cp.ingest_prompts([{"task_id": "t9", "payload": "x"}], request_id="batch-2") == ["t9"]
    assert cp.status()["prompts"] == 4
    assert cp.enqueue_offline_refs([make_ref(cp, "s1")], request_id="off-1") == ["s1"]
    assert other.enqueue_offline_refs([make_ref(cp, "s2")], request_id="off-1") == ["s2"]
    assert cp.enqueue_offline_refs([make_ref(cp, "s1")], request_id="off-1") == ["s1"]
    assert cp.status()["queue_depth"] == 2


@pytest.mark.parametrize("bad", [["a b"], [""], "s0", [None], ["x" * 257]])
def test_bad_ids_are_refused_before_anything_is_written(cp, bad):
    cp.enqueue_offline_refs([make_ref(cp, "s0")])
    t = cp.trainer()
    t.lease(1)
    before = dump_run(cp)
    with pytest.raises(ValueError):
        t.ack(bad)
    with pytest.raises(ValueError):
        t.fail(bad, "x")
    with pytest.raises(ValueError):
        cp.rollout_worker().fail(bad, "x")
    assert dump_run(cp) == before


def test_one_request_id_reused_for_a_lease_and_a_commit_applies_both(cp):
    """A caller that names requests after its step must not get one call's cached reply
    back from another operation."""
    cp.ingest_prompts([{"task_id": "t0"}])
    w = cp.rollout_worker(worker_id="w")
    assert [t.task_id for t in w.lease(1, request_id="step-1")] == ["t0"]
    assert w.commit([make_ref(cp, "s0", "t0")], request_id="step-1") == ["s0"]
    assert cp.status()["samples_committed"] == 1
    assert cp.worker_inflight() == {}
    t = cp.trainer(trainer_id="tr")
    assert [r.sample_id for r in t.lease(1, request_id="step-1")] == ["s0"]
    assert t.ack(["s0"], global_step=1, request_id="step-1") == ["s0"]
    assert cp.status()["samples_acked"] == 1


def test_two_callers_using_the_same_request_id_both_apply(cp):
    """Data-parallel trainers that name their acks after the global step."""
    cp.enqueue_offline_refs([make_ref(cp, "a"), make_ref(cp, "b")])
    first, second = cp.trainer(trainer_id="rank-0"), cp.trainer(trainer_id="rank-1")
    assert [r.sample_id for r in first.lease(1, request_id="step-7")] == ["a"]
    assert [r.sample_id for r in second.lease(1, request_id="step-7")] == ["b"]
    assert first.ack(["a"], global_step=7, request_id="ack-step-7") == ["a"]
    assert second.ack(["b"], global_step=7, request_id="ack-step-7") == ["b"]
    assert cp.status()["samples_acked"] == 2
    cp.ingest_prompts([{"task_id": "t0"}, {"task_id": "t1"}])
    w0, w1 = cp.rollout_worker(worker_id="w0"), cp.rollout_worker(worker_id="w1")
    assert [t.task_id for t in w0.lease(1, request_id="batch-0")] == ["t0"]
    assert [t.task_id for t in w1.lease(1, request_id="batch-0")] == ["t1"]
    assert cp.worker_inflight() == {"w0": 1, "w1": 1}


def test_a_request_id_reused_for_other_ids_applies_them_and_keeps_their_leases(cp):
    """The reply cache keys a caller's request id with the call's content: acking the
    next ids under the same id (a step number, say) acks them instead of returning the
    first call's reply, and the client keeps the tokens of the leases it still holds."""
    cp.enqueue_offline_refs([make_ref(cp, f"s{i}") for i in range(6)])
    t = cp.trainer(trainer_id="tr", lease_s=30)
    t.lease(6)
    assert t.ack(["s0", "s1"], global_step=7, request_id="step-7") == ["s0", "s1"]
    assert t.ack(["s2", "s3"], global_step=7, request_id="step-7") == ["s2", "s3"]
    assert t.ack(["s2", "s3"], global_step=7, request_id="step-7") == ["s2", "s3"]  # a retry: the reply again
    assert sorted(t.held) == ["s4", "s5"] and cp.is_acked(["s2", "s3"]) == [True, True]
    assert t.fail(["s4"], "bad", request_id="step-7") == ["s4"]
    assert t.fail(["s5"], "bad", request_id="step-7") == ["s5"]
    assert cp.status()["samples_acked"] == 4 and t.held == []

    cp.ingest_prompts([{"task_id": "t0"}, {"task_id": "t1"}])
    w = cp.rollout_worker(worker_id="w")
    w.lease(2)
    assert w.commit([make_ref(cp, "c0", "t0")], request_id="batch-1") == ["c0"]
    assert w.commit([make_ref(cp, "c1", "t1")], request_id="batch-1") == ["c1"]
    assert w.commit([make_ref(cp, "c1", "t1")], request_id="batch-1") == ["c1"]
    assert cp.worker_inflight() == {} and cp.status()["samples_committed"] == 8
