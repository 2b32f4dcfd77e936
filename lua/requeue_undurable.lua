-- requeue_undurable.lua: recovery after a trainer restarts from its last durable
-- checkpoint. Samples acked by non-durable acks at a step above `after_step` were
-- consumed by optimizer steps that are now lost: they return to the head of the
-- train queue (un-acked) so they are trained on again. The recorded global_step rolls
-- back to `after_step` (those optimizer steps are lost too), so the restarted trainer's
-- next ack, at after_step + 1, is not refused as a step regression.
--
-- KEYS: counters samples train_queue train_signal acked undurable durable
-- ARGV: [1] after_step ('' = the recorded durable_global_step, or -1 if none)
--       [2] limit (at most this many per call)
-- Returns: number of samples requeued (call again while it equals limit).
-- Invariants: a sample leaves undurable and acked and enters train_queue together;
--   samples covered by a durable ack are never requeued.
-- @include util
-- @include leases
-- @include idset

local after = ARGV[1]
if after == '' then after = redis.call('HGET', K.durable, 'durable_global_step') or '-1' end
local after_step = tonumber(after)
local ids = redis.call('ZRANGEBYSCORE', K.undurable, '(' .. after, '+inf', 'LIMIT', 0, tonumber(ARGV[2]))
for _, sample_id in ipairs(ids) do
  -- The acked set first: on a run whose markers are still Redis sets (0.1.0) the first
  -- removal fails with WRONGTYPE before anything is written (see migrate_dedup_sets.lua).
  idset_remove(K.acked, sample_id)
  redis.call('ZREM', K.undurable, sample_id)
  redis.call('LPUSH', K.train_queue, sample_id)
end
if tonumber(redis.call('HGET', K.durable, 'global_step') or -1) > after_step then
  if after_step >= 0 then redis.call('HSET', K.durable, 'global_step', after)
  else redis.call('HDEL', K.durable, 'global_step') end
end
if #ids > 0 then
  redis.call('HINCRBY', K.counters, 'samples_acked', -#ids)
  wake_trainers(#ids)
end
return #ids
