"""Turning status.lua's raw snapshot into the ``status()`` dict.

Every status field of the seed is kept under its seed name and meaning (docs/design.md,
"Status" lists the few whose figures differ, and why); new fields are added beside
them. The ``backpressure`` entry exists only while a policy is configured.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

from ._args import text


def _pairs(flat: Sequence[Any]) -> dict[str, str]:
    if flat and isinstance(flat[0], bytes):  # a client that does not decode replies
        flat = [text(item) for item in flat]
    return dict(zip(flat[::2], flat[1::2]))


def _int(d: dict, name: str, default: Optional[int] = 0) -> Optional[int]:
    value = d.get(name)
    if value is None:
        return default
    try:
        return int(value)
    except ValueError:  # a number written as a float ("1e3", "12.0")
        return int(float(value))


def build_status(run_id: str, raw: Sequence[Any]) -> dict[str, Any]:
    now_ms = int(raw[0])
    counters, sizes, durable, bp, config = (_pairs(raw[i]) for i in range(1, 6))
    shards, stale = _pairs(raw[6]), sorted(text(s) for s in raw[7])

    committed = _int(counters, "samples_committed")
    acked = _int(counters, "samples_acked")
    failed = _int(sizes, "samples_failed")
    undurable = _int(sizes, "samples_undurable")
    operator = None
    if bp.get("operator_paused") == "1":
        operator = {"reason": bp.get("operator_reason", ""),
                    "since_s": round((now_ms - _int(bp, "operator_at_ms")) / 1000, 3)}
    status: dict[str, Any] = {
        "run_id": run_id,
        "prompts": _int(counters, "prompts"),
        "prompts_pending": _int(sizes, "prompts_pending"),
        "prompts_leased": _int(sizes, "prompts_leased"),
        "prompts_failed": _int(sizes, "prompts_failed"),
        "prompts_done": _int(counters, "prompts_done"),
        "samples_committed": committed,
        "samples_acked": acked,
        "samples_failed": failed,
        "train_backlog": max(0, committed - acked - failed),
        "queue_depth": _int(sizes, "queue_depth"),
        "queue_in_flight": _int(sizes, "queue_in_flight"),
        "rollout_workers": _int(sizes, "rollout_workers"),
        "trainers": _int(sizes, "trainers"),
        "rollout_workers_seen": _int(sizes, "rollout_workers_seen"),
        "trainers_seen": _int(sizes, "trainers_seen"),
        # The seed's two marker fields: the step the durable ack marker records, and the
        # samples it records as acked (every ack goes into the marker atomically).
        "durable_global_step": _int(durable, "global_step", None),
        "durable_acked": acked,
        # Beyond the seed: the newest step acked with optimizer_durable (a restarted
        # trainer resumes there), and the samples acked above it, which
        # requeue_undurable() replays.
        "checkpoint_global_step": _int(durable, "durable_global_step", None),
        "uncheckpointed_acked": undurable,
        "fenced_commits": _int(counters, "fenced_commits"),
        "operator_pause": operator,
        "config_version": _int(config, "version"),
        "server_time_ms": now_ms,
    }
    if config.get("backpressure") == "1":
        status["backpressure"] = _snapshot(now_ms, bp, config, shards, stale)
    return status


def _snapshot(now_ms: int, bp: dict, config: dict, shards: dict, stale: list) -> dict[str, Any]:
    resident = _int(bp, "resident_bytes")
    high = _int(config, "high_watermark_bytes", None)
    # A high watermark alone means low = high (config.BackpressureConfig, the latch).
    low = _int(config, "low_watermark_bytes", high)
    max_total, max_seen = 0, False
    weighted_age, weight, oldest = 0.0, 0, None
    stale_after_s = float(config["stale_after_s"]) if config.get("stale_after_s") else None
    stale_now = set(stale)
    for shard_id, value in shards.items():
        _seq, res, cap, avg, old, at_ms = value.split("|")
        aged_s = max(0, now_ms - int(at_ms)) / 1000  # ages advance while a shard is silent
        if stale_after_s is not None and aged_s >= stale_after_s:
            # Silent past the limit but not yet marked (marking needs a write, which a
            # read-only status cannot do): still shown as stale.
            stale_now.add(shard_id)
        if cap:
            max_total, max_seen = max_total + int(cap), True
        if avg:
            weighted_age += (float(avg) + aged_s) * max(int(res), 1)
            weight += max(int(res), 1)
        if old:
            oldest = max(oldest or 0.0, float(old) + aged_s)

    def starved_s(side: str) -> float:
        total = _int(bp, f"{side}_starved_ms")
        since = _int(bp, f"{side}_starved_since", None)
        return round((total + (now_ms - since if since else 0)) / 1000, 3)

    return {
        # the seed's snapshot fields
        "paused": bp.get("paused") == "1",
        "rollout_starved": _int(bp, "rollout_starved"),
        "trainer_starved": _int(bp, "trainer_starved"),
        "pause_transitions": _int(bp, "pause_transitions"),
        "resume_transitions": _int(bp, "resume_transitions"),
        "resident_bytes": resident,
        "max_resident_bytes": max_total if max_seen else None,
        "free_to_high_watermark_bytes": None if high is None else max(0, high - resident),
        "avg_feature_age_s": round(weighted_age / weight, 3) if weight else None,
        "oldest_feature_age_s": None if oldest is None else round(oldest, 3),
        # beyond the seed
        "high_watermark_bytes": high,
        "low_watermark_bytes": low,
        "reserved_bytes": _int(bp, "reserved_bytes"),
        "peak_resident_bytes": _int(bp, "peak_resident_bytes"),
        "rollout_starved_s": starved_s("rollout"),
        "trainer_starved_s": starved_s("trainer"),
        "rollout_capped": _int(bp, "rollout_capped"),
        "operator_paused": bp.get("operator_paused") == "1",
        "operator_reason": bp.get("operator_reason") if bp.get("operator_paused") == "1" else None,
        "shards": len(shards),
        "stale_shards": sorted(stale_now),
    }
