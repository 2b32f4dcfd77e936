-- fail_samples.lua: a trainer gives up sample refs it holds.
--
-- KEYS: config counters samples train_queue train_leases train_deadlines train_signal
--       failed_samples reply
-- ARGV: [1] trainer_id  [2] reason  [3] retryable (1/0)
--       then pairs at 4 + 2i: sample_id, the grant's lease token (no other token holds it)
-- Returns: the sample ids actually affected (only live leases this trainer holds; an
--   acked or re-granted ref is never touched, so it is never requeued).
-- Effect: retryable -> back to the tail of the train queue; otherwise terminal: the
--   record is dropped and failed_samples keeps the reason.
-- Invariants: a sample leaves train_leases exactly once and lands in exactly one of
--   train_queue or failed_samples; acked samples hold no lease, so they are never touched.
-- @include util
-- @include leases

local trainer, reason, retryable = ARGV[1], ARGV[2], ARGV[3] == '1'
local cfg = load_config()
local cached = cached_reply()
if cached then return split_words(cached) end

local affected = {}
for i = 4, #ARGV, 2 do
  local sample_id, token = ARGV[i], ARGV[i + 1]
  if holds(redis.call('HGET', K.train_leases, sample_id), trainer, token) then
    redis.call('HDEL', K.train_leases, sample_id)
    redis.call('ZREM', K.train_deadlines, sample_id)
    if retryable then
      redis.call('RPUSH', K.train_queue, sample_id)
    else
      redis.call('HDEL', K.samples, sample_id)
      redis.call('HSET', K.failed_samples, sample_id, reason)
    end
    affected[#affected + 1] = sample_id
  end
end
if retryable then
  wake_trainers(#affected)
elseif #affected > 0 then
  redis.call('HINCRBY', K.counters, 'samples_failed', #affected)
end
remember_reply(cfg, table.concat(affected, ' '))
return affected
