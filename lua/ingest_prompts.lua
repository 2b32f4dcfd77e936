-- ingest_prompts.lua: add prompt tasks to the tail of the pending queue.
--
-- KEYS: config counters tasks task_bytes pending tasks_done dlq reply
-- ARGV: [1] count, then per task i (0-based) at 2 + 3i:
--         task_id, estimated_bytes ('' = none), record JSON (compact, see records.py)
-- Returns: the ids that were fresh, in call order. A task id that is live (pending,
--          leased or dead-lettered) or already done is skipped, never duplicated.
-- Errors:  TOOLARGE (a record over max_record_bytes): nothing is written.
-- Invariants: a fresh id is appended to pending exactly once; counters.prompts
--          counts fresh ids only. A retry with the same request id returns the
--          first reply.
-- @include util

local cfg = load_config()
local cached = cached_reply()
if cached then return split_words(cached) end

local count = tonumber(ARGV[1])
local too_large = check_record_sizes(cfg, 2, 3, count, 0, 2)
if too_large then return too_large end

local fresh = {}
for i = 0, count - 1 do
  local task_id, bytes, record = ARGV[2 + 3 * i], ARGV[3 + 3 * i], ARGV[4 + 3 * i]
  if redis.call('SISMEMBER', K.tasks_done, task_id) == 0
      and redis.call('HSETNX', K.tasks, task_id, record) == 1 then
    if bytes ~= '' then redis.call('HSET', K.task_bytes, task_id, bytes) end
    redis.call('RPUSH', K.pending, task_id)
    fresh[#fresh + 1] = task_id
  end
end
if #fresh > 0 then redis.call('HINCRBY', K.counters, 'prompts', #fresh) end
remember_reply(cfg, table.concat(fresh, ' '))
return fresh
