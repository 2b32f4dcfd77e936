"""The fast tier: the core lifecycle on fakeredis (with Lua through lupa).

This never replaces the real-Redis tests; it runs the same scripts in-process so a
broken script shows up in well under a second, also where no redis-server exists.
"""

from __future__ import annotations

import time

import pytest

from conftest import make_ref
from dataflow_redis import RecordTooLarge, StepRegression


def test_lifecycle_smoke(fake_cp):
    cp = fake_cp
    cp.configure(max_prompt_attempts=2)
    assert cp.ingest_prompts([{"task_id": "t0", "payload": "a"}, {"task_id": "t1"}, {"task_id": "t0"}]) == ["t0", "t1"]
    w = cp.rollout_worker(worker_id="w")
    assert [t.task_id for t in w.lease(5)] == ["t0", "t1"]
    assert cp.worker_inflight() == {"w": 2}
    assert w.commit([make_ref(cp, "s0", "t0")]) == ["s0"]
    assert w.commit([make_ref(cp, "s0", "t0")]) == []  # duplicate
    assert w.fail(["t1"], "broken", retryable=False) == ["t1"]
    assert cp.worker_inflight() == {}

    t = cp.trainer(trainer_id="tr")
    assert [r.sample_id for r in t.lease(4)] == ["s0"]
    assert t.ack(["unknown"]) == []
    assert t.ack(["s0"], global_step=2, optimizer_durable=True) == ["s0"]
    with pytest.raises(StepRegression):
        t.ack([], global_step=1)
    assert t.fail(["s0"], "late", retryable=True) == []

    status = cp.status()
    assert (status["prompts"], status["prompts_failed"], status["samples_committed"], status["samples_acked"],
            status["train_backlog"], status["checkpoint_global_step"]) == (2, 1, 1, 1, 0, 2)
    (dead,) = cp.dead_letters()
    assert dead["task_id"] == "t1" and dead["reason"] == "broken"


def test_expiry_fencing_and_dead_letter(fake_cp):
    cp = fake_cp
    cp.configure(max_prompt_attempts=2)
    cp.ingest_prompts([{"task_id": "t0"}])
    late = cp.rollout_worker(worker_id="late", lease_s=0.02)
    late.lease(1)
    time.sleep(0.05)
    assert cp.reclaim_expired() == 1
    new = cp.rollout_worker(worker_id="new", lease_s=0.02)
    (task,) = new.lease(1)
    assert task.attempt == 1
    assert late.commit([make_ref(cp, "s-late", "t0")]) == []  # fenced
    time.sleep(0.05)
    assert cp.reclaim_expired() == 1
    (dead,) = cp.dead_letters()
    assert "attempts exhausted" in dead["reason"]


def test_retry_with_request_id_and_record_limit(fake_cp):
    cp = fake_cp
    cp.enqueue_offline_refs([make_ref(cp, "s0"), make_ref(cp, "s1")])
    t = cp.trainer()
    first = [r.sample_id for r in t.lease(1, request_id="r1")]
    assert [r.sample_id for r in t.lease(1, request_id="r1")] == first == ["s0"]
    assert t.ack(first, request_id="a1") == first
    assert t.ack(first, request_id="a1") == first
    assert cp.status()["samples_acked"] == 1
    cp.configure(max_record_bytes=256)
    with pytest.raises(RecordTooLarge):
        cp.ingest_prompts([{"task_id": "big", "payload": "x" * 400}])
    assert cp.status()["prompts"] == 0
