-- ARGV: prefix, name, instance id or '' (= every live instance), role
-- Returns how many live instances now have the role.
local name, id, role = ARGV[2], ARGV[3], ARGV[4]
local now = now_ms()
local ids
if id ~= '' then ids = {id} else ids = live_ids(name, now) end
local promoted = 0
for _, iid in ipairs(ids) do
  local k = inst_key(name, iid)
  if redis.call('EXISTS', k) == 1 then
    redis.call('HSET', k, 'role', role)
    promoted = promoted + 1
  end
end
return promoted
