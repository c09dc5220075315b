-- ARGV: prefix, name, instance id or '' (= every instance)
-- Returns how many live instances were removed.
local name, id = ARGV[2], ARGV[3]
local now = now_ms()
local sk = svc_key(name)
local ids
if id ~= '' then ids = {id} else ids = redis.call('ZRANGE', sk, 0, -1) end
local removed = 0
for _, iid in ipairs(ids) do
  removed = removed + redis.call('DEL', inst_key(name, iid))
  redis.call('ZREM', sk, iid)
end
reindex(name, now)
return removed
