"""The durable ack (issue point 6).

One script records the acked ids, global_step and optimizer_durable together with the
lease release; a lower global_step is refused with StepRegression and writes nothing;
optimizer_durable is recorded per ack (ack_log), durable_global_step moves only on
durable acks; requeue_undurable() is the recovery rule for non-durable acks.
"""

from __future__ import annotations

import re

import pytest

from conftest import dump_run, make_ref
from dataflow_redis import InvalidArgument, StepRegression, idset
from dataflow_redis.scripts import load_scripts


def leased_trainer(cp, ids, trainer_id="tr"):
    cp.enqueue_offline_refs([make_ref(cp, i) for i in ids])
    t = cp.trainer(trainer_id=trainer_id, lease_s=60)
    assert [r.sample_id for r in t.lease(len(ids))] == list(ids)
    return t


def successful_evalsha_calls(cp) -> int:
    stats = cp.redis.info("commandstats")["cmdstat_evalsha"]
    return stats["calls"] - stats.get("failed_calls", 0)


def ack_log(cp):
    return [fields for _, fields in cp.redis.xrange(cp.keys.ack_log)]


def test_ack_is_one_script_that_writes_ids_step_flag_and_releases_leases(cp):
    # The durable transaction is a single script touching every key it records.
    keys = set(load_scripts()["ack_samples"].key_names)
    assert {"acked", "durable", "ack_log", "train_leases", "train_deadlines", "undurable"} <= keys

    t = leased_trainer(cp, ["s0", "s1"])
    t.ack([], global_step=0)  # loads the script, so the count below has no NOSCRIPT retry
    evalsha_before = successful_evalsha_calls(cp)
    assert t.ack(["s0", "s1"], global_step=5, optimizer_durable=True) == ["s0", "s1"]
    assert successful_evalsha_calls(cp) - evalsha_before == 1, "the ack must be one script call"
    assert idset.members(cp.redis, cp.keys.acked) == {"s0", "s1"}
    assert cp.redis.hgetall(cp.keys.durable) == {"global_step": "5", "durable_global_step": "5"}
    assert cp.redis.hlen(cp.keys.train_leases) == 0 and cp.redis.zcard(cp.keys.train_deadlines) == 0
    assert ack_log(cp)[-1] == {"trainer": "tr", "global_step": "5", "optimizer_durable": "1", "acked": "2"}
    status = cp.status()
    assert status["checkpoint_global_step"] == 5 and status["durable_acked"] == 2


def test_the_seed_marker_fields_record_every_ack_durable_or_not(cp):
    """durable_global_step and durable_acked keep the seed's meaning: the step and the
    samples the durable ack marker records, whatever optimizer_durable says. Whether
    the optimizer state is checkpointed is told apart beside them."""
    t = leased_trainer(cp, ["s0", "s1", "s2"])
    t.ack(["s0", "s1"], global_step=5)  # optimizer_durable defaults to False
    status = cp.status()
    assert (status["durable_global_step"], status["durable_acked"], status["samples_acked"]) == (5, 2, 2)
    assert (status["checkpoint_global_step"], status["uncheckpointed_acked"]) == (None, 2)
    t.ack(["s2"], global_step=6, optimizer_durable=True)
    status = cp.status()
    assert (status["durable_global_step"], status["durable_acked"]) == (6, 3)
    assert (status["checkpoint_global_step"], status["uncheckpointed_acked"]) == (6, 0)


def test_a_lower_global_step_is_refused_and_writes_nothing(cp):
    t = leased_trainer(cp, ["s0", "s1"])
    assert t.ack(["s0"], global_step=10, optimizer_durable=False) == ["s0"]
    before = dump_run(cp)
    with pytest.raises(StepRegression, match="global_step 9 is below the recorded global_step 10"):
        t.ack(["s1"], global_step=9, optimizer_durable=True)
    assert dump_run(cp) == before
    assert isinstance(StepRegression("x"), InvalidArgument)
    # The trainer still holds s1 and can ack it at a valid step; equal steps are fine
    # (data-parallel trainers ack at the same step).
    assert t.ack(["s1"], global_step=10, optimizer_durable=True) == ["s1"]


def test_a_step_regression_without_ids_also_writes_nothing(cp):
    t = leased_trainer(cp, ["s0"])
    t.ack(["s0"], global_step=3)
    before = dump_run(cp)
    with pytest.raises(StepRegression):
        t.ack([], global_step=2, optimizer_durable=True)
    assert dump_run(cp) == before


@pytest.mark.parametrize("bad", [-1, 1.5, "3", True, 2**53])
def test_bad_global_step_is_refused_before_redis(cp, bad):
    t = leased_trainer(cp, ["s0"])
    before = dump_run(cp)
    with pytest.raises(InvalidArgument, match="global_step"):
        t.ack(["s0"], global_step=bad)
    assert dump_run(cp) == before


def test_optimizer_durable_is_recorded_per_ack_not_as_a_run_wide_flag(cp):
    t = leased_trainer(cp, ["a", "b", "c", "d"])
    t.ack(["a"], global_step=1, optimizer_durable=True)
    t.ack(["b"], global_step=2, optimizer_durable=False)
    other = cp.trainer(trainer_id="tr2")
    other.ack([], global_step=2, optimizer_durable=False)
    t.ack(["c"], global_step=3, optimizer_durable=False)
    log = ack_log(cp)
    assert [(e["trainer"], e["global_step"], e["optimizer_durable"], e["acked"]) for e in log] == [
        ("tr", "1", "1", "1"), ("tr", "2", "0", "1"), ("tr2", "2", "0", "0"), ("tr", "3", "0", "1")]
    # The last writer was non-durable; the durable marker still says step 1.
    marker = cp.redis.hgetall(cp.keys.durable)
    assert marker == {"global_step": "3", "durable_global_step": "1"}
    status = cp.status()
    assert (status["durable_global_step"], status["checkpoint_global_step"]) == (3, 1)
    assert (status["durable_acked"], status["uncheckpointed_acked"]) == (3, 2)
    # Non-durable acks keep the record (for replay); the durable one dropped it.
    assert not cp.redis.hexists(cp.keys.samples, "a")
    assert cp.redis.hexists(cp.keys.samples, "b") and cp.redis.hexists(cp.keys.samples, "c")
    assert cp.redis.zrange(cp.keys.undurable, 0, -1, withscores=True) == [("b", 2.0), ("c", 3.0)]

    # A later durable ack covers every earlier non-durable sample and drops their records.
    t.ack(["d"], global_step=4, optimizer_durable=True)
    assert cp.redis.zcard(cp.keys.undurable) == 0
    assert cp.redis.hlen(cp.keys.samples) == 0
    status = cp.status()
    assert (status["checkpoint_global_step"], status["durable_acked"], status["uncheckpointed_acked"]) == (4, 4, 0)


def test_requeue_undurable_returns_acks_after_the_last_durable_step(cp):
    t = leased_trainer(cp, ["a", "b", "c", "d"])
    t.ack(["a"], global_step=1, optimizer_durable=True)
    t.ack(["b"], global_step=2)
    t.ack(["c", "d"], global_step=3)
    # The trainer crashes; it restarts from its last durable checkpoint (step 1).
    assert cp.requeue_undurable() == 3
    assert set(cp.redis.lrange(cp.keys.train_queue, 0, -1)) == {"b", "c", "d"}
    assert idset.members(cp.redis, cp.keys.acked) == {"a"}
    status = cp.status()
    assert status["samples_acked"] == 1 and status["train_backlog"] == 3 and status["uncheckpointed_acked"] == 0
    assert cp.requeue_undurable() == 0  # idempotent
    assert (status["durable_global_step"], status["checkpoint_global_step"]) == (1, 1)  # rolled back to the checkpoint

    restarted = cp.trainer(trainer_id="tr-restarted")
    replayed = sorted(r.sample_id for r in restarted.lease(10))
    assert replayed == ["b", "c", "d"]
    # Training resumes at the step after the checkpoint; that must be accepted.
    assert sorted(restarted.ack(replayed, global_step=2, optimizer_durable=True)) == ["b", "c", "d"]
    status = cp.status()
    assert (status["checkpoint_global_step"], status["samples_acked"], status["train_backlog"]) == (2, 4, 0)


def test_an_ack_without_a_step_counts_at_the_recorded_step(cp):
    """No step named: the ack counts at the recorded global_step, and a durable one
    checkpoints that step. So after a durable ack at step 7 a step-less ack counts as
    covered by it (only the trainer knows it came after; naming the step says so), and
    with no step recorded at all a durable ack records nothing durable."""
    t = leased_trainer(cp, ["a", "b", "c", "d", "e"])
    t.ack(["a"], optimizer_durable=True)            # no step on record yet
    status = cp.status()
    assert (status["durable_global_step"], status["checkpoint_global_step"]) == (None, None)
    t.ack(["b"], global_step=7, optimizer_durable=True)
    t.ack(["c"])                                    # counts at step 7: covered
    t.ack(["d"], global_step=8)                     # named: after the checkpoint
    t.ack(["e"])                                    # counts at step 8 now
    status = cp.status()
    assert (status["durable_global_step"], status["checkpoint_global_step"], status["uncheckpointed_acked"]) == (8, 7, 2)
    assert cp.requeue_undurable() == 2
    assert sorted(cp.redis.lrange(cp.keys.train_queue, 0, -1)) == ["d", "e"]
    t2 = cp.trainer(trainer_id="tr2")
    assert sorted(t2.ack([r.sample_id for r in t2.lease(2)], optimizer_durable=True)) == ["d", "e"]
    status = cp.status()                            # a step-less durable ack at the recorded 7
    assert (status["durable_global_step"], status["checkpoint_global_step"], status["uncheckpointed_acked"]) == (7, 7, 0)
    assert [(e["global_step"], e["optimizer_durable"]) for e in ack_log(cp)][-1] == ("", "1")


def test_a_marker_only_ack_can_repeat_under_one_request_id(cp):
    """An ack of no ids (a checkpoint note) is not cached: the same request id used at
    every checkpoint moves the marker each time."""
    t = leased_trainer(cp, ["a", "b"])
    t.ack(["a"], global_step=1)
    t.ack([], optimizer_durable=True, request_id="checkpoint")
    t.ack(["b"], global_step=2)
    t.ack([], optimizer_durable=True, request_id="checkpoint")
    status = cp.status()
    assert (status["checkpoint_global_step"], status["uncheckpointed_acked"]) == (2, 0)


def test_requeue_undurable_after_an_explicit_step(cp):
    t = leased_trainer(cp, ["a", "b", "c"])
    t.ack(["a"], global_step=1)
    t.ack(["b"], global_step=2)
    t.ack(["c"], global_step=3)
    assert cp.requeue_undurable(after_step=2) == 1
    assert cp.redis.lrange(cp.keys.train_queue, 0, -1) == ["c"]
    assert idset.members(cp.redis, cp.keys.acked) == {"a", "b"}
    assert cp.status()["durable_global_step"] == 2
    with pytest.raises(InvalidArgument):
        cp.requeue_undurable(after_step="2")


def test_requeue_undurable_refuses_a_step_below_the_durable_checkpoint(cp):
    """Samples acked durably after that step are gone: the restart cannot replay them,
    and rolling global_step below durable_global_step would let a later durable ack
    move the durable marker backwards."""
    t = leased_trainer(cp, ["a", "b"])
    t.ack(["a"], global_step=10, optimizer_durable=True)
    t.ack(["b"], global_step=12)
    before = dump_run(cp)
    with pytest.raises(StepRegression, match="after_step 3 is below the checkpoint step 10"):
        cp.requeue_undurable(after_step=3)
    assert dump_run(cp) == before
    assert cp.requeue_undurable(after_step=10) == 1
    assert (cp.status()["durable_global_step"], cp.status()["checkpoint_global_step"]) == (10, 10)


def test_a_step_regression_names_the_recorded_step_exactly(cp):
    t = leased_trainer(cp, ["a", "b"])
    t.ack(["a"], global_step=123_456_789_012_345)
    with pytest.raises(StepRegression, match="below the recorded global_step 123456789012345;"):
        t.ack(["b"], global_step=5)


def test_a_durable_ack_drops_covered_records_a_bounded_number_per_call(cp):
    """12,000 non-durable acks, then a durable ack: it drops at most COVER_LIMIT records
    (ack_samples.lua), the next acks drop the rest, and meanwhile status counts none of
    them as undurable and no recovery replays them."""
    limit = int(re.search(r"local COVER_LIMIT = (\d+)", load_scripts()["ack_samples"].source).group(1))
    assert limit < 6_000
    ids = [f"s{i:05d}" for i in range(12_001)]
    cp.enqueue_offline_refs([make_ref(cp, i) for i in ids])
    t = cp.trainer(trainer_id="tr", lease_s=60)
    for start in range(0, 12_000, 6_000):
        assert len(t.lease(6_000)) == 6_000
        t.ack(ids[start:start + 6_000], global_step=1)
    t.lease(1)
    t.ack(ids[-1:], global_step=2, optimizer_durable=True)
    left = 12_000 - limit
    assert cp.redis.hlen(cp.keys.samples) == left
    assert cp.redis.hget(cp.keys.durable, "covered_left") == "1"
    status = cp.status()
    assert (status["uncheckpointed_acked"], status["durable_acked"], status["checkpoint_global_step"]) == (0, 12_001, 2)
    assert cp.requeue_undurable() == 0
    while left > 0:
        t.ack([], global_step=2)  # any ack goes on
        left -= min(limit, left)
        assert cp.redis.hlen(cp.keys.samples) == left
    assert cp.redis.zcard(cp.keys.undurable) == 0
    t.ack([], global_step=3)      # the flag goes once an ack finds nothing left
    assert cp.redis.hget(cp.keys.durable, "covered_left") is None


def test_requeue_undurable_works_in_batches(cp):
    ids = [f"s{i:03d}" for i in range(25)]
    t = leased_trainer(cp, ids)
    t.ack(ids, global_step=7)
    assert cp.requeue_undurable(batch=10) == 25
    assert cp.redis.llen(cp.keys.train_queue) == 25
    assert idset.count(cp.redis, cp.keys.acked) == 0


def test_durable_acks_are_never_replayed(cp):
    t = leased_trainer(cp, ["a", "b"])
    t.ack(["a", "b"], global_step=4, optimizer_durable=True)
    before = {k: v for k, v in dump_run(cp).items() if ":reply:" not in k}
    assert cp.requeue_undurable() == 0
    assert {k: v for k, v in dump_run(cp).items() if ":reply:" not in k} == before
