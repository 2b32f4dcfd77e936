"""Backpressure on a real redis-server, one process: seed parity, the seed's holes
closed, live versioned config (obeyed by another OS process), capacity shards,
operator override and the transition events. See docs/backpressure.md."""

from __future__ import annotations

import time

import bp_procs
import pytest
from conftest import dump_run, make_ref

from dataflow_redis import BackpressureConfig, ConfigError, InvalidArgument, PromptTask

SEED_SNAPSHOT_FIELDS = (
    "paused", "rollout_starved", "trainer_starved", "pause_transitions", "resume_transitions",
    "resident_bytes", "max_resident_bytes", "free_to_high_watermark_bytes", "avg_feature_age_s",
    "oldest_feature_age_s",
)


def ingest(cp, n, estimated_bytes=None):
    """Ingest ``n`` small tasks; returns their ids."""
    return cp.ingest_prompts([PromptTask(task_id=f"t{i}", run_id=cp.run_id, payload={"i": i},
                                         estimated_bytes=estimated_bytes) for i in range(n)])


def bp(cp):
    return cp.status()["backpressure"]


def commit(cp, worker, tasks):
    return worker.commit([make_ref(cp, f"{t.task_id}.s", t.task_id) for t in tasks])


# ----------------------------------------------------------------- 1. seed parity
def test_every_lever_is_optional_and_each_alone_enables_the_policy(cp):
    assert BackpressureConfig() == BackpressureConfig(None, None, None, None, None, None)
    assert not BackpressureConfig().enabled
    for lever in ("high_watermark_bytes", "max_inflight_prompts_per_worker", "max_train_lease",
                  "default_task_bytes"):
        cp.configure_backpressure(BackpressureConfig(**{lever: 5}))
        stored = cp.backpressure_config()
        assert getattr(stored, lever) == 5
        assert "backpressure" in cp.status(), lever
    cp.configure_backpressure(BackpressureConfig())  # all None: the policy is off again
    assert cp.backpressure_config() == BackpressureConfig()
    assert "backpressure" not in cp.status()


def test_low_above_high_is_rejected_and_the_stored_config_is_unchanged(cp):
    with pytest.raises(ConfigError, match="low_watermark_bytes 200 > high_watermark_bytes 100"):
        BackpressureConfig(high_watermark_bytes=100, low_watermark_bytes=200)
    cp.configure_backpressure(BackpressureConfig(high_watermark_bytes=100, low_watermark_bytes=50))
    before = dump_run(cp)
    # A partial update is checked against the merged stored config, inside Redis.
    with pytest.raises(ConfigError, match="low_watermark_bytes 200 > high_watermark_bytes 100"):
        cp.set_config("raise low", low_watermark_bytes=200)
    with pytest.raises(ConfigError, match="low_watermark_bytes 50 > high_watermark_bytes 40"):
        cp.set_config("lower high", high_watermark_bytes=40)
    assert dump_run(cp) == before


def test_high_without_low_means_low_equals_high(cp):
    config = BackpressureConfig(high_watermark_bytes=100)
    assert (config.low_watermark_bytes, config.effective_low_watermark_bytes) == (None, 100)
    cp.configure_backpressure(config)
    assert cp.backpressure_config().effective_low_watermark_bytes == 100
    snap = bp(cp)
    assert snap["high_watermark_bytes"] == snap["low_watermark_bytes"] == 100


@pytest.mark.parametrize("first", ["configure_backpressure", "set_config"])
def test_a_low_watermark_left_unset_follows_a_later_high(cp, first):
    """However high was set first, an unset low stays unset: raising high later opens
    no band nobody asked for, and lowering it is not refused over a low never given."""
    if first == "configure_backpressure":
        cp.configure_backpressure(BackpressureConfig(high_watermark_bytes=100))
    else:
        cp.set_config("first", high_watermark_bytes=100)
    cp.set_config("more room", high_watermark_bytes=200)
    assert cp.backpressure_config().low_watermark_bytes is None
    shard = cp.capacity_reporter("s0")
    assert shard.report(200).paused is True
    assert shard.report(150).paused is False  # low = high = 200: no band
    cp.set_config("less room", high_watermark_bytes=80)
    assert bp(cp)["low_watermark_bytes"] == 80


def test_latch_holds_its_state_inside_the_band(cp):
    cp.configure_backpressure(BackpressureConfig(high_watermark_bytes=100, low_watermark_bytes=50))
    shard = cp.capacity_reporter("s0")
    # resident -> latch after the report: up through the band, pause at high, down
    # through the band (still paused), resume at low, up into the band (still running).
    steps = [(70, False), (99, False), (100, True), (70, True), (51, True), (50, False),
             (70, False), (99, False), (150, True), (0, False)]
    for resident, expected in steps:
        assert shard.report(resident).paused is expected, resident
        assert bp(cp)["paused"] is expected
    snap = bp(cp)
    assert (snap["pause_transitions"], snap["resume_transitions"]) == (2, 2)


def test_per_worker_cap_formula_each_worker_its_own_budget(cp):
    ingest(cp, 20)
    cp.configure_backpressure(BackpressureConfig(max_inflight_prompts_per_worker=3))
    a, b = cp.rollout_worker("a"), cp.rollout_worker("b")
    assert len(a.lease(2)) == 2            # min(2, 3 - 0)
    assert len(a.lease(5)) == 1            # min(5, 3 - 2)
    assert a.lease(1) == []                # min(1, 3 - 3) = 0
    assert len(b.lease(5)) == 3            # b has its own budget
    assert cp.worker_inflight() == {"a": 3, "b": 3}
    snap = bp(cp)
    assert snap["rollout_capped"] == 1 and snap["rollout_starved"] == 0  # a cap is not starvation


def test_cap_hit_counts_only_while_tasks_are_pending(cp):
    ingest(cp, 2)
    cp.configure_backpressure(BackpressureConfig(max_inflight_prompts_per_worker=2))
    worker = cp.rollout_worker("a")
    assert len(worker.lease(2)) == 2
    assert worker.lease(1) == []           # at its cap, but nothing is pending
    assert bp(cp)["rollout_capped"] == 0
    cp.ingest_prompts([PromptTask(task_id="waiting", run_id=cp.run_id, payload={})])
    assert worker.lease(1) == []           # at its cap with a task waiting
    assert bp(cp)["rollout_capped"] == 1


def test_in_flight_above_a_lowered_cap_grants_zero_never_negative(cp):
    ingest(cp, 20)
    cp.configure_backpressure(BackpressureConfig(max_inflight_prompts_per_worker=4))
    worker = cp.rollout_worker("w")
    held = worker.lease(4)
    assert len(held) == 4
    cp.configure_backpressure(BackpressureConfig(max_inflight_prompts_per_worker=1))
    assert worker.lease(3) == []           # max(0, min(3, 1 - 4)) = 0
    assert cp.worker_inflight() == {"w": 4}
    commit(cp, worker, held[:2])
    assert worker.lease(3) == []           # 1 - 2 < 0 -> still 0
    commit(cp, worker, held[2:])
    assert cp.worker_inflight() == {}      # back to zero, never below
    assert len(worker.lease(3)) == 1       # min(3, 1 - 0)
    assert cp.worker_inflight() == {"w": 1}
    assert cp.status()["prompts_pending"] == 15  # nothing lost by the refused calls


def test_train_lease_cap(cp):
    cp.enqueue_offline_refs([make_ref(cp, f"s{i}") for i in range(10)])
    trainer = cp.trainer("t")
    cp.configure_backpressure(BackpressureConfig(max_train_lease=3))
    assert len(trainer.lease(8)) == 3      # min(8, 3)
    assert len(trainer.lease(2)) == 2      # min(2, 3)
    cp.configure_backpressure(BackpressureConfig())
    assert len(trainer.lease(8)) == 5      # lever off: uncapped


def test_empty_train_lease_counts_trainer_starvation(cp):
    cp.configure_backpressure(BackpressureConfig(max_train_lease=4))
    trainer = cp.trainer("t")
    assert trainer.lease(4) == []
    assert trainer.lease(4, timeout_s=0.2) == []  # a waiting lease counts once, at its end
    assert bp(cp)["trainer_starved"] == 2
    cp.enqueue_offline_refs([make_ref(cp, "s0")])
    assert len(trainer.lease(4)) == 1
    assert bp(cp)["trainer_starved"] == 2
    assert bp(cp)["rollout_starved"] == 0  # counted separately


def test_paused_lease_with_work_pending_counts_rollout_starvation(cp):
    ingest(cp, 5)
    cp.configure_backpressure(BackpressureConfig(high_watermark_bytes=100, low_watermark_bytes=50))
    cp.capacity_reporter("s0").report(100)
    worker = cp.rollout_worker("w")
    assert worker.lease(2) == [] and worker.lease(2) == []
    snap = bp(cp)
    assert snap["rollout_starved"] == 2 and snap["trainer_starved"] == 0
    assert cp.status()["prompts_pending"] == 5


def test_no_config_means_unthrottled_and_no_backpressure_entry(cp):
    ingest(cp, 30)
    cp.capacity_reporter("s0").report(10**12)  # a huge resident changes nothing
    worker = cp.rollout_worker("w")
    assert len(worker.lease(25)) == 25
    cp.enqueue_offline_refs([make_ref(cp, f"s{i}") for i in range(20)])
    assert len(cp.trainer("t").lease(20)) == 20
    assert cp.trainer("t2").lease(5) == []
    status = cp.status()
    assert "backpressure" not in status
    assert status["prompts_leased"] == 25


def test_every_seed_snapshot_field_is_present_with_seed_meaning(cp):
    cp.configure_backpressure(BackpressureConfig(max_inflight_prompts_per_worker=2))
    snap = bp(cp)
    assert set(SEED_SNAPSHOT_FIELDS) <= set(snap)
    assert snap["free_to_high_watermark_bytes"] is None      # no high watermark
    assert snap["max_resident_bytes"] is None and snap["avg_feature_age_s"] is None
    cp.configure_backpressure(BackpressureConfig(high_watermark_bytes=1000, low_watermark_bytes=500))
    cp.capacity_reporter("s0").report(300, max_resident_bytes=4000, avg_age_s=2.0, oldest_age_s=5.0)
    cp.capacity_reporter("s1").report(900, max_resident_bytes=6000)
    snap = bp(cp)
    assert snap["resident_bytes"] == 1200 and snap["max_resident_bytes"] == 10000
    assert snap["free_to_high_watermark_bytes"] == 0         # max(0, 1000 - 1200)
    assert snap["paused"] is True
    assert snap["avg_feature_age_s"] >= 2.0 and snap["oldest_feature_age_s"] >= 5.0
    cp.capacity_reporter("s1").report(100)
    assert bp(cp)["free_to_high_watermark_bytes"] == 600     # 1000 - 400
    for name in SEED_SNAPSHOT_FIELDS:
        assert name in snap


# ------------------------------------------------------------- 2. holes closed
def test_degenerate_band_does_not_flap_at_the_threshold(cp):
    """low == high: resume needs resident <= low AND resident < high, so a run sitting
    exactly on the threshold stays paused instead of flipping on every call."""
    ingest(cp, 10)
    cp.configure_backpressure(BackpressureConfig(high_watermark_bytes=100))  # low = high
    shard, worker = cp.capacity_reporter("s0"), cp.rollout_worker("w")
    for _ in range(6):
        assert shard.report(100).paused is True
        assert worker.lease(1) == []
    snap = bp(cp)
    assert (snap["pause_transitions"], snap["resume_transitions"]) == (1, 0)
    assert shard.report(99).paused is False                   # strictly below: resume
    assert len(worker.lease(1)) == 1
    assert shard.report(100).paused is True
    snap = bp(cp)
    assert (snap["pause_transitions"], snap["resume_transitions"]) == (2, 1)


def test_refusal_with_nothing_pending_is_not_rollout_starvation(cp):
    cp.configure_backpressure(BackpressureConfig(high_watermark_bytes=100))
    cp.capacity_reporter("s0").report(500)
    worker = cp.rollout_worker("w")
    assert worker.lease(4) == [] and worker.lease(4) == []
    cp.pause("maintenance")
    assert worker.lease(4) == []
    snap = bp(cp)
    assert snap["rollout_starved"] == 0 and snap["rollout_starved_s"] == 0.0
    ingest(cp, 1)
    assert worker.lease(4) == []   # now work is pending: that is starvation
    assert bp(cp)["rollout_starved"] == 1


def test_starvation_is_measured_in_seconds_on_both_sides(cp):
    ingest(cp, 3)
    cp.configure_backpressure(BackpressureConfig(high_watermark_bytes=100))
    cp.capacity_reporter("s0").report(200)
    worker, trainer = cp.rollout_worker("w"), cp.trainer("t")
    assert worker.lease(1) == [] and trainer.lease(1) == []
    first = bp(cp)
    time.sleep(0.3)
    second = bp(cp)
    # Both sides are starved from their first refused call on, and the time grows
    # while they stay starved (server time, read in status).
    assert second["rollout_starved_s"] >= first["rollout_starved_s"] + 0.25
    assert second["trainer_starved_s"] >= first["trainer_starved_s"] + 0.25
    # Work arrives: the starved spell ends and its length is kept.
    cp.capacity_reporter("s0").report(0)
    assert len(worker.lease(1)) == 1
    cp.enqueue_offline_refs([make_ref(cp, "s0")])
    assert len(trainer.lease(1)) == 1
    ended = bp(cp)
    time.sleep(0.2)
    later = bp(cp)
    assert ended["rollout_starved_s"] >= 0.3 and ended["trainer_starved_s"] >= 0.3
    assert later["rollout_starved_s"] == ended["rollout_starved_s"]
    assert later["trainer_starved_s"] == ended["trainer_starved_s"]


# ------------------------------------------------------------ 3. live config
def test_config_is_validated_with_clear_errors_and_versioned(cp):
    bad = [
        ({"high_watermark_bytes": -1}, "high_watermark_bytes must be an integer from 1 to"),
        ({"high_watermark_bytes": 1.5}, "high_watermark_bytes must be an integer"),
        ({"max_inflight_prompts_per_worker": 0}, "max_inflight_prompts_per_worker must be an integer from 1 to"),
        ({"max_train_lease": "4"}, "max_train_lease must be an integer"),
        ({"stale_after_s": float("nan")}, "stale_after_s must be a number"),
        ({"low_watermark_bytes": 10}, "low_watermark_bytes needs high_watermark_bytes"),
    ]
    for kwargs, message in bad:
        with pytest.raises(ConfigError, match=message):
            BackpressureConfig(**kwargs)
    with pytest.raises(ConfigError, match="unknown config field 'high_water'"):
        cp.set_config("typo", high_water=5)
    assert cp.config_version() == 0
    v1 = cp.configure_backpressure(BackpressureConfig(high_watermark_bytes=100))
    v2 = cp.set_config("tune", max_train_lease=8)
    assert (v1, v2) == (1, 2) and cp.config_version() == 2
    assert cp.status()["config_version"] == 2
    stored = cp.backpressure_config()
    assert stored.high_watermark_bytes == 100 and stored.max_train_lease == 8
    with pytest.raises(ConfigError):
        cp.set_config("bad", max_train_lease=0)
    assert cp.config_version() == 2
    kinds = [e["type"] for e in cp.events()]
    assert kinds.count("config") == 2
    # A value written by another tool: any number the scripts read is read back, as
    # the scripts read it; anything else is a ConfigError naming the field.
    cp.redis.hset(cp.keys.config, "max_train_lease", "1e3")
    assert cp.backpressure_config().max_train_lease == 1000
    cp.redis.hset(cp.keys.config, "max_train_lease", "lots")
    with pytest.raises(ConfigError, match="stored config holds max_train_lease='lots', not an integer"):
        cp.settings()


def test_a_config_change_by_one_process_is_obeyed_by_another_on_its_next_call(cp, redis_url):
    ingest(cp, 20)
    cp.configure_backpressure(BackpressureConfig(max_inflight_prompts_per_worker=1))
    ctx = bp_procs.context()
    parent_end, child_end = ctx.Pipe()
    follower = ctx.Process(target=bp_procs.config_follower, args=(redis_url, cp.run_id, child_end))
    follower.start()

    def ask(*command):
        parent_end.send(command)
        assert parent_end.poll(bp_procs.JOIN_TIMEOUT_S), "follower process did not answer"
        reply = parent_end.recv()
        assert "error" not in reply, reply.get("error")
        return reply

    try:
        assert ask("lease", 5) == {"granted": 1, "held": 1, "version": 1}
        cp.configure_backpressure(BackpressureConfig(max_inflight_prompts_per_worker=3))
        assert ask("lease", 5) == {"granted": 2, "held": 3, "version": 2}
        cp.configure_backpressure(BackpressureConfig(high_watermark_bytes=100, low_watermark_bytes=50,
                                                     max_inflight_prompts_per_worker=10))
        cp.capacity_reporter("s0").report(150)
        assert ask("lease", 5)["granted"] == 0           # paused by the latch
        cp.set_config("raise the watermarks", high_watermark_bytes=1000, low_watermark_bytes=500)
        assert ask("lease", 5) == {"granted": 5, "held": 8, "version": 4}   # config resumed it
        cp.configure_backpressure(BackpressureConfig())  # policy off: unthrottled
        assert ask("lease", 12)["granted"] == 12
        assert ask("stop")["stopped"]
    finally:
        follower.join(bp_procs.JOIN_TIMEOUT_S)
        if follower.is_alive():
            follower.kill()
    assert follower.exitcode == 0
    resumes = [e for e in cp.events() if e["type"] == "resume"]
    assert resumes and resumes[-1]["reason"] == "config version 4"


# ------------------------------------------------------------------ 4. capacity
def test_shards_sum_and_an_out_of_order_report_is_ignored(cp):
    cp.configure_backpressure(BackpressureConfig(high_watermark_bytes=10_000))
    s0, s1, s2 = (cp.capacity_reporter(f"s{i}") for i in range(3))
    assert s0.report(100, seq=5).run_resident_bytes == 100
    assert s1.report(200, seq=1).run_resident_bytes == 300
    assert s2.report(300).run_resident_bytes == 600
    late = s0.report(999, seq=4)                        # older than seq 5: ignored
    assert not late.accepted and late.run_resident_bytes == 600
    assert not s0.report(999, seq=5).accepted            # equal seq: ignored too
    assert s0.report(40, seq=6).run_resident_bytes == 540
    snap = bp(cp)
    assert snap["resident_bytes"] == 540 and snap["shards"] == 3


def test_a_default_seq_continues_after_an_explicit_one(cp):
    """The docstring's promise: the default is one more than the shard's last report,
    also when that report carried the caller's own seq."""
    cp.configure_backpressure(BackpressureConfig(high_watermark_bytes=100, low_watermark_bytes=50))
    shard = cp.capacity_reporter("shard-0")
    assert shard.report(10).accepted
    assert shard.report(20, seq=100).accepted
    after = shard.report(500)
    assert after.accepted and after.paused and after.run_resident_bytes == 500
    assert cp.redis.hget(cp.keys.shards, "shard-0").startswith("101|")
    # An explicit seq that loses to a newer report: the next default follows the newest.
    assert not shard.report(5, seq=50).accepted
    assert shard.report(0).accepted and cp.redis.hget(cp.keys.shards, "shard-0").startswith("102|")


def test_a_silent_shard_turns_stale_keeps_its_bytes_and_clears_on_report(cp):
    cp.configure_backpressure(BackpressureConfig(high_watermark_bytes=10_000, stale_after_s=0.2))
    quiet, busy = cp.capacity_reporter("quiet"), cp.capacity_reporter("busy")
    quiet.report(700)
    busy.report(300)
    time.sleep(0.3)
    # Nobody has called since both went silent: status (read-only) still shows them stale.
    assert bp(cp)["stale_shards"] == ["busy", "quiet"]
    busy.report(300)                                     # a report marks silent shards
    snap = bp(cp)
    assert snap["stale_shards"] == ["quiet"]
    assert snap["resident_bytes"] == 1000                # a stale shard's bytes still count
    # The reporting shard was silent too: its silence is logged, then its return.
    shard_events = [(e["type"], e["reason"]) for e in cp.events() if e["type"].startswith("shard")]
    assert sorted(shard_events[:2]) == [("shard_stale", "busy"), ("shard_stale", "quiet")]
    assert shard_events[2:] == [("shard_fresh", "busy")]
    stale_events = [e for e in cp.events() if e["type"] == "shard_stale"]
    assert all(e["resident_bytes"] == 1000 for e in stale_events)
    quiet.report(650)                                    # it speaks again: fresh
    snap = bp(cp)
    assert snap["stale_shards"] == [] and snap["resident_bytes"] == 950
    assert [e["type"] for e in cp.events()][-1] == "shard_fresh"


def test_deregister_removes_a_shards_bytes(cp):
    cp.configure_backpressure(BackpressureConfig(high_watermark_bytes=1000, low_watermark_bytes=500))
    keep, leave = cp.capacity_reporter("keep"), cp.capacity_reporter("leave")
    keep.report(400)
    assert leave.report(800).paused is True
    assert leave.deregister() is True
    snap = bp(cp)
    assert snap["resident_bytes"] == 400 and snap["shards"] == 1
    assert snap["paused"] is False                       # the latch saw the bytes go
    assert leave.deregister() is False
    assert [e["type"] for e in cp.events()][-2:] == ["shard_deregistered", "resume"]
    empty = cp.capacity_reporter("empty")
    empty.report(0)
    assert empty.deregister() is True and bp(cp)["resident_bytes"] == 400


def test_a_report_sent_before_a_deregistration_and_delivered_after_it_is_ignored(cp):
    cp.configure_backpressure(BackpressureConfig(high_watermark_bytes=1000))
    shard = cp.capacity_reporter("shard-0")
    shard.report(5000, seq=7)
    assert shard.deregister() is True and bp(cp)["paused"] is False
    late = cp.capacity_reporter("shard-0").report(5000, seq=3)   # older than the deregistration
    assert not late.accepted and not late.paused and bp(cp)["resident_bytes"] == 0
    assert cp.redis.hexists(cp.keys.shards, "shard-0") is False
    # The shard comes back: a new reporter continues after its last seq, and is counted.
    back = cp.capacity_reporter("shard-0").report(300)
    assert back.accepted and back.run_resident_bytes == 300
    assert cp.redis.hget(cp.keys.shards, "shard-0").startswith("8|")
    assert not cp.redis.hexists(cp.keys.retired_shards, "shard-0")


def test_a_report_that_would_pass_exact_arithmetic_is_refused_and_changes_nothing(cp):
    cp.configure_backpressure(BackpressureConfig(high_watermark_bytes=10**15))
    cp.capacity_reporter("big").report(2**53 - 1)
    before = dump_run(cp)
    with pytest.raises(InvalidArgument, match="would pass 2\\^53 - 1 with this report of 1 bytes from small"):
        cp.capacity_reporter("small").report(1)
    assert dump_run(cp) == before
    assert bp(cp)["resident_bytes"] == 2**53 - 1 and cp.redis.hget(cp.keys.bp, "peak_resident_bytes") == str(2**53 - 1)


def test_the_exact_arithmetic_bound_holds_to_the_byte(cp):
    """At the limit, 2^53 - 1 + 2 - 1 rounds back to the limit in doubles: the check
    compares the change with the room left, so one byte over is refused too."""
    cp.configure_backpressure(BackpressureConfig(high_watermark_bytes=10**15))
    a, b = cp.capacity_reporter("a"), cp.capacity_reporter("b")
    a.report(2**53 - 2)
    assert b.report(1).run_resident_bytes == 2**53 - 1   # exactly the limit
    before = dump_run(cp)
    with pytest.raises(InvalidArgument, match="would pass 2\\^53 - 1 with this report of 2 bytes from b"):
        b.report(2)
    assert dump_run(cp) == before


def test_automatic_sequence_numbers_stop_short_of_2_to_the_53(cp):
    shard = cp.capacity_reporter("top")
    shard.report(10, seq=2**53 - 1)
    before = dump_run(cp)
    with pytest.raises(InvalidArgument, match="has used every sequence number below 2\\^53"):
        shard.report(11)
    assert dump_run(cp) == before


# --------------------------------------------------------------- reservation
def test_reservation_admits_work_only_below_the_high_watermark(cp):
    cp.ingest_prompts([PromptTask(task_id=f"t{i}", run_id=cp.run_id, estimated_bytes=300)
                       for i in range(10)])
    cp.configure_backpressure(BackpressureConfig(high_watermark_bytes=1000, low_watermark_bytes=500))
    shard, worker = cp.capacity_reporter("s0"), cp.rollout_worker("w")
    shard.report(100)
    granted = worker.lease(10)
    assert len(granted) == 3                             # 100 + 3 * 300 <= 1000 < 100 + 4 * 300
    assert bp(cp)["reserved_bytes"] == 900
    assert worker.lease(1) == [] and bp(cp)["rollout_starved"] == 1
    shard.report(100 + 300)                              # one sample landed ...
    assert worker.lease(1) == []                         # ... still reserved until its commit
    commit(cp, worker, granted[:1])
    assert bp(cp)["reserved_bytes"] == 600
    assert worker.lease(5) == []                         # 400 + 600 + 300 > 1000
    shard.report(0)                                      # the trainer consumed everything
    assert len(worker.lease(5)) == 1                     # 0 + 600 + 300 <= 1000
    # Reservations are released on commit, fail and expiry alike.
    held = worker.held
    worker.fail(held[:1], "oom", retryable=True)
    assert bp(cp)["reserved_bytes"] == 600
    cp.set_config("default for tasks without an estimate", default_task_bytes=50)
    assert bp(cp)["reserved_bytes"] == 600


def test_reservation_holds_bytes_in_flight_to_high_before_any_capacity_report(cp):
    """No store has reported: the latch never pauses (as in the seed), but the
    reservation rule still keeps the bytes in flight within high (docs/backpressure.md)."""
    cp.ingest_prompts([PromptTask(task_id=f"t{i}", run_id=cp.run_id, estimated_bytes=1024)
                       for i in range(10)])
    cp.configure_backpressure(BackpressureConfig(high_watermark_bytes=4096, low_watermark_bytes=2048))
    worker = cp.rollout_worker("w")
    assert len(worker.lease(10)) == 4 and worker.lease(1) == []
    snap = bp(cp)
    assert (snap["paused"], snap["shards"], snap["resident_bytes"]) == (False, 0, 0)
    assert (snap["reserved_bytes"], snap["rollout_starved"]) == (4096, 1)


def test_reservation_released_on_expiry_and_default_task_bytes(cp):
    ingest(cp, 4)                                        # no per-task estimate
    cp.configure_backpressure(BackpressureConfig(high_watermark_bytes=1000, default_task_bytes=400))
    worker = cp.rollout_worker("w", lease_s=0.05)
    assert len(worker.lease(4)) == 2                     # 2 * 400 <= 1000 < 3 * 400
    assert bp(cp)["reserved_bytes"] == 800
    time.sleep(0.1)
    assert cp.reclaim_expired() == 2
    assert bp(cp)["reserved_bytes"] == 0 and cp.worker_inflight() == {}
    big = cp.rollout_worker("big")
    cp.ingest_prompts([PromptTask(task_id="huge", run_id=cp.run_id, estimated_bytes=5000)])
    cp.redis.lmove(cp.keys.pending, cp.keys.pending, "RIGHT", "LEFT")  # put it first
    # Larger than the whole budget: admitted alone while nothing else is reserved.
    assert [t.task_id for t in big.lease(3)] == ["huge"]
    assert bp(cp)["reserved_bytes"] == 5000


def test_reservations_of_the_largest_tasks_add_and_release_exactly(cp):
    # 16 tasks at the cap in one lease: the sum passes 2**42, still exact. A task
    # stored with a larger estimate by an older version (1e18 bytes) leases and
    # releases too: the increments reach Redis as integer text, never as '1e+18'.
    from dataflow_redis.config import MAX_TASK_BYTES
    cp.configure_backpressure(BackpressureConfig(max_train_lease=1000))  # no watermark: no byte limit
    cp.ingest_prompts([PromptTask(task_id=f"t{i}", run_id=cp.run_id, estimated_bytes=MAX_TASK_BYTES)
                       for i in range(16)])
    cp.ingest_prompts([{"task_id": "legacy"}])
    cp.redis.hset(cp.keys.task_bytes, "legacy", str(10**18))
    worker = cp.rollout_worker("w")
    tasks = worker.lease(16)
    assert len(tasks) == 16 and bp(cp)["reserved_bytes"] == 16 * MAX_TASK_BYTES
    legacy = worker.lease(1)
    assert [t.task_id for t in legacy] == ["legacy"]
    assert bp(cp)["reserved_bytes"] == 16 * MAX_TASK_BYTES + 10**18
    assert len(commit(cp, worker, tasks + legacy)) == 17
    assert bp(cp)["reserved_bytes"] == 0 and cp.worker_inflight() == {}


# ------------------------------------------------------------------- 7. operator
def test_operator_pause_is_separate_from_the_latch_and_shown_in_status(cp):
    ingest(cp, 5)
    cp.configure_backpressure(BackpressureConfig(high_watermark_bytes=1000, low_watermark_bytes=500))
    worker = cp.rollout_worker("w")
    assert cp.pause("disk maintenance") is True
    assert cp.pause("again") is False
    status = cp.status()
    assert status["operator_pause"]["reason"] == "disk maintenance"
    snap = status["backpressure"]
    assert snap["operator_paused"] is True and snap["operator_reason"] == "disk maintenance"
    assert snap["paused"] is False                       # the latch is untouched
    assert worker.lease(2) == [] and bp(cp)["rollout_starved"] == 1
    # The latch keeps working underneath.
    shard = cp.capacity_reporter("s0")
    assert shard.report(1500).paused is True
    assert shard.report(100).paused is False
    assert worker.lease(2) == []                         # still held by the operator
    assert cp.resume("maintenance done") is True
    assert cp.status()["operator_pause"] is None and bp(cp)["operator_paused"] is False
    assert len(worker.lease(2)) == 2
    kinds = [(e["type"], e["reason"]) for e in cp.events() if e["type"].startswith("operator")]
    assert kinds == [("operator_pause", "disk maintenance"), ("operator_resume", "maintenance done")]


def test_operator_pause_works_without_any_backpressure_config(cp):
    ingest(cp, 2)
    cp.pause("freeze")
    assert cp.rollout_worker("w").lease(2) == []
    status = cp.status()
    assert status["operator_pause"]["reason"] == "freeze" and "backpressure" not in status
    cp.resume("thaw")
    assert len(cp.rollout_worker("w").lease(2)) == 2


# -------------------------------------------------------------------- 8. events
def test_every_transition_is_an_event_with_server_time_and_bytes(cp):
    cp.ingest_prompts([PromptTask(task_id=f"t{i}", run_id=cp.run_id, estimated_bytes=100)
                       for i in range(5)])
    t0 = cp.status()["server_time_ms"]
    cp.configure_backpressure(BackpressureConfig(high_watermark_bytes=1000, low_watermark_bytes=400))
    worker = cp.rollout_worker("w")
    assert len(worker.lease(2)) == 2                    # 200 bytes reserved
    shard, other = cp.capacity_reporter("s0"), cp.capacity_reporter("s1")
    other.report(0)
    shard.report(1100)                                  # pause
    cp.pause("ops")
    cp.resume("ops done")
    cp.set_config("watch shard health", stale_after_s=0.1)
    time.sleep(0.15)
    shard.report(300)                                   # both silent by now: s1 stays stale, s0
    t1 = cp.status()["server_time_ms"]                  # is back; then resume
    events = cp.events()
    assert [e["type"] for e in events] == ["config", "pause", "operator_pause", "operator_resume",
                                           "config", "shard_stale", "shard_stale", "shard_fresh", "resume"]
    for e in events:
        # at_ms is the script's server time; the stream id's time is taken by XADD a
        # moment later in the same script, so it may be a millisecond ahead.
        assert t0 <= e["at_ms"] <= int(e["id"].split("-")[0]) <= t1
        assert set(e) >= {"type", "reason", "at_ms", "resident_bytes", "reserved_bytes", "id"}
    assert [e["reserved_bytes"] for e in events] == [0] + [200] * 8   # the first config preceded the lease
    by_type = {e["type"]: e for e in events}
    assert by_type["pause"]["resident_bytes"] == 1100
    # Silences are marked before the report's bytes count: the stale events see 1100.
    assert sorted((e["reason"], e["resident_bytes"]) for e in events[5:7]) == [("s0", 1100), ("s1", 1100)]
    assert (by_type["shard_fresh"]["reason"], by_type["shard_fresh"]["resident_bytes"]) == ("s0", 300)
    assert by_type["resume"]["resident_bytes"] == 300
    assert by_type["operator_pause"]["reason"] == "ops"
    assert by_type["operator_resume"]["reason"] == "ops done"
    assert "high_watermark_bytes=1000" in events[0]["reason"]
    assert events[4]["reason"] == "watch shard health: stale_after_s=0.1"
    assert cp.events(count=2) == events[-2:]
