-- includes/util.lua: server time, error replies, run config and the reply cache.
-- Expects the table K (key name -> key) that the loader builds from the script's
-- KEYS header; a helper only touches keys its caller declared.

-- Milliseconds since the epoch, from the Redis server's clock (never a client's).
local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end

-- The same instant as a number and as its decimal text. Hot scripts write the text:
-- turning a Lua number into text costs a printf each time (a large share of a small
-- script's work), the text comes straight from TIME.
local function server_time()
  local t = redis.call('TIME')
  local text = t[1] .. string.sub('00000' .. t[2], -6, -4)
  return tonumber(text), text
end

-- Decimal text of an integral number (cheaper than the %.14g of `..`, and exact
-- beyond 1e14). Pass computed integers to redis.call through it: a Lua number from
-- 1e17 up reaches Redis as '1e+17', which HINCRBY refuses.
local function int_text(n)
  return string.format('%d', n)
end

-- An error reply "<CODE> <message>"; the Python side maps CODE to an exception class.
-- Scripts return these before their first write, so a refused call changes nothing.
local function refuse(code, message)
  return redis.error_reply(code .. ' ' .. message)
end

local CONFIG_FIELDS = {
  'max_prompt_attempts', 'max_record_bytes', 'reply_ttl_s',
  'high_watermark_bytes', 'low_watermark_bytes', 'max_inflight_prompts_per_worker',
  'max_train_lease', 'default_task_bytes', 'stale_after_s', 'backpressure', 'version',
}

-- The run's settings as numbers; an unset field is nil. Defaults live here and in
-- dataflow_redis/config.py (kept equal by a test).
-- `fields` (default: all) names the settings the caller reads: each field read costs
-- a few thousand instructions, so hot scripts ask only for theirs.
local function load_config(fields)
  fields = fields or CONFIG_FIELDS
  local values = redis.call('HMGET', K.config, unpack(fields))
  local cfg = {}
  for i = 1, #fields do
    if values[i] then cfg[fields[i]] = tonumber(values[i]) end
  end
  cfg.max_record_bytes = cfg.max_record_bytes or 1048576
  cfg.reply_ttl_ms = math.floor((cfg.reply_ttl_s or 30) * 1000)
  cfg.backpressure = cfg.backpressure == 1
  return cfg
end

-- Reply cache: a retried call (same request id, e.g. after a lost reply) finds the
-- reply of the first attempt here instead of applying twice.
local function cached_reply()
  return redis.call('GET', K.reply)
end

-- An empty reply is not cached: repeating a call that changed nothing is harmless,
-- and empty leases are the common case under backpressure.
local function remember_reply(cfg, text)
  if text ~= '' then redis.call('SET', K.reply, text, 'PX', int_text(cfg.reply_ttl_ms)) end
end

local function split_words(text)
  local out = {}
  for word in string.gmatch(text, '%S+') do out[#out + 1] = word end
  return out
end

-- A lease value is "token|bytes|granted_ms|holder"; the holder id comes last so that
-- any printable id parses.
local function parse_lease(value)
  local token, bytes, granted, holder = string.match(value, '^(%d+)|(%d+)|(%d+)|(.*)$')
  return token, tonumber(bytes), tonumber(granted), holder
end

-- Fencing: a caller holds a lease only if it is the recorded holder and presents the
-- current grant's token. No token (a client that never got this grant: another
-- process under the same holder id, or one that dropped the token when a heartbeat
-- reported the lease lost) holds nothing.
local function holds(value, holder, token)
  if not value then return false end
  local t, h = string.match(value, '^(%d+)|%d+|%d+|(.*)$')
  return h == holder and token == t
end

-- Batched commands: one call per command for a whole batch instead of one per item
-- (a call costs more than an item). Lua's unpack stops at a few thousand values, so
-- long lists go in slices; MULTI_SLICE is even, so field/value and score/member pairs
-- never straddle two slices.
local MULTI_SLICE = 4000

-- Run `command key <list...>` for a list of arguments (HSET pairs, RPUSH values, ...).
local function call_many(command, key, list)
  local n = #list
  if n == 0 then return end
  for first = 1, n, MULTI_SLICE do
    redis.call(command, key, unpack(list, first, math.min(n, first + MULTI_SLICE - 1)))
  end
end

-- The reply of `command key <list...>` (HMGET: one reply item per list
-- item), for lists of any length. Missing values come back as false, never nil.
local function get_many(command, key, list)
  local n = #list
  if n == 0 then return {} end
  if n <= MULTI_SLICE then return redis.call(command, key, unpack(list)) end
  local out = {}
  for first = 1, n, MULTI_SLICE do
    local part = redis.call(command, key, unpack(list, first, math.min(n, first + MULTI_SLICE - 1)))
    for i = 1, #part do out[#out + 1] = part[i] end
  end
  return out
end

-- HMGET of a list on a hash that is usually empty (task_bytes, task_attempts,
-- failed_samples): for a batch, one HLEN saves reading every item. Returns {} (every
-- item missing) when the hash is empty.
local function hmget_sparse(key, list)
  if #list > 2 and redis.call('HLEN', key) == 0 then return {} end
  return get_many('HMGET', key, list)
end

-- HDEL of a list from such a hash, skipped when the hash is empty.
local function hdel_sparse(key, list)
  if #list > 2 and redis.call('HLEN', key) == 0 then return end
  call_many('HDEL', key, list)
end

-- Validate record sizes before any write (all-or-nothing). Item i (0-based) of a call
-- keeps its id at ARGV[base + i*stride + id_at] and its JSON at ARGV[base + i*stride + json_at].
local function check_record_sizes(cfg, base, stride, count, id_at, json_at)
  for i = 0, count - 1 do
    local record = ARGV[base + i * stride + json_at]
    if #record > cfg.max_record_bytes then
      return refuse('TOOLARGE', 'record ' .. ARGV[base + i * stride + id_at] .. ' is ' .. #record ..
        ' bytes of JSON, over max_record_bytes=' .. cfg.max_record_bytes ..
        '; keep large data in the feature store or raise max_record_bytes')
    end
  end
  return nil
end
