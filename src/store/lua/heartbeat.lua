-- ARGV: prefix, name, instance id or '' (= every live instance),
--       status, p95_ms, queue_depth, load (each '' when not reported)
-- Returns how many live instances were refreshed; 0 means unknown or expired.
local name, id = ARGV[2], ARGV[3]
local now = now_ms()
local ids
if id ~= '' then ids = {id} else ids = live_ids(name, now) end
local optional = {status = ARGV[4], p95_ms = ARGV[5], queue_depth = ARGV[6], load = ARGV[7]}
local refreshed = 0
for _, iid in ipairs(ids) do
  local k = inst_key(name, iid)
  local ttl = redis.call('HGET', k, 'ttl_ms')
  if ttl then
    redis.call('HSET', k, 'last_heartbeat', now)
    for field, value in pairs(optional) do
      if value ~= '' then redis.call('HSET', k, field, value) end
    end
    redis.call('PEXPIRE', k, ttl)
    redis.call('ZADD', svc_key(name), now + tonumber(ttl), iid)
    refreshed = refreshed + 1
  end
end
if refreshed > 0 then reindex(name, now) end
return refreshed
