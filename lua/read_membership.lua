-- read_membership.lua: which of the given ids a packed id set holds (tasks_done for
-- cp.is_done, acked for cp.is_acked), read in one atomic step. Read-only (writes nothing).
--
-- KEYS: tasks_done acked
-- ARGV: [1] set ('tasks_done' or 'acked')  [2..] ids (task ids or sample ids)
-- Returns: one integer per id, in ARGV order: 1 = a member, 0 = not.
-- Cost: O(n) (one bucket of about 8 ids read per id; includes/idset.lua).
-- Invariants: read-only. The set's shape and its buckets come from one moment: read in
--   two steps, a commit or ack that splits a bucket in between moves members out of
--   the bucket the shape chose, and they would read as absent.
-- @include util
-- @include idset

local ids = {}
for i = 2, #ARGV do ids[i - 1] = ARGV[i] end
local has = idset_has(ARGV[1] == 'acked' and K.acked or K.tasks_done, ids)
local out = {}
for i = 1, #ids do out[i] = has[i] and 1 or 0 end
return out
