-- requeue_undurable.lua: recovery after a trainer restarts from its last durable
-- checkpoint. Samples acked by non-durable acks at a step above `after_step` were
-- consumed by optimizer steps that are now lost: they return to the head of the
-- train queue (un-acked) so they are trained on again. The recorded global_step rolls
-- back to `after_step` (those optimizer steps are lost too), so the restarted trainer's
-- next ack, at after_step + 1, is not refused as a step regression.
--
-- KEYS: config counters samples train_queue train_signal acked undurable durable reply
-- ARGV: [1] after_step ('' = the recorded durable_global_step, or -1 if none)
--       [2] limit (at most this many per call)
-- Returns: number of samples requeued (call again while it equals limit); a retry
--   after a lost reply returns the first call's number from the reply cache and
--   requeues nothing more (not even a non-durable ack made in between).
-- Errors: STEP when after_step is below durable_global_step (nothing written): the
--   samples acked durably since after_step are no longer kept, so no restart from
--   before the last durable checkpoint can be replayed.
-- Invariants: a sample leaves undurable and acked and enters train_queue together;
--   samples covered by a durable ack are never requeued; durable_global_step <=
--   global_step.
-- @include util
-- @include leases
-- @include idset

local cfg = load_config({'reply_ttl_s'})
local cached = cached_reply()
if cached then return tonumber(cached) end
local durable_step = redis.call('HGET', K.durable, 'durable_global_step')
local after = ARGV[1]
if after == '' then after = durable_step or '-1' end
local after_step = tonumber(after)
if durable_step and after_step < tonumber(durable_step) then
  return refuse('STEP', 'after_step ' .. after .. ' is below the checkpoint step ' .. durable_step ..
    ': samples acked durably since then are no longer kept; restart from the last durable checkpoint')
end
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
-- Cached even when 0: a retry must not requeue an ack made since the first try.
remember_reply(cfg, int_text(#ids))
return #ids
