-- commit_samples.lua: a rollout worker hands in sample refs; fresh ones join the train
-- queue and the source tasks' leases are released. Also serves offline refs.
--
-- KEYS: config counters tasks task_bytes task_attempts prompt_leases prompt_deadlines
--       worker_inflight tasks_done samples train_queue train_signal acked failed_samples
--       bp reply
-- ARGV: [1] worker_id ('' for offline refs)  [2] offline (1 = no source lease check)
--       [3] count, then per ref i (0-based) at 4 + 4i:
--         sample_id, source_task_id ('' = none), the source lease's token (no
--         other token holds it), record JSON
-- Returns: the sample ids that were fresh and accepted, in call order.
-- Errors:  TOOLARGE (a record over max_record_bytes): nothing is written.
-- Fencing: a ref whose source task is not leased to this worker (expired and
--   re-granted, or already done) is rejected: not returned, nothing enqueued
--   (counted in counters.fenced_commits).
-- Dedup: a sample id seen before (queued, leased, acked or failed) is not enqueued
--   again, but a duplicate from the lease holder still releases the lease, so a
--   re-sent commit never leaks the worker's in-flight slot. Several refs may come
--   from one task: leases are released after every ref is checked.
-- Invariants: a sample id enters train_queue at most once per lifetime; a released task
--   leaves prompt_leases, its worker's in-flight counter and reserved_bytes together
--   (includes/leases.lua) and is recorded in tasks_done.
-- @include util
-- @include backpressure
-- @include leases
-- @include idset

local worker, offline, count = ARGV[1], ARGV[2] == '1', tonumber(ARGV[3])
local cfg = load_config({'max_record_bytes', 'reply_ttl_s'})
local cached = cached_reply()
if cached then return split_words(cached) end
local too_large = check_record_sizes(cfg, 4, 4, count, 0, 3)
if too_large then return too_large end

-- Ref i (1-based) has its sample id at ARGV[4i], source task at ARGV[4i + 1], lease
-- token at ARGV[4i + 2] and record at ARGV[4i + 3]. Reads are batched: one command
-- per key for the whole call.
local task_ids, task_slot = {}, {}
if not offline then
  for i = 1, count do
    local task_id = ARGV[4 * i + 1]
    if task_id ~= '' and not task_slot[task_id] then
      task_ids[#task_ids + 1] = task_id
      task_slot[task_id] = #task_ids
    end
  end
end
local leases = get_many('HMGET', K.prompt_leases, task_ids)

-- Fencing: a ref counts only if this worker holds its source task's lease under the
-- token it presents. Released after every ref is checked (several refs may share a task).
local accepted, release, fenced = {}, {}, 0
for i = 1, count do
  local task_id = ARGV[4 * i + 1]
  local slot = task_slot[task_id]
  if not slot then
    accepted[#accepted + 1] = i
  elseif holds(leases[slot], worker, ARGV[4 * i + 2]) then
    accepted[#accepted + 1] = i
    release[slot] = true
  else
    fenced = fenced + 1
  end
end

-- Dedup: a sample id already queued, leased or kept (samples), acked, or failed is
-- not enqueued again; nor is a second copy within this call.
local candidates = {}
for j = 1, #accepted do candidates[j] = ARGV[4 * accepted[j]] end
local known = get_many('HMGET', K.samples, candidates)
local unseen, unseen_at, seen = {}, {}, {}
for j = 1, #candidates do
  local sample_id = candidates[j]
  if not known[j] and not seen[sample_id] then
    seen[sample_id] = true
    unseen[#unseen + 1] = sample_id
    unseen_at[#unseen] = accepted[j]
  end
end
local was_failed = hmget_sparse(K.failed_samples, unseen)
local was_acked = idset_has(K.acked, unseen)
local fresh, records = {}, {}
for j = 1, #unseen do
  if not was_failed[j] and not was_acked[j] then
    fresh[#fresh + 1] = unseen[j]
    records[#records + 1] = unseen[j]
    records[#records + 1] = ARGV[4 * unseen_at[j] + 3]
  end
end

-- The source leases to release: the holder is this worker (holds() checked it).
local done_ids, reserved = {}, 0
for slot = 1, #task_ids do
  if release[slot] then
    done_ids[#done_ids + 1] = task_ids[slot]
    reserved = reserved + tonumber(string.match(leases[slot], '^%d+|(%d+)|'))
  end
end
local done = #done_ids
-- The first write goes to tasks_done: on a run whose markers are still Redis sets
-- (0.1.0) it fails with WRONGTYPE before anything is written, even when no acked
-- lookup ran above (see migrate_dedup_sets.lua).
idset_add(K.tasks_done, done_ids)
call_many('HSET', K.samples, records)
call_many('RPUSH', K.train_queue, fresh)
if done > 0 then
  call_many('HDEL', K.prompt_leases, done_ids)
  call_many('ZREM', K.prompt_deadlines, done_ids)
  if redis.call('HINCRBY', K.worker_inflight, worker, -done) <= 0 then
    redis.call('HDEL', K.worker_inflight, worker)
  end
  if reserved > 0 then redis.call('HINCRBY', K.bp, 'reserved_bytes', int_text(-reserved)) end
  call_many('HDEL', K.tasks, done_ids)
  hdel_sparse(K.task_bytes, done_ids)
  hdel_sparse(K.task_attempts, done_ids)
  redis.call('HINCRBY', K.counters, 'prompts_done', done)
end
if fenced > 0 then redis.call('HINCRBY', K.counters, 'fenced_commits', fenced) end
if #fresh > 0 then
  redis.call('HINCRBY', K.counters, 'samples_committed', #fresh)
  wake_trainers(#fresh)
end
-- A call that released leases or fenced refs but accepted nothing changed state all
-- the same: its empty reply is cached too (as ' '), or a retry would find no token
-- held any more and count every ref as fenced.
remember_reply(cfg, #fresh > 0 and table.concat(fresh, ' ') or ((done > 0 or fenced > 0) and ' ' or ''))
return fresh
