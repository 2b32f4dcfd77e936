"""Memory stays bounded on long runs (issue point 9).

20,000 samples go through the whole lifecycle and are acked durably on a private
redis-server, with the ids ingest generates (16 characters) and sample ids made from
them (task id + ":0"). Afterwards no task or sample record is left: what remains per
sample is its id in ``acked`` (dedup of a re-sent commit) and its task's id in
``tasks_done`` (dedup of re-ingest), both packed id sets (lua/includes/idset.lua). The
figures are printed (run with ``-s``): MEMORY USAGE of those sets and the used_memory
growth of the server, per sample, once the reply cache (kept reply_ttl_s s) is gone.
"""

from __future__ import annotations

import pytest

from conftest import make_ref
from dataflow_redis import ControlPlane, idset
from dataflow_redis.embedded import RedisServer
from dataflow_redis.records import encode_ref

SAMPLES = 20_000
BATCH = 500


def used_memory(client) -> int:
    return int(client.info("memory")["used_memory"])


def memory_usage(client, key) -> int:
    return int(client.memory_usage(key, samples=0) or 0)


@pytest.fixture(scope="module")
def acked_run():
    # No slow log: it keeps the arguments of slow calls and would count as run memory.
    with RedisServer(extra_args=["--slowlog-log-slower-than", "-1"]) as server:
        client = server.client()
        cp = ControlPlane.from_url(server.url, run_id="memory")
        worker = cp.rollout_worker(lease_s=600)
        trainer = cp.trainer(lease_s=600)
        # One sample through every script first: loaded scripts, registered clients and
        # the run's small fixed hashes are not per-sample memory.
        cp.ingest_prompts([{"task_id": "warm-up"}])
        worker.lease(1)
        worker.commit([make_ref(cp, "warm-up", "warm-up")])
        trainer.ack([r.sample_id for r in trainer.lease(1)], global_step=0, optimizer_durable=True)
        cp.status()
        client.unlink(*client.scan_iter(match=cp.keys.prefix + "reply:*"))
        baseline = used_memory(client)
        acked_before = memory_usage(client, cp.keys.acked)
        done_before = memory_usage(client, cp.keys.tasks_done)
        task_ids = cp.ingest_prompts([{"payload": {"text": "a short prompt of about forty characters"}}
                                      for _ in range(SAMPLES)])
        record_bytes = []
        for start in range(0, SAMPLES, BATCH):
            tasks = worker.lease(BATCH)
            refs = [make_ref(cp, t.task_id + ":0", t.task_id) for t in tasks]
            record_bytes.extend(len(encode_ref(r)) for r in refs)
            assert len(worker.commit(refs)) == len(tasks)
            leased = [r.sample_id for r in trainer.lease(BATCH)]
            assert len(trainer.ack(leased, global_step=1 + start // BATCH, optimizer_durable=True)) == len(leased)
        with_replies = used_memory(client)
        reply_keys = list(client.scan_iter(match=cp.keys.prefix + "reply:*", count=1000))
        client.unlink(*reply_keys)
        steady = used_memory(client)
        yield dict(cp=cp, client=client, task_ids=task_ids, baseline=baseline, with_replies=with_replies,
                   acked_before=acked_before, done_before=done_before,
                   steady=steady, record_bytes=sum(record_bytes) / len(record_bytes), reply_keys=len(reply_keys))
        cp.redis.close()
        client.close()


def test_an_acked_sample_keeps_no_record(acked_run):
    cp, client = acked_run["cp"], acked_run["client"]
    status = cp.status()
    assert status["samples_acked"] == SAMPLES + 1 and status["train_backlog"] == 0
    assert status["durable_acked"] == SAMPLES + 1 and status["uncheckpointed_acked"] == 0
    for name in ("samples", "tasks", "task_bytes", "task_attempts", "prompt_leases", "prompt_deadlines",
                 "train_leases", "train_deadlines", "undurable", "pending", "train_queue", "worker_inflight"):
        assert not client.exists(getattr(cp.keys, name)), f"{name} still holds data after every sample was acked"
    assert idset.count(client, cp.keys.acked) == SAMPLES + 1
    assert idset.count(client, cp.keys.tasks_done) == SAMPLES + 1
    assert idset.members(client, cp.keys.tasks_done) == set(acked_run["task_ids"]) | {"warm-up"}
    assert client.xlen(cp.keys.ack_log) <= 1100, "the ack log is capped"


def test_bytes_kept_per_acked_sample_are_small(acked_run):
    cp, client = acked_run["cp"], acked_run["client"]
    acked_per_sample = (memory_usage(client, cp.keys.acked) - acked_run["acked_before"]) / SAMPLES
    done_per_sample = (memory_usage(client, cp.keys.tasks_done) - acked_run["done_before"]) / SAMPLES
    growth_per_sample = (acked_run["steady"] - acked_run["baseline"]) / SAMPLES
    replies_per_sample = (acked_run["with_replies"] - acked_run["steady"]) / SAMPLES
    id_chars = len(acked_run["task_ids"][0])
    print(f"\n{SAMPLES} samples acked durably, generated task ids of {id_chars} characters, records of "
          f"{acked_run['record_bytes']:.0f} bytes of JSON:"
          f"\n  acked set (dedup of commits):      {acked_per_sample:6.1f} bytes/sample"
          f"\n  tasks_done set (dedup of ingest):  {done_per_sample:6.1f} bytes/sample"
          f"\n  server used_memory growth:         {growth_per_sample:6.1f} bytes/sample"
          f"\n  reply cache until reply_ttl_s:     {replies_per_sample:6.1f} bytes/sample "
          f"({acked_run['reply_keys']} keys, expire by themselves)")
    # A packed id costs its characters plus a separator and a share of its bucket.
    assert id_chars == 16
    assert done_per_sample <= id_chars + 10
    assert acked_per_sample <= id_chars + 2 + 10
    assert acked_per_sample + done_per_sample <= 64
    # Everything the run keeps is the two id sets plus small constant state: far less
    # than the record it would keep if acked records were never dropped.
    assert growth_per_sample <= acked_per_sample + done_per_sample + 20
    assert growth_per_sample < acked_run["record_bytes"] + 2 * id_chars


def test_dedup_still_works_from_the_ids_alone(acked_run):
    cp = acked_run["cp"]
    assert cp.ingest_prompts([{"task_id": acked_run["task_ids"][0]}]) == []
    acked_id = acked_run["task_ids"][-1] + ":0"
    assert cp.is_acked([acked_id, "never-acked"]) == [True, False]
    assert cp.is_done([acked_run["task_ids"][0], "never-done"]) == [True, False]
    assert cp.enqueue_offline_refs([make_ref(cp, acked_id)]) == []
