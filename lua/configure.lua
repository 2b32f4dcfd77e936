-- configure.lua: change run settings and backpressure levers while the run is live.
-- Every process reads the config inside its next script call, so a change takes
-- effect on the next call of every client.
--
-- KEYS: config bp events shard_seen stale_shards reply
-- ARGV: [1] reason (free text for the event log), then pairs at 2 + 2i:
--         field, value ('' = unset the field)
-- Returns: the new config version (an integer that grows by one per change); a retry
--   after a lost reply returns the first call's version from the reply cache and
--   changes nothing.
-- Errors: BADARG for an unknown field or a non-numeric value, CONFIG when the merged
--   config breaks an invariant (low_watermark_bytes > high_watermark_bytes).
--   Per-field ranges are checked by dataflow_redis/config.py; the cross-field check
--   is here so that two concurrent partial updates cannot combine into a bad config.
-- Effect: sets `backpressure` = 1 when any lever is set (else removes it),
--   re-evaluates the latch under the new watermarks, logs a 'config' event.
-- @include util
-- @include backpressure

local KNOWN = {}
for _, name in ipairs(CONFIG_FIELDS) do KNOWN[name] = true end
KNOWN.backpressure, KNOWN.version = nil, nil
local LEVERS = {'high_watermark_bytes', 'low_watermark_bytes', 'max_inflight_prompts_per_worker',
  'max_train_lease', 'default_task_bytes'}

local current = load_config()
local cached = cached_reply()
if cached then return tonumber(cached) end
local merged = {}
for _, name in ipairs(CONFIG_FIELDS) do merged[name] = current[name] end
local changes = {}
for i = 2, #ARGV, 2 do
  local field, value = ARGV[i], ARGV[i + 1]
  if not KNOWN[field] then return refuse('BADARG', 'unknown config field ' .. field) end
  if value ~= '' and not tonumber(value) then
    return refuse('BADARG', 'config field ' .. field .. ' needs a number, got ' .. value)
  end
  merged[field] = tonumber(value)
  changes[#changes + 1] = field .. '=' .. (value == '' and 'unset' or value)
end
local high, low = merged.high_watermark_bytes, merged.low_watermark_bytes
if high and low and low > high then
  return refuse('CONFIG', 'low_watermark_bytes ' .. int_text(low) .. ' > high_watermark_bytes ' .. int_text(high) ..
    '; the low watermark must not exceed the high one')
end
if low and not high then
  return refuse('CONFIG', 'low_watermark_bytes is set without high_watermark_bytes; set both')
end

for i = 2, #ARGV, 2 do
  if ARGV[i + 1] == '' then redis.call('HDEL', K.config, ARGV[i])
  else redis.call('HSET', K.config, ARGV[i], ARGV[i + 1]) end
end
local any_lever = false
for _, name in ipairs(LEVERS) do if merged[name] then any_lever = true end end
if any_lever then redis.call('HSET', K.config, 'backpressure', 1)
else redis.call('HDEL', K.config, 'backpressure') end
local version = redis.call('HINCRBY', K.config, 'version', 1)

local now = now_ms()
log_event('config', ARGV[1] .. ': ' .. table.concat(changes, ' '), now)
evaluate_latch(load_config(), now, 'config version ' .. version)
remember_reply(current, int_text(version))
return version
