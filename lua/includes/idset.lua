-- includes/idset.lua: exact sets of ids packed into the values of one hash. The dedup
-- markers kept for every done task and acked sample (tasks_done, acked) live here:
-- about len(id) + 9 bytes per id (the id, its newline, a share of its bucket), where a
-- Redis set member costs about 60 + len(id). The price is CPU: a SHA1 per id looked up
-- or added (and per id a split moves), and Lua strings the size of a bucket; about
-- 50,000 instructions per id added (docs/benchmarks.md).
--
-- Layout (linear hashing, so buckets stay small however large the set grows):
--   field "n"             members
--   field "l", field "s"  level L and split pointer s; the set has 2^L + s buckets
--   field "b<i>"          bucket i: "\n" then "<id>\n" per member (absent = empty)
-- An id with hash h (first 32 bits of its SHA1) lives in bucket h mod 2^L, or in
-- h mod 2^(L+1) when that first answer is below s. Whenever members exceed
-- IDSET_LOAD per bucket, bucket s is split in two (its members move by h mod 2^(L+1))
-- and s advances; when s reaches 2^L, L grows by one and s restarts at 0. An insert
-- splits first, for all its ids, then places them. So a lookup or an insert reads and
-- writes one bucket of about IDSET_LOAD ids per id, and a split moves one bucket: work
-- per call in proportion to its ids, whatever the size of the set.
-- Ids never contain "\n" (ids are printable ASCII without spaces, keys.py), so
-- "\n<id>\n" matches exactly one member. dataflow_redis/idset.py reads the layout.
-- Callers reach a set before their first write: on a run made by 0.1.0, whose markers
-- are Redis sets, the first HMGET fails with WRONGTYPE while nothing is written yet.

-- Small buckets: every string entering Lua (a bucket read, a bucket grown by one id)
-- is hashed byte by byte, so bucket size is paid on every lookup; 8 ids per bucket
-- cost about 5 bytes of bucket overhead per id (callgrind and MEMORY USAGE, see
-- docs/benchmarks.md).
local IDSET_LOAD = 8

local sha1hex, sub, find, format = redis.sha1hex, string.sub, string.find, string.format

-- The set's shape: members, level L, split pointer s (0, 0, 0 for a new set).
local function idset_shape(key)
  local meta = redis.call('HMGET', key, 'n', 'l', 's')
  return tonumber(meta[1] or 0), tonumber(meta[2] or 0), tonumber(meta[3] or 0)
end

-- The bucket field of each id, for a set of this shape.
local function idset_fields(ids, level, split)
  local low = 2 ^ level
  local high = 2 * low
  local fields = {}
  for i = 1, #ids do
    local h = tonumber(sub(sha1hex(ids[i]), 1, 8), 16)
    local bucket = h % low
    if bucket < split then bucket = h % high end
    fields[i] = format('b%d', bucket)
  end
  return fields
end

-- Membership of each of ids[1..#ids]: a table of booleans in the same order.
local function idset_has(key, ids)
  local out, n = {}, #ids
  if n == 0 then return out end
  local members, level, split = idset_shape(key)
  if members == 0 then
    for i = 1, n do out[i] = false end
    return out
  end
  local buckets = get_many('HMGET', key, idset_fields(ids, level, split))
  for i = 1, n do
    local bucket = buckets[i]
    out[i] = bucket and find(bucket, '\n' .. ids[i] .. '\n', 1, true) ~= nil or false
  end
  return out
end

-- Move the members of bucket `split` that hash to split + 2^level into that new bucket.
local function idset_split(key, level, split)
  local low = 2 ^ level
  local from, into = format('b%d', split), format('b%d', split + low)
  local content = redis.call('HGET', key, from)
  if not content then return end  -- an empty bucket: nothing moves
  local stay, move = {''}, {''}
  for id in string.gmatch(content, '[^\n]+') do
    if tonumber(sub(sha1hex(id), 1, 8), 16) % (2 * low) == split then
      stay[#stay + 1] = id
    else
      move[#move + 1] = id
    end
  end
  if #stay > 1 then redis.call('HSET', key, from, table.concat(stay, '\n') .. '\n')
  else redis.call('HDEL', key, from) end
  if #move > 1 then redis.call('HSET', key, into, table.concat(move, '\n') .. '\n') end
end

-- Add ids[1..#ids] (members already present, and repeats within the call, are
-- skipped). Returns how many were added. `shape` (optional): {idset_shape(key)} as
-- the caller read it earlier in this call.
local function idset_add(key, ids, shape)
  local n = #ids
  if n == 0 then return 0 end
  local members, level, split
  if shape then members, level, split = shape[1], shape[2], shape[3]
  else members, level, split = idset_shape(key) end
  -- Make room for every id of the call before placing any: placed by the shape of a
  -- small set, a large batch would crowd its few buckets, and building a bucket id by
  -- id costs the square of its size (10,000 ids into an empty set took 2 s). Splitting
  -- first keeps each bucket near IDSET_LOAD ids; ids already present only leave the
  -- table a little roomier.
  local grown = false
  while members + n > IDSET_LOAD * (2 ^ level + split) do
    idset_split(key, level, split)
    grown = true
    split = split + 1
    if split == 2 ^ level then
      level = level + 1
      split = 0
    end
  end
  local fields = idset_fields(ids, level, split)
  local distinct, content = {}, {}
  for i = 1, n do
    local field = fields[i]
    if not content[field] then
      content[field] = true
      distinct[#distinct + 1] = field
    end
  end
  local current = get_many('HMGET', key, distinct)
  for j = 1, #distinct do content[distinct[j]] = current[j] or '\n' end
  local changed, added = {}, 0
  for i = 1, n do
    local field, entry = fields[i], ids[i] .. '\n'
    local bucket = content[field]
    -- Searching the bucket as it grows in this call also skips a repeat within the call.
    if not find(bucket, '\n' .. entry, 1, true) then
      content[field] = bucket .. entry
      changed[field] = true
      added = added + 1
    end
  end
  if added == 0 then
    if grown then redis.call('HSET', key, 'l', format('%d', level), 's', format('%d', split)) end
    return 0
  end
  local writes = {}
  for j = 1, #distinct do
    local field = distinct[j]
    if changed[field] then
      writes[#writes + 1] = field
      writes[#writes + 1] = content[field]
    end
  end
  members = members + added
  writes[#writes + 1] = 'n'
  writes[#writes + 1] = format('%d', members)
  if grown then
    writes[#writes + 1] = 'l'
    writes[#writes + 1] = format('%d', level)
    writes[#writes + 1] = 's'
    writes[#writes + 1] = format('%d', split)
  end
  call_many('HSET', key, writes)
  return added
end

-- Remove one id; returns 1 if it was a member, else 0.
local function idset_remove(key, id)
  local members, level, split = idset_shape(key)
  if members == 0 then return 0 end
  local field = idset_fields({id}, level, split)[1]
  local bucket = redis.call('HGET', key, field)
  local at = bucket and find(bucket, '\n' .. id .. '\n', 1, true)
  if not at then return 0 end
  bucket = sub(bucket, 1, at) .. sub(bucket, at + #id + 2)
  if bucket == '\n' then redis.call('HDEL', key, field) else redis.call('HSET', key, field, bucket) end
  redis.call('HSET', key, 'n', format('%d', members - 1))
  return 1
end
