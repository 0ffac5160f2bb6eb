-- KEYS workers users names; ARGV base room limit batch -> {online, id, name, ...}
local room, limit, batch = ARGV[2], tonumber(ARGV[3]), tonumber(ARGV[4])
reap(room)
local out = {redis.call('ZCARD', KEYS[2])}
if limit > 0 and out[1] > 0 then
  local ids = redis.call('ZRANGE', KEYS[2], 0, limit - 1)
  for i = 1, #ids, batch do
    local names = redis.call('HMGET', KEYS[3], unpack(ids, i, math.min(i + batch - 1, #ids)))
    for j, name in ipairs(names) do
      out[#out + 1] = ids[i + j - 1]
      out[#out + 1] = name or ''
    end
  end
end
return out
