-- report_capacity.lua: one feature-store shard reports its absolute capacity. The
-- store only reports; this script (the controller) decides: the latch is
-- re-evaluated here, in the same atomic step as the byte update.
--
-- KEYS: config bp shards shard_seen stale_shards retired_shards events
-- ARGV: [1] shard_id  [2] seq (per-shard report number; must grow)
--       [3] resident_bytes  [4] max_resident_bytes ('' = unknown)
--       [5] avg_age_s ('' = unknown)  [6] oldest_age_s ('' = unknown)
-- Returns: {accepted (1, or 0 for an out-of-order report that was ignored: seq not
--           above the shard's last one, or its last before it deregistered),
--           paused (1/0), run resident_bytes}. A repeat of the report last accepted
--           (same seq, same figures: a retry after a lost reply) answers 1 again and
--           writes nothing.
-- Errors: BADARG when the run's total would pass 2^53 - 1 bytes (beyond exact
--   arithmetic; nothing is written).
-- Invariant: bp.resident_bytes = sum of the latest resident_bytes of every
--   registered shard (stale ones included, until they deregister).
-- @include util
-- @include backpressure

local shard, seq, resident = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3])
local cfg = load_config({'high_watermark_bytes', 'low_watermark_bytes', 'stale_after_s'})
local now, now_text = server_time()
local previous = redis.call('HGET', K.shards, shard)
local previous_resident, last_seq = 0, nil
if previous then
  local prev_seq, prev_resident = string.match(previous, '^(%d+)|(%d+)|')
  last_seq, previous_resident = prev_seq, tonumber(prev_resident)
else
  last_seq = redis.call('HGET', K.retired_shards, shard)  -- a shard that deregistered
end
if last_seq and seq <= tonumber(last_seq) then
  local state = redis.call('HMGET', K.bp, 'paused', 'resident_bytes')
  local again = previous and string.sub(previous, 1, #ARGV[2] + #ARGV[3] + #ARGV[4] + #ARGV[5] + #ARGV[6] + 5) ==
    table.concat({ARGV[2], ARGV[3], ARGV[4], ARGV[5], ARGV[6], ''}, '|')
  return {again and 1 or 0, tonumber(state[1] or 0), tonumber(state[2] or 0)}
end
-- The latch state, the peak and the total, read once (nothing below changes bp.paused
-- before the latch). The total is checked before the first write.
local bp = redis.call('HMGET', K.bp, 'paused', 'peak_resident_bytes', 'resident_bytes')
-- Compared as a change against the room left: every term is an integer below 2^53, so
-- both sides are exact (total + change could round down to the limit itself).
if resident - previous_resident > 9007199254740991 - tonumber(bp[3] or 0) then
  return refuse('BADARG', 'the run\'s resident bytes would pass 2^53 - 1 with this report of ' .. ARGV[3] ..
    ' bytes from ' .. shard .. '; report bytes, not bits or a larger unit')
end
if not previous and last_seq then redis.call('HDEL', K.retired_shards, shard) end
-- Shards silent too long are marked first, this one included: a shard that comes back
-- after a silence nobody else noticed still logs shard_stale, then shard_fresh below.
mark_stale_shards(cfg, now)
redis.call('HSET', K.shards, shard, table.concat({ARGV[2], ARGV[3], ARGV[4], ARGV[5], ARGV[6], now_text}, '|'))
redis.call('ZADD', K.shard_seen, now_text, shard)
local total = redis.call('HINCRBY', K.bp, 'resident_bytes', int_text(resident - previous_resident))
if total > tonumber(bp[2] or 0) then
  redis.call('HSET', K.bp, 'peak_resident_bytes', int_text(total))
end
if redis.call('SREM', K.stale_shards, shard) == 1 then log_event('shard_fresh', shard, now) end
local paused = evaluate_latch(cfg, now, 'capacity report from ' .. shard, bp[1], total)
return {1, paused and 1 or 0, total}
