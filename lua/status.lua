-- status.lua: one consistent snapshot of the run, read in a single atomic step.
-- Read-only (writes nothing).
--
-- KEYS: config counters pending prompt_leases dlq train_queue train_leases workers
--       trainers undurable failed_samples durable bp shards stale_shards
-- ARGV: none
-- Returns: {now_ms, counters (flat field/value list), sizes (flat name/value list),
--           durable marker (flat), bp (flat), config (flat), shards (flat
--           shard_id/value list), stale shard ids}
-- Cost: O(1) except the shard list, O(shards).
-- @include util

local sizes = {
  'prompts_pending', redis.call('LLEN', K.pending),
  'prompts_leased', redis.call('HLEN', K.prompt_leases),
  'prompts_failed', redis.call('HLEN', K.dlq),
  'queue_depth', redis.call('LLEN', K.train_queue),
  'queue_in_flight', redis.call('HLEN', K.train_leases),
  'rollout_workers', redis.call('ZCARD', K.workers),
  'trainers', redis.call('ZCARD', K.trainers),
  'samples_undurable', redis.call('ZCARD', K.undurable),
  'samples_failed', redis.call('HLEN', K.failed_samples),
}
return {
  now_ms(),
  redis.call('HGETALL', K.counters),
  sizes,
  redis.call('HGETALL', K.durable),
  redis.call('HGETALL', K.bp),
  redis.call('HGETALL', K.config),
  redis.call('HGETALL', K.shards),
  redis.call('SMEMBERS', K.stale_shards),
}
