"""The seed's two soaks as real multi-process runs on a real redis-server.

Pipeline order (each step is one atomic Redis call):
  worker:  lease a prompt task -> generate -> put the sample's bytes into the simulated
           store (the store reports its capacity) -> commit the sample ref;
  trainer: lease refs -> ack them at the step -> evict their bytes (the store reports).
The store only reports; the control plane decides (latch, caps). Both soaks use the
seed's levers only (no reservation), several worker processes and one trainer process.

The figures are printed (run with -s) and recorded in docs/backpressure.md.
"""

from __future__ import annotations

import json

import bp_procs

from dataflow_redis import BackpressureConfig, PromptTask
from dataflow_redis.simstore import SimulatedFeatureStore

KIB = 1024


def run_soak(cp, redis_url, *, prompts, hard_cap, high, low, workers, cap, worker_opts, trainer_opts):
    cp.ingest_prompts([PromptTask(task_id=f"p{i:05d}", run_id=cp.run_id, payload={"nbytes": KIB})
                       for i in range(prompts)])
    cp.configure_backpressure(BackpressureConfig(
        high_watermark_bytes=high, low_watermark_bytes=low, max_inflight_prompts_per_worker=cap,
        max_train_lease=trainer_opts["batch"]))
    shard = "soak-store"
    result = bp_procs.run_pipeline(
        redis_url, cp.run_id, workers,
        dict(shard=shard, hard_cap=hard_cap, lease_max=cap, **worker_opts),
        dict(shard=shard, hard_cap=hard_cap, expected=prompts, **trainer_opts))
    store = SimulatedFeatureStore(cp, shard, hard_cap, report=False)
    status = cp.status()
    snap = status["backpressure"]
    produced = sum(w["produced"] for w in result["workers"])
    figures = {
        "prompts": prompts, "workers": workers, "per_worker_cap": cap, "seconds": result["seconds"],
        "peak_store_bytes": store.peak_bytes(), "peak_reported_bytes": snap["peak_resident_bytes"],
        "hard_cap": hard_cap, "high": high, "low": low,
        "pause_transitions": snap["pause_transitions"], "resume_transitions": snap["resume_transitions"],
        "refused_puts": sum(w["refused_puts"] for w in result["workers"]),
        "rollout_starved": snap["rollout_starved"], "rollout_starved_s": snap["rollout_starved_s"],
        "trainer_starved": snap["trainer_starved"], "trainer_starved_s": snap["trainer_starved_s"],
        "trainer_steps": result["trainer"]["steps"], "trainer_acts": result["trainer"]["acts"],
        "acked_at_mark": result["trainer"]["acked_at_mark"],
        "trainer_samples_per_s": round(prompts / result["trainer"]["seconds"], 1),
        # what the workers together produce per second of producing (time spent
        # waiting out a refusal left out): the producers' speed, for the ratio
        "producer_samples_per_s_busy": round(
            sum(w["produced"] / max(w["busy_s"], 0.001) for w in result["workers"]), 1),
        "final_resident_bytes": snap["resident_bytes"],
    }
    figures["producer_to_trainer_speed"] = round(
        figures["producer_samples_per_s_busy"] / max(figures["trainer_samples_per_s"], 0.001), 2)
    # Every task ended acked, exactly once; nothing lost, nothing left behind.
    assert result["trainer"]["acked"] == prompts and result["trainer"]["duplicates"] == 0
    assert produced == prompts
    assert status["samples_acked"] == prompts and status["prompts_done"] == prompts
    assert status["samples_committed"] == prompts
    assert status["prompts_pending"] == status["prompts_leased"] == status["prompts_failed"] == 0
    assert status["queue_depth"] == status["queue_in_flight"] == status["samples_failed"] == 0
    assert snap["reserved_bytes"] == 0 and cp.worker_inflight() == {}
    assert max(w["max_held"] for w in result["workers"]) <= cap
    # The latch transitions agree with the events stream and alternate.
    kinds = [e["type"] for e in cp.events(count=10_000) if e["type"] in ("pause", "resume")]
    assert kinds.count("pause") == snap["pause_transitions"]
    assert kinds.count("resume") == snap["resume_transitions"]
    assert all(a != b for a, b in zip(kinds, kinds[1:]))
    store_state = store.state()
    store.delete()
    return figures, store_state


def test_soak_a_producers_four_times_faster_than_the_trainer(cp, redis_url):
    """1 KiB samples, hard cap 24 KiB, high 16 KiB, low 8 KiB, 4000 prompts. The
    trainer takes at most 8 refs per 32 ms step (at most 250 samples/s); four workers
    produce as fast as their calls allow (0.5 ms of generation per sample), several
    times the trainer's speed: the measured ratio is reported as
    producer_to_trainer_speed (docs/backpressure.md), never asserted."""
    figures, _ = run_soak(
        cp, redis_url, prompts=4000, hard_cap=24 * KIB, high=16 * KIB, low=8 * KIB, workers=4, cap=2,
        worker_opts={"gen_s": 0.0005, "poll_s": 0.004},
        trainer_opts={"batch": 8, "step_s": 0.032, "act_every": 1, "rounds_mark": 500})
    print("\nsoak A figures:", json.dumps(figures))
    assert figures["peak_store_bytes"] <= 24 * KIB and figures["peak_reported_bytes"] <= 24 * KIB
    assert figures["pause_transitions"] >= 1 and figures["resume_transitions"] >= 1
    # 4 workers x cap 2 = 8 KiB in flight at most: the overshoot above high fits under
    # the hard cap, so the store never had to refuse a put.
    assert figures["refused_puts"] == 0
    assert figures["acked_at_mark"] > 250           # the seed's figure: > 250 acked in 500 rounds


def test_soak_b_trainer_acts_every_fifth_step_and_residency_drains_to_zero(cp, redis_url):
    """cap 32 KiB, high 24 KiB, low 12 KiB, 6000 prompts; the trainer acts only on
    every 5th step (a burst of up to 16 refs), so residency swings across the band."""
    figures, store_state = run_soak(
        cp, redis_url, prompts=6000, hard_cap=32 * KIB, high=24 * KIB, low=12 * KIB, workers=4, cap=2,
        worker_opts={"gen_s": 0.001, "poll_s": 0.004},
        trainer_opts={"batch": 16, "step_s": 0.002, "act_every": 5})
    print("\nsoak B figures:", json.dumps(figures))
    assert figures["peak_store_bytes"] <= 32 * KIB and figures["peak_reported_bytes"] <= 32 * KIB
    assert figures["pause_transitions"] >= 1
    assert figures["refused_puts"] == 0
    # Drained: the store holds nothing and the control plane's view agrees exactly.
    assert store_state.resident_bytes == 0 and store_state.objects == 0
    assert figures["final_resident_bytes"] == 0
