"""Runs made by dataflow-redis 0.1.0 kept their dedup markers (tasks_done, acked) as
Redis sets. Such a run fails with a clear error until `migrate` converts it, which it
does in bounded chunks, safely interrupted and repeated."""

from __future__ import annotations


from conftest import cli_runner, dump_run, make_ref
from dataflow_redis import ScriptError, idset
from dataflow_redis.cli import main


def old_layout_run(cp, tasks=60):
    """A run with `tasks` done tasks and acked samples, its markers turned into sets."""
    ids = cp.ingest_prompts([{"task_id": f"t{i}"} for i in range(tasks)])
    worker, trainer = cp.rollout_worker("w-old"), cp.trainer("tr-old")
    for start in range(0, tasks, 25):
        leased = worker.lease(25)
        worker.commit([make_ref(cp, f"s-{t.task_id}", t.task_id) for t in leased])
        trainer.ack([r.sample_id for r in trainer.lease(25)], global_step=start, optimizer_durable=True)
    r, k = cp.redis, cp.keys
    markers = {}
    for key in (k.tasks_done, k.acked):
        markers[key] = idset.members(r, key)
        r.delete(key)
        r.sadd(key, *markers[key])
    assert markers[k.tasks_done] == set(ids) and len(markers[k.acked]) == tasks
    return markers


def test_an_old_run_fails_clearly_until_migrated_then_dedups_as_before(cp):
    markers = old_layout_run(cp)
    r, k = cp.redis, cp.keys
    try:
        cp.ingest_prompts([{"task_id": "t0"}])
        raise AssertionError("an old-layout run accepted a call")
    except ScriptError as exc:
        assert "migrate" in str(exc) and "WRONGTYPE" not in str(exc)
    assert cp.migrate(batch=7) == len(markers[k.tasks_done]) + len(markers[k.acked])
    for key, members in markers.items():
        assert r.type(key) == "hash" and idset.members(r, key) == members
    assert not r.exists(k.dedup_migrating)
    # Dedup from the converted markers: a done task and an acked sample come back as nothing.
    assert cp.ingest_prompts([{"task_id": "t0"}, {"task_id": "fresh"}]) == ["fresh"]
    assert cp.enqueue_offline_refs([make_ref(cp, "s-t5"), make_ref(cp, "s-new")]) == ["s-new"]
    assert cp.migrate() == 0  # nothing left to do


def test_an_interrupted_migration_loses_nothing_and_finishes_later(cp):
    markers = old_layout_run(cp, tasks=40)
    r, k = cp.redis, cp.keys
    runner = cp._run
    moved, remaining = runner("migrate_dedup_sets", [15])
    assert (moved, remaining) == (15, 25)
    # Half converted: every id is in exactly one of the old set and the set being built.
    old, building = set(r.smembers(k.tasks_done)), idset.members(r, k.dedup_migrating)
    assert not old & building and old | building == markers[k.tasks_done]
    try:
        cp.ingest_prompts([{"task_id": "t1"}])
        raise AssertionError("a half-migrated run accepted a call")
    except ScriptError as exc:
        assert "migrate" in str(exc)
    # The CLI finishes it.
    result = cli_runner().invoke(main, ["--redis-url", redis_url_of(cp), "--run", cp.run_id,
                                       "migrate", "--batch", "9"])
    assert result.exit_code == 0, result.output
    assert result.output.strip() == "moved 65 dedup marker(s) into packed id sets"
    for key, members in markers.items():
        assert idset.members(r, key) == members
    assert cp.ingest_prompts([{"task_id": "t1"}]) == []


def redis_url_of(cp):
    kwargs = cp.redis.connection_pool.connection_kwargs
    return f"redis://{kwargs['host']}:{kwargs['port']}/{kwargs.get('db', 0)}"


def test_calls_on_an_unmigrated_run_change_nothing(cp):
    """A script that meets an old-layout marker set refuses before its first write, even
    when its other reads succeed: an ack, a recovery requeue and a holder's duplicate
    commit each leave the run exactly as it was (no lease released, no step rolled
    back, no sample or task orphaned)."""
    cp.ingest_prompts([{"task_id": f"t{i}"} for i in range(4)])
    worker, trainer = cp.rollout_worker("w-old"), cp.trainer("tr-old")
    leased = worker.lease(4)
    assert len(leased) == 4
    worker.commit([make_ref(cp, "s-a", "t0"), make_ref(cp, "s-b", "t1")])
    refs = trainer.lease(2)
    trainer.ack([refs[0].sample_id], global_step=5, optimizer_durable=False)  # undurable
    r, k = cp.redis, cp.keys
    for key in (k.tasks_done, k.acked):
        members = idset.members(r, key)
        r.delete(key)
        r.sadd(key, *members)
    before = dump_run(cp)
    calls = {
        "ack": lambda: trainer.ack([refs[1].sample_id], global_step=6, optimizer_durable=True),
        "requeue_undurable": lambda: cp.requeue_undurable(after_step=0),
        # The holder of t2 re-sends a sample id already queued: a duplicate, whose only
        # effect would be to release t2 and mark it done.
        "duplicate commit": lambda: worker.commit([make_ref(cp, "s-a", "t2")]),
    }
    for name, call in calls.items():
        try:
            call()
            raise AssertionError(f"{name} was accepted on an old-layout run")
        except ScriptError as exc:
            assert "migrate" in str(exc), name
        assert dump_run(cp) == before, f"{name} changed the run before refusing"
    # What needs no marker goes on: ingest of a generated id, its lease, status.
    [fresh] = cp.ingest_prompts([{"payload": "p"}])
    assert [t.task_id for t in worker.lease(1)] == [fresh] and cp.status()["prompts"] == 5
    cp.migrate()
    assert trainer.ack([refs[1].sample_id], global_step=6, optimizer_durable=True) == [refs[1].sample_id]
    assert worker.commit([make_ref(cp, "s-a", "t2")]) == []
    assert cp.is_done(["t2"]) == [True]
