-- lease_samples.lua: grant up to max_refs queued sample refs to one trainer.
--
-- KEYS: config counters samples train_queue train_leases train_deadlines trainers
--       train_signal bp reply
-- ARGV: [1] trainer_id  [2] max_refs (>= 1)  [3] lease_ms
--       [4] final (1 = an empty result counts as trainer starvation; a blocking
--           lease sends 0 on the attempts before its timeout ends)
--       [5] reclaim_limit (expired train leases reclaimed first)
-- Returns: flat array, 3 entries per granted ref: sample_id, lease token, record JSON.
-- Rules: the grant is capped at max_train_lease when set. An empty grant clears the
--   wake-up tokens (nothing to wake for), so a trainer that then blocks on
--   train_signal sleeps until the next commit: no lost wake-ups, no busy polling.
-- @include util
-- @include backpressure
-- @include leases

local trainer, max_refs, lease_ms = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3])
local cfg = load_config()
local now = now_ms()

local cached = cached_reply()
if cached then
  local out = {}
  local words = split_words(cached)
  for i = 1, #words, 2 do
    if holds(redis.call('HGET', K.train_leases, words[i]), trainer, words[i + 1]) then
      out[#out + 1] = words[i]
      out[#out + 1] = words[i + 1]
      out[#out + 1] = redis.call('HGET', K.samples, words[i])
    end
  end
  return out
end

reclaim_samples(now, tonumber(ARGV[5]))
redis.call('ZADD', K.trainers, now, trainer)
if cfg.backpressure and cfg.max_train_lease then max_refs = math.min(max_refs, cfg.max_train_lease) end

local ids = redis.call('LPOP', K.train_queue, max_refs)
local out, tokens = {}, {}
if ids then
  for _, sample_id in ipairs(ids) do
    local token = redis.call('HINCRBY', K.counters, 'fence', 1)
    redis.call('HSET', K.train_leases, sample_id, token .. '|0|' .. now .. '|' .. trainer)
    redis.call('ZADD', K.train_deadlines, now + lease_ms, sample_id)
    tokens[#tokens + 1] = sample_id
    tokens[#tokens + 1] = token
    out[#out + 1] = sample_id
    out[#out + 1] = token
    out[#out + 1] = redis.call('HGET', K.samples, sample_id)
  end
  starvation_ends('trainer', now)
else
  redis.call('DEL', K.train_signal)
  starvation_begins('trainer', now)
  if ARGV[4] == '1' then redis.call('HINCRBY', K.bp, 'trainer_starved', 1) end
end
remember_reply(cfg, table.concat(tokens, ' '))
return out
