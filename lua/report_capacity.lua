-- report_capacity.lua: one feature-store shard reports its absolute capacity. The
-- store only reports; this script (the controller) decides: the latch is
-- re-evaluated here, in the same atomic step as the byte update.
--
-- KEYS: config bp shards shard_seen stale_shards events
-- ARGV: [1] shard_id  [2] seq (per-shard report number; must grow)
--       [3] resident_bytes  [4] max_resident_bytes ('' = unknown)
--       [5] avg_age_s ('' = unknown)  [6] oldest_age_s ('' = unknown)
-- Returns: {accepted (1, or 0 for an out-of-order report that was ignored),
--           paused (1/0), run resident_bytes}
-- Invariant: bp.resident_bytes = sum of the latest resident_bytes of every
--   registered shard (stale ones included, until they deregister).
-- @include util
-- @include backpressure

local shard, seq, resident = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3])
local cfg = load_config({'high_watermark_bytes', 'low_watermark_bytes', 'stale_after_s'})
local now, now_text = server_time()
local previous = redis.call('HGET', K.shards, shard)
local previous_resident = 0
if previous then
  local prev_seq, prev_resident = string.match(previous, '^(%d+)|(%d+)|')
  if seq <= tonumber(prev_seq) then
    local state = redis.call('HMGET', K.bp, 'paused', 'resident_bytes')
    return {0, tonumber(state[1] or 0), tonumber(state[2] or 0)}
  end
  previous_resident = tonumber(prev_resident)
end
redis.call('HSET', K.shards, shard, table.concat({ARGV[2], ARGV[3], ARGV[4], ARGV[5], ARGV[6], now_text}, '|'))
redis.call('ZADD', K.shard_seen, now_text, shard)
-- The latch state and the peak, read once (nothing below changes bp.paused before the latch).
local bp = redis.call('HMGET', K.bp, 'paused', 'peak_resident_bytes')
local total = redis.call('HINCRBY', K.bp, 'resident_bytes', resident - previous_resident)
if total > tonumber(bp[2] or 0) then
  redis.call('HSET', K.bp, 'peak_resident_bytes', total)
end
if redis.call('SREM', K.stale_shards, shard) == 1 then log_event('shard_fresh', shard, now) end
mark_stale_shards(cfg, now)
local paused = evaluate_latch(cfg, now, 'capacity report from ' .. shard, bp[1], total)
return {1, paused and 1 or 0, total}
