-- set_operator_pause.lua: the operator override, separate from the watermark latch.
-- While set, every prompt lease grants nothing (counted as rollout starvation when
-- work is pending), whatever the latch says.
--
-- KEYS: config bp events reply
-- ARGV: [1] paused (1/0)  [2] reason
-- Returns: 1 if the override changed, 0 if it already was in that state (a retry
--   after a lost reply finds the first call's 1 in the reply cache).
-- Invariants: independent of the watermark latch (bp.paused is never touched here); a
--   repeated call changes nothing and logs nothing.
-- @include util
-- @include backpressure

local paused, reason = ARGV[1], ARGV[2]
local cfg = load_config({'reply_ttl_s'})
if cached_reply() then return 1 end
local now = now_ms()
local before = redis.call('HGET', K.bp, 'operator_paused') or '0'
-- A repeated call changes nothing: the standing pause keeps its reason and start time.
if before == paused then return 0 end
redis.call('HSET', K.bp, 'operator_paused', paused, 'operator_reason', reason, 'operator_at_ms', now)
log_event(paused == '1' and 'operator_pause' or 'operator_resume', reason, now)
remember_reply(cfg, '1')
return 1
