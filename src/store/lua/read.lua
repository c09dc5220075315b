-- ARGV: prefix, mode, name
--   mode 'names':    live service names
--   mode 'service':  live instances of <name>
--   mode 'all':      live instances of every service
-- An instance comes back as its hash's field/value list followed by 'pttl', <ms left>.
local mode, name = ARGV[2], ARGV[3]
local now = now_ms()
if mode == 'names' then
  return redis.call('ZRANGEBYSCORE', NAMES, '(' .. now, '+inf')
end
local out = {}
local function collect(svc)
  for _, iid in ipairs(live_ids(svc, now)) do
    local k = inst_key(svc, iid)
    local h = redis.call('HGETALL', k)
    if #h > 0 then
      h[#h + 1] = 'pttl'
      h[#h + 1] = tostring(redis.call('PTTL', k))
      out[#out + 1] = h
    end
  end
end
if mode == 'service' then
  collect(name)
else
  for _, svc in ipairs(redis.call('ZRANGEBYSCORE', NAMES, '(' .. now, '+inf')) do
    collect(svc)
  end
end
return out
