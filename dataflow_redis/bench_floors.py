"""The benchmark's floors: what the control plane's guarantees cost with nothing else.

A floor runs, for one operation or for the whole batched cycle, only the Redis
commands that any implementation keeping the guarantees must run (server time, the
reply cache that makes retried calls safe, a fencing token, a lease record and a
deadline per leased item, the records, exact dedup markers, the counters), in one
script per call with no logic between the commands beyond the fencing-token check,
and a client that hands ready-made strings to redis-py. The floors cut every corner
the real operations cannot: plain Redis sets for the dedup markers (the memory
targets are ignored), no argument checks, no typed records, no backpressure, and
(single-item floors) keys that are already warm, so several commands change nothing.

So a floor costs less than any real implementation of the same guarantees; where a
floor's figure misses a target, no implementation can meet it on that machine with
that client stack (docs/benchmarks.md).
"""

from __future__ import annotations

import time
from typing import Any, Callable

import orjson

from .records import new_id

FLOOR_LEASE = """
local t = redis.call('TIME')
redis.call('HMGET', KEYS[1], 'reply_ttl_s', 'max_prompt_attempts', 'backpressure', 'high_watermark_bytes',
  'low_watermark_bytes', 'max_inflight_prompts_per_worker', 'default_task_bytes', 'stale_after_s')
redis.call('GET', KEYS[2])
redis.call('ZRANGEBYSCORE', KEYS[3], '-inf', t[1], 'LIMIT', '0', ARGV[4])
redis.call('ZADD', KEYS[4], t[1], ARGV[1])
redis.call('HMGET', KEYS[5], 'operator_paused', 'resident_bytes', 'reserved_bytes', 'paused', 'rollout_starved_since')
local id = redis.call('LMOVE', KEYS[6], KEYS[6], 'LEFT', 'RIGHT')
local token = redis.call('HINCRBY', KEYS[7], 'fence', 1)
redis.call('HSET', KEYS[8], id, token .. '|0|' .. t[1] .. '|' .. ARGV[1])
redis.call('ZADD', KEYS[3], t[1] + ARGV[3], id)
redis.call('HINCRBY', KEYS[9], ARGV[1], 1)
local record = redis.call('HGET', KEYS[10], id)
redis.call('SET', KEYS[2], id .. ' ' .. token, 'PX', '30000')
return {id, token, 0, record}
"""
"""The floor of a single-item prompt lease: config, server time, the reply cache read
and write, bounded reclaim, worker liveness, backpressure state, the pop, a fencing
token, the lease record and its deadline, the in-flight counter, the task record."""

FLOOR_LEASE_KEYS = ("config", "reply", "deadlines", "workers", "bp", "pending", "counters", "leases",
                    "inflight", "tasks", "k11", "k12", "k13", "k14", "k15", "k16")
"""As many keys as the real prompt lease passes (each key passed costs the call)."""

FLOOR_COMMIT = """
redis.call('HMGET', KEYS[1], 'max_record_bytes', 'reply_ttl_s')
redis.call('GET', KEYS[2])
redis.call('HGET', KEYS[3], ARGV[2])
redis.call('HGET', KEYS[4], ARGV[3])
redis.call('SISMEMBER', KEYS[5], ARGV[3])
redis.call('HEXISTS', KEYS[6], ARGV[3])
redis.call('HSET', KEYS[4], ARGV[3], ARGV[4])
redis.call('RPUSH', KEYS[7], ARGV[3])
redis.call('HDEL', KEYS[3], ARGV[2])
redis.call('ZREM', KEYS[8], ARGV[2])
redis.call('HINCRBY', KEYS[9], ARGV[1], -1)
redis.call('SADD', KEYS[10], ARGV[2])
redis.call('HDEL', KEYS[11], ARGV[2])
redis.call('HINCRBY', KEYS[12], 'samples_committed', 1)
redis.call('LPUSH', KEYS[13], '1')
redis.call('SET', KEYS[2], ARGV[3], 'PX', '30000')
return {ARGV[3]}
"""
"""The floor of a single-item commit: config, the reply cache read and write, the
source lease (fencing), the sample's dedup markers (queued or leased, acked, failed),
the sample record and its queue entry, the lease released (record, deadline, in-flight
counter), the task marked done and its record dropped, a counter, a trainer woken.
Run on one task and one sample, so after the first call the releases find nothing
and the markers are already set: cheaper than any real commit."""

FLOOR_COMMIT_KEYS = ("config", "reply", "leases", "samples", "acked", "failed", "train_queue", "deadlines",
                     "inflight", "tasks_done", "tasks", "counters", "train_signal", "k14", "k15", "k16")
"""As many keys as the real commit passes."""

# The batched cycle. Tokens are checked as the real scripts check them: the lease row
# starts with "<token>|".
_CYCLE_INGEST = """
-- KEYS: tasks pending reply   ARGV: request_id, then (task_id, record) pairs
local ids = {}
for i = 2, #ARGV, 2 do ids[#ids + 1] = ARGV[i] end
redis.call('HSET', KEYS[1], unpack(ARGV, 2))
redis.call('RPUSH', KEYS[2], unpack(ids))
redis.call('SET', KEYS[3], ARGV[1], 'PX', '30000')
return #ids
"""

_CYCLE_LEASE = """
-- KEYS: queue counters leases deadlines inflight records reply
-- ARGV: holder, max items, request_id, record inflight (1 = prompts)
local t = redis.call('TIME')
local now = t[1] * 1000 + math.floor(t[2] / 1000)
local ids = redis.call('LPOP', KEYS[1], ARGV[2])
if not ids then return {} end
local n = #ids
local first = redis.call('HINCRBY', KEYS[2], 'fence', n) - n
local now_text, deadline = string.format('%d', now), string.format('%d', now + 3600000)
local rows, deadlines, out = {}, {}, {}
for i = 1, n do
  rows[2 * i - 1] = ids[i]
  rows[2 * i] = string.format('%d', first + i) .. '|0|' .. now_text .. '|' .. ARGV[1]
  deadlines[2 * i - 1] = deadline
  deadlines[2 * i] = ids[i]
end
redis.call('HSET', KEYS[3], unpack(rows))
redis.call('ZADD', KEYS[4], unpack(deadlines))
if ARGV[4] == '1' then redis.call('HINCRBY', KEYS[5], ARGV[1], n) end
local records = redis.call('HMGET', KEYS[6], unpack(ids))
for i = 1, n do
  out[3 * i - 2] = ids[i]
  out[3 * i - 1] = first + i
  out[3 * i] = records[i]
end
redis.call('SET', KEYS[7], ARGV[3], 'PX', '30000')
return out
"""

_FINISH = """
-- Items done with: lease row and deadline dropped, dedup marker set, record dropped.
local function finish(ids, leases, deadlines, markers, records, counters, counter)
  redis.call('HDEL', leases, unpack(ids))
  redis.call('ZREM', deadlines, unpack(ids))
  redis.call('SADD', markers, unpack(ids))
  redis.call('HDEL', records, unpack(ids))
  redis.call('HINCRBY', counters, counter, #ids)
end
"""

_CYCLE_COMMIT = _FINISH + """
-- KEYS: leases deadlines inflight tasks tasks_done samples train_queue acked counters reply
-- ARGV: worker, request_id, then (task_id, token, sample_id, record) per ref
local n = (#ARGV - 2) / 4
local task_ids, sample_ids = {}, {}
for i = 1, n do
  task_ids[i] = ARGV[4 * i - 1]
  sample_ids[i] = ARGV[4 * i + 1]
end
local leases = redis.call('HMGET', KEYS[1], unpack(task_ids))
local known = redis.call('HMGET', KEYS[6], unpack(sample_ids))
local acked = redis.call('SMISMEMBER', KEYS[8], unpack(sample_ids))
local done, fresh, records = {}, {}, {}
for i = 1, n do
  local token = ARGV[4 * i]
  if leases[i] and string.sub(leases[i], 1, #token + 1) == token .. '|' then
    done[#done + 1] = task_ids[i]
    if not known[i] and acked[i] == 0 then
      fresh[#fresh + 1] = sample_ids[i]
      records[#records + 1] = sample_ids[i]
      records[#records + 1] = ARGV[4 * i + 2]
    end
  end
end
if #fresh > 0 then
  redis.call('HSET', KEYS[6], unpack(records))
  redis.call('RPUSH', KEYS[7], unpack(fresh))
end
if #done > 0 then
  finish(done, KEYS[1], KEYS[2], KEYS[5], KEYS[4], KEYS[9], 'prompts_done')
  redis.call('HINCRBY', KEYS[3], ARGV[1], -#done)
end
redis.call('SET', KEYS[10], ARGV[2], 'PX', '30000')
return fresh
"""

_CYCLE_ACK = _FINISH + """
-- KEYS: train_leases train_deadlines acked samples counters reply
-- ARGV: request_id, then (sample_id, token) pairs
local n = (#ARGV - 1) / 2
local ids = {}
for i = 1, n do ids[i] = ARGV[2 * i] end
local leases = redis.call('HMGET', KEYS[1], unpack(ids))
local acked = {}
for i = 1, n do
  local token = ARGV[2 * i + 1]
  if leases[i] and string.sub(leases[i], 1, #token + 1) == token .. '|' then acked[#acked + 1] = ids[i] end
end
if #acked > 0 then finish(acked, KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5], 'samples_acked') end
redis.call('SET', KEYS[6], ARGV[1], 'PX', '30000')
return acked
"""


class FloorCycle:
    """The floor of the full cycle for one benchmark process: the five steps (ingest,
    prompt lease, commit, train lease, ack) as five scripts on keys under ``prefix``."""

    def __init__(self, client: Any, prefix: str, index: int, payload: str, ref: dict) -> None:
        self.execute: Callable[..., Any] = client.execute_command
        load = client.script_load
        self.sha = {name: load(body) for name, body in (
            ("ingest", _CYCLE_INGEST), ("lease", _CYCLE_LEASE), ("commit", _CYCLE_COMMIT),
            ("ack", _CYCLE_ACK))}
        key = lambda *names: [prefix + name for name in names]  # noqa: E731
        self.keys = {
            "ingest": key("tasks", "pending", f"reply:{index}"),
            "lease": key("pending", "counters", "leases", "deadlines", "inflight", "tasks", f"reply:{index}"),
            "commit": key("leases", "deadlines", "inflight", "tasks", "tasks_done", "samples", "train_queue",
                          "acked", "counters", f"reply:{index}"),
            "train_lease": key("train_queue", "counters", "train_leases", "train_deadlines", "inflight",
                               "samples", f"reply:{index}"),
            "ack": key("train_leases", "train_deadlines", "acked", "samples", "counters", f"reply:{index}"),
        }
        self.index = index
        self.worker, self.trainer = f"floor-w{index}", f"floor-t{index}"
        self.task_record = orjson.dumps(payload)
        self.ref_record = orjson.dumps(ref)
        self.calls = 0

    def _run(self, step: str, script: str, args: list) -> Any:
        keys = self.keys[step]
        return self.execute("EVALSHA", self.sha[script], len(keys), *keys, *args)

    def cycle(self, batch: int) -> int:
        """One round of the five steps on ``batch`` new tasks; returns samples acked."""
        self.calls += 1
        request = f"{self.index}.{self.calls}"
        args: list = [request]
        record = self.task_record
        for _ in range(batch):
            args += (new_id(), record)
        self._run("ingest", "ingest", args)
        leased = self._run("lease", "lease", [self.worker, batch, request, 1])
        args = [self.worker, request]
        ref = self.ref_record
        for i in range(0, len(leased), 3):
            orjson.loads(leased[i + 2])  # a worker reads the task it runs
            task_id = leased[i]
            args += (task_id, leased[i + 1], task_id + ":0", ref)
        self._run("commit", "commit", args)
        leased = self._run("train_lease", "lease", [self.trainer, batch, request, 0])
        args = [request]
        for i in range(0, len(leased), 3):
            orjson.loads(leased[i + 2])  # a trainer reads the ref it loads
            args += (leased[i], leased[i + 1])
        return len(self._run("ack", "ack", args))

    def run(self, stop: float, batch: int) -> int:
        """Cycles until time.perf_counter() passes ``stop``; returns samples acked."""
        acked = 0
        while time.perf_counter() < stop:
            acked += self.cycle(batch)
        return acked
