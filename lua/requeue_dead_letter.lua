-- requeue_dead_letter.lua: an operator sends dead-lettered tasks back to pending,
-- with their attempt count reset to 0.
--
-- KEYS: task_attempts pending dlq bp events
-- ARGV: [1] reason, then task ids
-- Returns: the ids requeued (ids not in the dead-letter hash are ignored).
-- Invariants: a task leaves dlq and enters pending in the same step, exactly once.
-- @include util
-- @include backpressure

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
return requeued
