-- ack_samples.lua: the durable ack. ONE atomic step records the acked ids, the
-- global_step and optimizer_durable, and releases the train leases.
--
-- KEYS: config counters samples train_leases train_deadlines acked undurable durable
--       ack_log reply
-- ARGV: [1] trainer_id  [2] global_step ('' = none)  [3] optimizer_durable (1/0)
--       then pairs at 4 + 2i: sample_id, lease token ('' = any of this trainer's)
-- Returns: the sample ids newly acked (held by this trainer under a live lease).
--   Unknown, unleased, already-acked or fenced ids ack nothing.
-- Errors: STEP when global_step is below the recorded durable.global_step (nothing
--   written).
-- The marker (key durable): global_step = highest step acked; durable_global_step =
--   highest step acked with optimizer_durable = 1. Samples acked by a non-durable ack
--   stay in `undurable` (scored by step, record kept) until a durable ack at a step >=
--   theirs; requeue_undurable.lua returns them to the queue when the trainer restarts
--   from its last durable checkpoint. One entry per ack goes to ack_log.
-- @include util

local trainer, step_arg, durable = ARGV[1], ARGV[2], ARGV[3] == '1'
local cfg = load_config()
local cached = cached_reply()
if cached then return split_words(cached) end

local recorded = tonumber(redis.call('HGET', K.durable, 'global_step') or -1)
local step = recorded
if step_arg ~= '' then
  step = tonumber(step_arg)
  if step < recorded then
    return refuse('STEP', 'global_step ' .. step_arg .. ' is below the recorded global_step ' ..
      recorded .. '; steps only move forward (did a trainer restart from an older checkpoint?)')
  end
end
local score = math.max(step, 0)

local acked = {}
for i = 4, #ARGV, 2 do
  local sample_id, token = ARGV[i], ARGV[i + 1]
  if holds(redis.call('HGET', K.train_leases, sample_id), trainer, token) then
    redis.call('HDEL', K.train_leases, sample_id)
    redis.call('ZREM', K.train_deadlines, sample_id)
    redis.call('SADD', K.acked, sample_id)
    if durable then
      redis.call('HDEL', K.samples, sample_id)
    else
      redis.call('ZADD', K.undurable, score, sample_id)
    end
    acked[#acked + 1] = sample_id
  end
end

if #acked > 0 then redis.call('HINCRBY', K.counters, 'samples_acked', #acked) end
if step > recorded then redis.call('HSET', K.durable, 'global_step', step) end
if durable and step >= 0 then
  redis.call('HSET', K.durable, 'durable_global_step', step)
  -- Samples consumed up to this step are now covered by a durable checkpoint.
  local covered = redis.call('ZRANGEBYSCORE', K.undurable, '-inf', step)
  for _, sample_id in ipairs(covered) do redis.call('HDEL', K.samples, sample_id) end
  if #covered > 0 then redis.call('ZREMRANGEBYSCORE', K.undurable, '-inf', step) end
end
redis.call('XADD', K.ack_log, 'MAXLEN', '~', 1000, '*', 'trainer', trainer,
  'global_step', step_arg, 'optimizer_durable', durable and 1 or 0, 'acked', #acked)
remember_reply(cfg, table.concat(acked, ' '))
return acked
