-- ingest_prompts.lua: add prompt tasks to the tail of the pending queue.
--
-- KEYS: config counters tasks task_bytes pending tasks_done dlq reply
-- ARGV: [1] count, then per task i (0-based) at 2 + 4i:
--         task_id, estimated_bytes ('' = none), generated ('1' = an id the client
--         generated: 96 random bits, never done before, so tasks_done is not read),
--         record JSON (compact, see records.py)
-- Returns: the ids that were fresh, in call order. A task id that is live (pending,
--          leased or dead-lettered) or already done is skipped, never duplicated.
-- Errors:  TOOLARGE (a record over max_record_bytes): nothing is written.
-- Invariants: a fresh id is appended to pending exactly once; counters.prompts
--          counts fresh ids only. A retry with the same request id returns the
--          first reply.
-- @include util
-- @include idset

local cfg = load_config({'max_record_bytes', 'reply_ttl_s'})
local cached = cached_reply()
if cached then return split_words(cached) end

local count = tonumber(ARGV[1])
local too_large = check_record_sizes(cfg, 2, 4, count, 0, 3)
if too_large then return too_large end

-- Task i (1-based) has its id at ARGV[4i - 2], its bytes at ARGV[4i - 1], the
-- generated flag at ARGV[4i] and its record at ARGV[4i + 1].
local ids, chosen = {}, {}
for i = 1, count do
  ids[i] = ARGV[4 * i - 2]
  if ARGV[4 * i] ~= '1' then chosen[#chosen + 1] = ids[i] end
end
local live = get_many('HMGET', K.tasks, ids)
local done = {}
local done_flags = idset_has(K.tasks_done, chosen)
for j = 1, #chosen do
  if done_flags[j] then done[chosen[j]] = true end
end

local fresh, seen, records, sizes = {}, {}, {}, {}
for i = 1, count do
  local task_id = ids[i]
  if not live[i] and not done[task_id] and not seen[task_id] then
    seen[task_id] = true  -- an id twice in one call: the first copy wins
    fresh[#fresh + 1] = task_id
    records[#records + 1] = task_id
    records[#records + 1] = ARGV[4 * i + 1]
    local nbytes = ARGV[4 * i - 1]
    if nbytes ~= '' then
      sizes[#sizes + 1] = task_id
      sizes[#sizes + 1] = nbytes
    end
  end
end
if #fresh > 0 then
  call_many('HSET', K.tasks, records)
  call_many('HSET', K.task_bytes, sizes)
  call_many('RPUSH', K.pending, fresh)
  redis.call('HINCRBY', K.counters, 'prompts', #fresh)
end
remember_reply(cfg, table.concat(fresh, ' '))
return fresh
