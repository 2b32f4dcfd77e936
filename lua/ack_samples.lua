-- ack_samples.lua: the durable ack. ONE atomic step records the acked ids, the
-- global_step and optimizer_durable, and releases the train leases.
--
-- KEYS: config counters samples train_leases train_deadlines acked undurable durable
--       ack_log reply
-- ARGV: [1] trainer_id
--       [2] global_step: '' = none (the ack counts at the recorded global_step, and a
--           durable one checkpoints that step; with no step recorded yet it records
--           nothing durable); '+<n>' = step n for a later part of one call whose first
--           part was checked at n: no regression check (another trainer may have moved
--           the step on in between), and the marker moves to n at most as far as the
--           recorded step (which a rollback or lost writes may have lowered meanwhile)
--       [3] optimizer_durable (1/0)
--       then pairs at 4 + 2i: sample_id, the grant's lease token (no other token holds it)
-- Returns: the sample ids newly acked (held by this trainer under its lease token; a
--   lease counts until it is reclaimed, which may be a little after its deadline).
--   Unknown, unleased, already-acked or fenced ids ack nothing.
-- Errors: STEP when global_step is below the recorded durable.global_step (nothing
--   written).
-- The marker (key durable): global_step = highest step acked; durable_global_step =
--   highest step acked with optimizer_durable = 1. Samples acked by a non-durable ack
--   stay in `undurable` (scored by step, record kept) until a durable ack at a step >=
--   theirs; requeue_undurable.lua returns them to the queue when the trainer restarts
--   from its last durable checkpoint. One entry per ack goes to ack_log.
-- Bounded work: an ack drops the records of at most COVER_LIMIT covered samples; when
--   more are left, durable.covered_left = 1 and the next acks go on (status counts
--   only samples above durable_global_step as undurable).
-- Invariants: an id is acked at most once (only a live lease is released); the marker,
--   the ids and the lease release change together or not at all; global_step never
--   decreases except through requeue_undurable.lua; durable_global_step <= global_step.
-- @include util
-- @include idset

-- Covered samples whose records one ack drops at most: 5,000 took 14 to 21 ms of Redis
-- time (an ack of one id, on small and large runs); 2,000 keep that step under 10 ms.
local COVER_LIMIT = 2000

local trainer, step_arg, durable = ARGV[1], ARGV[2], ARGV[3] == '1'
local cfg = load_config({'reply_ttl_s'})
local cached = cached_reply()
if cached then return split_words(cached) end

local marker = redis.call('HMGET', K.durable, 'global_step', 'durable_global_step', 'covered_left')
local recorded_text, durable_text = marker[1], marker[2]
local recorded = tonumber(recorded_text or -1)
local step, continued = nil, false
if step_arg == '' then
  -- Without a step the ack counts at the recorded step (after a durable ack at that
  -- step, as covered by it): only a trainer's own steps can tell what a checkpoint
  -- holds, and a step made up here would collide with a real one.
  step = recorded
elseif string.sub(step_arg, 1, 1) == '+' then
  step = tonumber(string.sub(step_arg, 2))
  continued = true
else
  step = tonumber(step_arg)
  if step < recorded then
    return refuse('STEP', 'global_step ' .. step_arg .. ' is below the recorded global_step ' ..
      recorded_text .. '; steps only move forward (did a trainer restart from an older checkpoint?)')
  end
end
-- Sample i (1-based) has its id at ARGV[2i + 2] and token at ARGV[2i + 3].
local ids = {}
for i = 4, #ARGV, 2 do ids[#ids + 1] = ARGV[i] end
local leases = get_many('HMGET', K.train_leases, ids)
local acked, seen = {}, {}
for i = 1, #ids do
  local sample_id = ids[i]
  if not seen[sample_id] and holds(leases[i], trainer, ARGV[2 * i + 3]) then
    seen[sample_id] = true
    acked[#acked + 1] = sample_id
  end
end
if #acked > 0 then
  -- The acked set is read before the first write: on a run whose markers are still
  -- Redis sets (0.1.0) this fails with WRONGTYPE while nothing is written (see
  -- migrate_dedup_sets.lua). The first write is a deletion: Redis then lets the script
  -- run on at maxmemory, so trainers can ack (and free memory) when the rest stops.
  local shape = {idset_shape(K.acked)}
  call_many('HDEL', K.train_leases, acked)
  call_many('ZREM', K.train_deadlines, acked)
  idset_add(K.acked, acked, shape)
  if durable then
    call_many('HDEL', K.samples, acked)
  else
    local score_text, scored = int_text(math.max(step, 0)), {}
    for i = 1, #acked do
      scored[2 * i - 1] = score_text
      scored[2 * i] = acked[i]
    end
    call_many('ZADD', K.undurable, scored)
  end
end

if #acked > 0 then redis.call('HINCRBY', K.counters, 'samples_acked', #acked) end
local marker_writes = {}
-- A later part of a call ('+n') never moves the record on: its first part did. Below
-- n the record was lowered meanwhile (requeue_undurable, or a crash that lost writes),
-- and the marker must not jump back over that; above n another trainer moved it on.
local marker_step = continued and math.min(step, recorded) or step
if marker_step > recorded then marker_writes[1], marker_writes[2] = 'global_step', int_text(marker_step) end
local covered_upto = marker[3] and durable_text
if durable and marker_step >= 0 then
  covered_upto = int_text(math.max(marker_step, tonumber(durable_text or -1)))
  marker_writes[#marker_writes + 1] = 'durable_global_step'
  marker_writes[#marker_writes + 1] = covered_upto
end
call_many('HSET', K.durable, marker_writes)
if covered_upto then
  -- Samples consumed up to the durable step are covered by a checkpoint: their
  -- records go, a bounded number per call.
  local covered = redis.call('ZRANGEBYSCORE', K.undurable, '-inf', covered_upto, 'LIMIT', 0, COVER_LIMIT)
  if #covered > 0 then
    call_many('HDEL', K.samples, covered)
    call_many('ZREM', K.undurable, covered)
  end
  if #covered == COVER_LIMIT then redis.call('HSET', K.durable, 'covered_left', 1)
  elseif marker[3] then redis.call('HDEL', K.durable, 'covered_left') end
end
redis.call('XADD', K.ack_log, 'MAXLEN', '~', 1000, '*', 'trainer', trainer,
  'global_step', step_arg == '' and '' or int_text(step), 'optimizer_durable', durable and 1 or 0,
  'acked', #acked)
-- An ack of ids changes state (the ack log, maybe the marker) even when it acks none
-- of them: its reply is cached either way (an empty one as ' '), so a retry finds it
-- instead of running again against a marker that may have moved. An ack of no ids (a
-- marker update) is not cached: a caller may repeat it under one request id.
remember_reply(cfg, #acked > 0 and table.concat(acked, ' ') or (#ids > 0 and ' ' or ''))
return acked
