"""status.py turns status.lua's raw snapshot into the status dict, whatever the client
decodes: a client without decode_responses hands it bytes, and a number stored as
"12.0" (written by hand, or by an older writer) still reads as an int."""

from __future__ import annotations

from dataflow_redis.status import build_status

RAW = [
    1_700_000_000_000,
    ["prompts", "10", "prompts_done", "4", "samples_committed", "7", "samples_acked", "3.0"],
    ["prompts_pending", 5, "prompts_leased", 1, "prompts_failed", 0, "queue_depth", 2, "queue_in_flight", 2,
     "rollout_workers", 1, "trainers", 1, "rollout_workers_seen", 1, "trainers_seen", 1,
     "samples_undurable", 1, "samples_failed", 0],
    ["global_step", "12", "durable_global_step", "1e1"],
    ["resident_bytes", "4096", "paused", "0"],
    ["backpressure", "1", "high_watermark_bytes", "8192", "version", "2"],
    ["shard-0", "1|4096|16384|||1700000000000"],
    [],
]


def _as_bytes(item):
    if isinstance(item, list):
        return [_as_bytes(x) for x in item]
    return item.encode() if isinstance(item, str) else item


def test_decoded_and_raw_bytes_replies_read_the_same():
    decoded = build_status("run", RAW)
    assert build_status("run", _as_bytes(RAW)) == decoded
    assert decoded["samples_acked"] == 3 and decoded["checkpoint_global_step"] == 10
    assert decoded["train_backlog"] == 4 and decoded["durable_acked"] == 3 and decoded["uncheckpointed_acked"] == 1
    assert decoded["durable_global_step"] == 12
    assert decoded["backpressure"]["free_to_high_watermark_bytes"] == 4096
    assert decoded["backpressure"]["max_resident_bytes"] == 16384
