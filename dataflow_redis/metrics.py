"""A run's status snapshot in the Prometheus text exposition format (version 0.0.4).

    from dataflow_redis.metrics import render
    print(render(cp.status(), cp.worker_inflight()))

Every number in ``ControlPlane.status()`` becomes one metric family with the label
``run``, named ``dataflow_redis_<field>`` or, where the field's name says too little,
as ``TOP_LEVEL`` and ``BACKPRESSURE`` below map it (``prompts_failed`` ->
``prompts_dead_lettered``; docs/cli.md lists them all); monotonic counts are counters
(``_total``), the rest gauges. Booleans are 0/1, byte figures end in ``_bytes`` and
durations in ``_seconds``. A field that is ``None`` (unset watermark, no step yet) is
left out rather than exported as a made-up value. ``dataflow-redis metrics`` prints
this; redirect it into a node_exporter textfile directory or serve it from any HTTP
handler.
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Optional

PREFIX = "dataflow_redis_"

# (status field, metric name without prefix, type, help). Fields of the backpressure
# snapshot are looked up in status["backpressure"].
TOP_LEVEL = (
    ("prompts", "prompts_ingested_total", "counter", "Prompt tasks ingested."),
    ("prompts_pending", "prompts_pending", "gauge", "Prompt tasks waiting for a rollout worker."),
    ("prompts_leased", "prompts_leased", "gauge", "Prompt tasks leased to rollout workers."),
    ("prompts_failed", "prompts_dead_lettered", "gauge", "Prompt tasks in the dead-letter set."),
    ("prompts_done", "prompts_done_total", "counter", "Prompt tasks whose sample was committed."),
    ("samples_committed", "samples_committed_total", "counter", "Sample refs committed (fresh ones)."),
    # A gauge: requeue_undurable takes acks back, and a counter must never fall.
    ("samples_acked", "samples_acked", "gauge",
     "Sample refs acked by trainers (requeue_undurable takes some back)."),
    ("samples_failed", "samples_failed", "gauge", "Sample refs failed terminally."),
    ("train_backlog", "train_backlog", "gauge", "Committed sample refs not yet acked or failed."),
    ("queue_depth", "train_queue_depth", "gauge", "Sample refs waiting for a trainer."),
    ("queue_in_flight", "train_queue_in_flight", "gauge", "Sample refs leased to trainers."),
    ("rollout_workers", "rollout_workers", "gauge", "Rollout workers seen in the last 5 minutes."),
    ("trainers", "trainers", "gauge", "Trainers seen in the last 5 minutes."),
    ("rollout_workers_seen", "rollout_workers_seen", "gauge", "Rollout workers ever registered with the run."),
    ("trainers_seen", "trainers_seen", "gauge", "Trainers ever registered with the run."),
    ("durable_global_step", "durable_global_step", "gauge", "Highest global_step recorded by an ack."),
    ("durable_acked", "durable_acked", "gauge", "Sample refs the durable ack marker records as acked."),
    ("checkpoint_global_step", "checkpoint_global_step", "gauge",
     "Highest global_step acked with optimizer_durable."),
    ("uncheckpointed_acked", "uncheckpointed_acked", "gauge",
     "Acked samples above checkpoint_global_step (requeue_undurable replays them)."),
    ("fenced_commits", "fenced_commits_total", "counter",
     "Committed refs rejected because the worker did not hold their source task's lease "
     "(expired and re-granted, or never granted to it)."),
    ("config_version", "config_version", "gauge", "Version of the run's stored config."),
    ("server_time_ms", "server_time_seconds", "gauge", "Redis server time of the snapshot, seconds."),
)
BACKPRESSURE = (
    ("paused", "latch_paused", "gauge", "1 while the watermark latch holds prompt leases back."),
    ("operator_paused", "operator_paused", "gauge", "1 while an operator pause is set."),
    ("rollout_starved", "rollout_starved_total", "counter",
     "Prompt lease calls refused by backpressure while work was pending."),
    ("trainer_starved", "trainer_starved_total", "counter", "Train lease calls that found no work."),
    ("rollout_starved_s", "rollout_starved_seconds_total", "counter",
     "Time rollout workers spent refused by backpressure, seconds."),
    ("trainer_starved_s", "trainer_starved_seconds_total", "counter",
     "Time trainers spent without work, seconds."),
    ("rollout_capped", "rollout_capped_total", "counter",
     "Prompt lease calls that granted nothing because of the per-worker cap while tasks were pending."),
    ("pause_transitions", "pause_transitions_total", "counter", "Latch transitions to paused."),
    ("resume_transitions", "resume_transitions_total", "counter", "Latch transitions to running."),
    ("resident_bytes", "resident_bytes", "gauge", "Feature-store bytes resident, summed over shards."),
    ("reserved_bytes", "reserved_bytes", "gauge", "Bytes reserved by leased prompt tasks."),
    ("peak_resident_bytes", "peak_resident_bytes", "gauge", "Highest resident bytes reported."),
    ("max_resident_bytes", "max_resident_bytes", "gauge", "Sum of the shards' hard caps, bytes."),
    ("high_watermark_bytes", "high_watermark_bytes", "gauge", "High watermark, bytes."),
    ("low_watermark_bytes", "low_watermark_bytes", "gauge", "Low watermark, bytes."),
    ("free_to_high_watermark_bytes", "free_to_high_watermark_bytes", "gauge",
     "Bytes left before the high watermark."),
    ("avg_feature_age_s", "avg_feature_age_seconds", "gauge", "Average age of resident features, seconds."),
    ("oldest_feature_age_s", "oldest_feature_age_seconds", "gauge", "Age of the oldest resident feature, seconds."),
    ("shards", "shards", "gauge", "Feature-store shards reporting capacity."),
    ("stale_shards", "stale_shards", "gauge", "Shards silent for longer than stale_after_s."),
)
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


def escape_label(value: str) -> str:
    """Escape a label value as the exposition format requires (backslash, quote, newline)."""
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _number(value: Any) -> Optional[str]:
    if value is None:
        return None
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, (list, tuple, set)):
        return str(len(value))
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return repr(value) if math.isfinite(value) else ("NaN" if math.isnan(value) else
                                                           "+Inf" if value > 0 else "-Inf")
    return None


def render(status: Mapping[str, Any], worker_inflight: Optional[Mapping[str, int]] = None) -> str:
    """Render a ``ControlPlane.status()`` dict (and optionally the per-worker in-flight
    counts of ``ControlPlane.worker_inflight()``) as Prometheus text; ends with a newline."""
    run = f'run="{escape_label(str(status["run_id"]))}"'
    lines: list[str] = []

    def family(name: str, kind: str, help_text: str, samples: list[tuple[str, str]]) -> None:
        if not samples:
            return
        lines.append(f"# HELP {PREFIX}{name} {help_text}")
        lines.append(f"# TYPE {PREFIX}{name} {kind}")
        for labels, value in samples:
            lines.append(f"{PREFIX}{name}{{{labels}}} {value}")

    for field, name, kind, help_text in TOP_LEVEL:
        value = status.get(field)
        if field == "server_time_ms" and value is not None:
            value = value / 1000
        text = _number(value)
        family(name, kind, help_text, [(run, text)] if text is not None else [])

    bp = status.get("backpressure")
    family("backpressure_enabled", "gauge", "1 when a backpressure policy is configured.",
           [(run, "1" if bp else "0")])
    if bp:
        for field, name, kind, help_text in BACKPRESSURE:
            text = _number(bp.get(field))
            family(name, kind, help_text, [(run, text)] if text is not None else [])
    else:
        # Without a policy the operator pause still applies (status.operator_pause).
        family("operator_paused", "gauge", "1 while an operator pause is set.",
               [(run, "1" if status.get("operator_pause") else "0")])

    if worker_inflight is not None:
        family("worker_inflight_prompts", "gauge", "Prompt leases held by each rollout worker.",
               [(f'{run},worker="{escape_label(w)}"', str(int(n)))
                for w, n in sorted(worker_inflight.items())])
    return "\n".join(lines) + "\n"
