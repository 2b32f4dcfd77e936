-- status.lua: one consistent snapshot of the run, read in a single atomic step.
-- Read-only (writes nothing).
--
-- KEYS: config counters pending prompt_leases dlq train_queue train_leases workers
--       trainers undurable failed_samples durable bp shards stale_shards
-- ARGV: [1] active_ms: a worker or trainer counts as active if seen this recently (ms)
-- Returns: {now_ms, counters (flat field/value list), sizes (flat name/value list),
--           durable marker (flat), bp (flat), config (flat), shards (flat
--           shard_id/value list), stale shard ids}
-- Cost: O(1) except the shard list, O(shards).
-- Invariants: read-only; every figure comes from one atomic snapshot.
-- @include util

local now = now_ms()
local active_since = now - tonumber(ARGV[1])
-- Samples at or below the durable step are covered even while an ack is still
-- dropping their records (ack_samples.lua, COVER_LIMIT).
local durable_step = redis.call('HGET', K.durable, 'durable_global_step')
local sizes = {
  'prompts_pending', redis.call('LLEN', K.pending),
  'prompts_leased', redis.call('HLEN', K.prompt_leases),
  'prompts_failed', redis.call('HLEN', K.dlq),
  'queue_depth', redis.call('LLEN', K.train_queue),
  'queue_in_flight', redis.call('HLEN', K.train_leases),
  'rollout_workers', redis.call('ZCOUNT', K.workers, active_since, '+inf'),
  'trainers', redis.call('ZCOUNT', K.trainers, active_since, '+inf'),
  'rollout_workers_seen', redis.call('ZCARD', K.workers),
  'trainers_seen', redis.call('ZCARD', K.trainers),
  'samples_undurable', durable_step and redis.call('ZCOUNT', K.undurable, '(' .. durable_step, '+inf')
    or redis.call('ZCARD', K.undurable),
  'samples_failed', redis.call('HLEN', K.failed_samples),
}
return {
  now,
  redis.call('HGETALL', K.counters),
  sizes,
  redis.call('HGETALL', K.durable),
  redis.call('HGETALL', K.bp),
  redis.call('HGETALL', K.config),
  redis.call('HGETALL', K.shards),
  redis.call('SMEMBERS', K.stale_shards),
}
