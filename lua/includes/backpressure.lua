-- includes/backpressure.lua: the transition log, the hysteresis latch, shard
-- staleness and starvation timers. Uses K.bp, K.events, K.shards, K.shard_seen,
-- K.stale_shards as its callers declare them. Needs includes/util.lua.

local EVENTS_MAXLEN = 10000

-- Append one transition to the capped events stream. The stream id carries the
-- server time; resident and reserved bytes are recorded as they are at that moment.
local function log_event(kind, reason, now)
  local bytes = redis.call('HMGET', K.bp, 'resident_bytes', 'reserved_bytes')
  redis.call('XADD', K.events, 'MAXLEN', '~', EVENTS_MAXLEN, '*',
    'type', kind, 'reason', reason, 'at_ms', now,
    'resident_bytes', bytes[1] or 0, 'reserved_bytes', bytes[2] or 0)
end

-- The hysteresis latch, evaluated inside every script that can move it.
--   not paused and resident >= high            -> pause   (pause_transitions += 1)
--   paused and resident <= low and resident < high -> resume (resume_transitions += 1)
--   otherwise                                  -> keep state
-- "resident < high" only matters when low == high: without it a run sitting exactly
-- on the threshold would pause and resume on alternate calls. No high watermark:
-- never paused (a latch left paused by an older config is released).
-- A caller that has just read bp.paused and bp.resident_bytes passes them (text or
-- false, as HMGET returns them) to save reading them again.
local function evaluate_latch(cfg, now, reason, paused_text, resident_text)
  if paused_text == nil then
    local state = redis.call('HMGET', K.bp, 'paused', 'resident_bytes')
    paused_text, resident_text = state[1], state[2]
  end
  local paused = paused_text == '1'
  local resident = tonumber(resident_text or 0)
  local high = cfg.high_watermark_bytes
  local want = paused
  if not high then
    want = false
  elseif not paused and resident >= high then
    want = true
  elseif paused and resident <= (cfg.low_watermark_bytes or high) and resident < high then
    want = false
  end
  if want ~= paused then
    redis.call('HSET', K.bp, 'paused', want and '1' or '0')
    redis.call('HINCRBY', K.bp, want and 'pause_transitions' or 'resume_transitions', 1)
    log_event(want and 'pause' or 'resume', reason, now)
  end
  return want
end

-- Shards silent for longer than stale_after_s are marked stale (at most 8 per call,
-- so the cost stays bounded). Their bytes keep counting: a silent shard's data is
-- presumed still resident until it reports again or deregisters.
local function mark_stale_shards(cfg, now)
  if not cfg.stale_after_s then return end
  local cutoff = now - math.floor(cfg.stale_after_s * 1000)
  local silent = redis.call('ZRANGEBYSCORE', K.shard_seen, '-inf', cutoff, 'LIMIT', 0, 8)
  for _, shard in ipairs(silent) do
    redis.call('ZREM', K.shard_seen, shard)
    redis.call('SADD', K.stale_shards, shard)
    log_event('shard_stale', shard, now)
  end
end

-- Starvation time: a side is starved from the first refused call until the next call
-- that gets work (or finds no work to wait for).
local function starvation_begins(side, now)
  redis.call('HSETNX', K.bp, side .. '_starved_since', now)
end

-- `since`: the caller's fresh read of bp.<side>_starved_since (false when unset), if any.
local function starvation_ends(side, now, since)
  if since == nil then since = redis.call('HGET', K.bp, side .. '_starved_since') end
  if since then
    redis.call('HINCRBY', K.bp, side .. '_starved_ms', now - tonumber(since))
    redis.call('HDEL', K.bp, side .. '_starved_since')
  end
end
