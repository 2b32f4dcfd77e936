-- deregister_shard.lua: a feature-store shard leaves; its bytes stop counting.
--
-- KEYS: config bp shards shard_seen stale_shards retired_shards events reply
-- ARGV: [1] shard_id
-- Returns: 1 if the shard was registered, else 0 (a retry after a lost reply finds
--   the first call's 1 in the reply cache).
-- Invariants: bp.resident_bytes stays the sum over registered shards; the latch is
--   re-evaluated in the same step. The shard's last seq stays in retired_shards, so a
--   report sent before the deregistration and delivered after it is ignored like any
--   other late report (report_capacity.lua).
-- @include util
-- @include backpressure

local shard = ARGV[1]
if cached_reply() then return 1 end
local previous = redis.call('HGET', K.shards, shard)
if not previous then return 0 end
local now = now_ms()
local prev_seq, prev_resident = string.match(previous, '^(%d+)|(%d+)|')
redis.call('HINCRBY', K.bp, 'resident_bytes', int_text(-tonumber(prev_resident)))
redis.call('HSET', K.retired_shards, shard, prev_seq)
redis.call('HDEL', K.shards, shard)
redis.call('ZREM', K.shard_seen, shard)
redis.call('SREM', K.stale_shards, shard)
log_event('shard_deregistered', shard, now)
local cfg = load_config()
evaluate_latch(cfg, now, 'shard ' .. shard .. ' deregistered')
remember_reply(cfg, '1')
return 1
