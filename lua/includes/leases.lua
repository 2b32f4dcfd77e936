-- includes/leases.lua: releasing, retrying and reclaiming leases. Needs util.lua and,
-- for prompts, backpressure.lua (dead-lettering logs an event).
--
-- Invariant kept by every caller: a live task id is in exactly one of pending,
-- prompt_leases or dlq; a live sample id in exactly one of train_queue or
-- train_leases; worker_inflight[w] equals the number of prompt_leases held by w;
-- bp.reserved_bytes equals the sum of the bytes of all prompt leases.

local WAKE_TOKENS_MAX = 256

-- Grants of at least this many leases switch the lease hash and deadline set out of the
-- listpack encoding (see grant_leases).
local ENCODING_SWITCH_BATCH = 16

-- Record leases on ids[1..n] for `holder`: consecutive fresh fencing tokens from
-- counters.fence, "token|bytes|granted_ms|holder" in `leases` (bytes[i], or 0 when
-- `bytes` is nil) and the deadline now + lease_ms in `deadlines`. Returns the first
-- token minus one, and the flat {id, token, ...} list the reply cache keeps.
local function grant_leases(leases, deadlines, ids, n, bytes, holder, now, now_text, lease_ms)
  local first = redis.call('HINCRBY', K.counters, 'fence', int_text(n)) - n
  local deadline = int_text(now + lease_ms)
  local lease_pairs, deadline_pairs, tokens = {}, {}, {}
  for i = 1, n do
    local id, token_text = ids[i], int_text(first + i)
    lease_pairs[2 * i - 1] = id
    lease_pairs[2 * i] = token_text .. '|' .. (bytes and int_text(bytes[i]) or '0') .. '|' ..
      now_text .. '|' .. holder
    deadline_pairs[2 * i - 1] = deadline
    deadline_pairs[2 * i] = id
    tokens[2 * i - 1] = id
    tokens[2 * i] = token_text
  end
  local switch = n >= ENCODING_SWITCH_BATCH and (' ' .. string.rep('~', 128))
  if switch then
    -- Redis keeps a hash or sorted set of up to 128 short entries as a listpack, where
    -- every insert and every later delete scans the whole listpack: granting 64 leases
    -- into an empty lease hash cost about 40,000 instructions a lease (callgrind). A
    -- placeholder of 129 bytes (over hash-max-listpack-value / zset-max-listpack-value,
    -- 64 by default) makes Redis switch the key to a hash table / skiplist before the
    -- inserts; it goes again in this call and the key keeps its new encoding. The
    -- placeholder and its field ' ' hold a space, so they are never an id (keys.py).
    table.insert(lease_pairs, 1, switch)
    table.insert(lease_pairs, 1, ' ')
    table.insert(deadline_pairs, 1, switch)
    table.insert(deadline_pairs, 1, '0')
  end
  call_many('HSET', leases, lease_pairs)
  call_many('ZADD', deadlines, deadline_pairs)
  if switch then
    redis.call('HDEL', leases, ' ')
    redis.call('ZREM', deadlines, switch)
  end
  return first, tokens
end

-- Drop a prompt lease: frees the holder's in-flight slot and its byte reservation.
local function release_prompt_lease(task_id, value)
  local _, bytes, _, holder = parse_lease(value)
  redis.call('HDEL', K.prompt_leases, task_id)
  redis.call('ZREM', K.prompt_deadlines, task_id)
  if redis.call('HINCRBY', K.worker_inflight, holder, -1) <= 0 then
    redis.call('HDEL', K.worker_inflight, holder)
  end
  if bytes > 0 then redis.call('HINCRBY', K.bp, 'reserved_bytes', int_text(-bytes)) end
end

-- Dead-letter events one call writes at most, then one that says more followed: a
-- terminal fail of thousands of tasks would otherwise push every pause, resume and
-- config event out of the capped stream. The dead-letter hash keeps every task.
local DEAD_LETTER_EVENTS_PER_CALL = 16
local dead_letter_events = 0

-- Terminal: the task goes to the dead-letter hash with its reason (its record stays,
-- so an operator can requeue it).
local function bury_task(task_id, reason, attempt, now, exhausted)
  redis.call('HSET', K.dlq, task_id, cjson.encode({
    reason = reason, attempt = attempt, at_ms = now, attempts_exhausted = exhausted,
  }))
  dead_letter_events = dead_letter_events + 1
  if dead_letter_events <= DEAD_LETTER_EVENTS_PER_CALL then
    log_event('dead_letter', task_id .. ': ' .. reason, now)
  elseif dead_letter_events == DEAD_LETTER_EVENTS_PER_CALL + 1 then
    log_event('dead_letter', 'more tasks in the same call: see the dead-letter list', now)
  end
end

-- A retryable failure or an expiry: attempt + 1, back to the tail of pending, unless
-- that was the last attempt max_prompt_attempts allows.
local function retry_task(cfg, task_id, reason, now)
  local attempt = redis.call('HINCRBY', K.task_attempts, task_id, 1)
  local limit = cfg.max_prompt_attempts
  if limit and attempt >= limit then
    bury_task(task_id, 'attempts exhausted (' .. attempt .. ' of max_prompt_attempts=' .. limit ..
      '); last failure: ' .. reason, attempt - 1, now, true)
  else
    redis.call('RPUSH', K.pending, task_id)
  end
end

-- Expired prompt leases go back to pending (attempt + 1). At most `limit` per call.
-- `now_text`, when given, is `now` as text (see server_time).
local function reclaim_prompts(cfg, now, limit, now_text)
  local expired = redis.call('ZRANGEBYSCORE', K.prompt_deadlines, '-inf', now_text or now, 'LIMIT', '0', limit)
  for _, task_id in ipairs(expired) do
    local value = redis.call('HGET', K.prompt_leases, task_id)
    if value then
      local _, _, _, holder = parse_lease(value)
      release_prompt_lease(task_id, value)
      retry_task(cfg, task_id, 'lease of ' .. holder .. ' expired', now)
    else
      redis.call('ZREM', K.prompt_deadlines, task_id)
    end
  end
  return #expired
end

-- Let up to `count` blocked trainers wake (BLPOP on train_signal). Capped, so tokens
-- cannot pile up while nobody waits; a lease that finds the queue empty clears them.
local function wake_trainers(count)
  if count <= 0 then return end
  local tokens = {}
  for i = 1, math.min(count, 64) do tokens[i] = '1' end
  if redis.call('LPUSH', K.train_signal, unpack(tokens)) > WAKE_TOKENS_MAX then
    redis.call('LTRIM', K.train_signal, 0, WAKE_TOKENS_MAX - 1)
  end
end

-- Expired train leases go back to the head of the train queue. At most `limit`.
local function reclaim_samples(now, limit, now_text)
  local expired = redis.call('ZRANGEBYSCORE', K.train_deadlines, '-inf', now_text or now, 'LIMIT', '0', limit)
  for _, sample_id in ipairs(expired) do
    redis.call('ZREM', K.train_deadlines, sample_id)
    if redis.call('HDEL', K.train_leases, sample_id) == 1 then
      redis.call('LPUSH', K.train_queue, sample_id)
    end
  end
  wake_trainers(#expired)
  return #expired
end
