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
--   train_signal sleeps until the next commit: no lost wake-ups, no busy polling. A
--   full grant (the queue may hold more) leaves one token when none is left: a commit
--   wakes at most 64 trainers, and each one that leases a full batch wakes the next,
--   so a burst reaches every waiting trainer.
-- Invariants: a sample id is in at most one of train_queue or train_leases; each grant
--   gets a fresh fencing token; wake-up tokens exist only while the queue may hold work.
-- @include util
-- @include backpressure
-- @include leases

local trainer, max_refs, lease_ms = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3])
local cfg = load_config({'reply_ttl_s', 'backpressure', 'max_train_lease'})
local now, now_text = server_time()

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

reclaim_samples(now, ARGV[5], now_text)
if cfg.backpressure and cfg.max_train_lease then max_refs = math.min(max_refs, cfg.max_train_lease) end

-- LPOP is the first write (even on an empty queue): not one that adds data, so Redis
-- lets the script run on at maxmemory and trainers keep draining the queue.
local ids = redis.call('LPOP', K.train_queue, int_text(max_refs))
redis.call('ZADD', K.trainers, now_text, trainer)
local out, tokens = {}, {}
if ids then
  local n = #ids
  local first
  first, tokens = grant_leases(K.train_leases, K.train_deadlines, ids, n, nil, trainer,
    now, now_text, lease_ms)
  local records = get_many('HMGET', K.samples, ids)
  for i = 1, n do
    out[3 * i - 2] = ids[i]
    out[3 * i - 1] = first + i
    out[3 * i] = records[i]
  end
  starvation_ends('trainer', now)
  if n == max_refs and redis.call('LLEN', K.train_signal) == 0 then
    redis.call('LPUSH', K.train_signal, '1')
  end
else
  redis.call('DEL', K.train_signal)
  starvation_begins('trainer', now)
  if ARGV[4] == '1' then redis.call('HINCRBY', K.bp, 'trainer_starved', 1) end
end
remember_reply(cfg, table.concat(tokens, ' '))
return out
