-- requeue_dead_letter.lua: an operator sends dead-lettered tasks back to pending,
-- with their attempt count reset to 0.
--
-- KEYS: config task_attempts pending dlq bp events reply
-- ARGV: [1] reason, then task ids
-- Returns: the ids requeued (ids not in the dead-letter hash are ignored); a retry
--   after a lost reply returns the first call's ids from the reply cache.
-- Invariants: a task leaves dlq and enters pending in the same step, exactly once.
-- @include util
-- @include backpressure

local cfg = load_config({'reply_ttl_s'})
local cached = cached_reply()
if cached then return split_words(cached) end
local now = now_ms()
local requeued = {}
for i = 2, #ARGV do
  if redis.call('HDEL', K.dlq, ARGV[i]) == 1 then
    redis.call('HDEL', K.task_attempts, ARGV[i])
    redis.call('RPUSH', K.pending, ARGV[i])
    requeued[#requeued + 1] = ARGV[i]
  end
end
if #requeued > 0 then log_event('dlq_requeue', ARGV[1] .. ': ' .. #requeued .. ' task(s)', now) end
remember_reply(cfg, table.concat(requeued, ' '))
return requeued
