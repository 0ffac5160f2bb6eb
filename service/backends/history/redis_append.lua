-- KEYS meta log refs; ARGV size ttl_ms fresh_epoch has_dedupe dedupe piece [marker piece]...
local meta, log, refs = KEYS[1], KEYS[2], KEYS[3]
local size, ttl = tonumber(ARGV[1]), tonumber(ARGV[2])
local now = now_ms()
local epoch, top = open_room(meta, log, refs, ARGV[3])
redis.call('PERSIST', meta)
trim(log, refs, size, now - ttl)
local dedupe = ARGV[4] == '1'
if dedupe then
  local seen = redis.call('HGET', refs, ARGV[5])
  if seen then
    local e = redis.call('XRANGE', log, seen, seen)
    if #e > 0 then return {epoch, tonumber(seen), e[1][2][2], 1} end
  end
end
top = redis.call('HINCRBY', meta, 'top', 1)
local id = string.format('%d', top)
local parts = {}
for i = 6, #ARGV do
  local piece = ARGV[i]
  if i % 2 == 1 then
    if piece == 'e' then piece = epoch else piece = id end
  end
  parts[#parts + 1] = piece
end
local data = table.concat(parts)
if dedupe then
  redis.call('XADD', log, id .. '-0', 'd', data, 't', now, 'k', ARGV[5])
  redis.call('HSET', refs, ARGV[5], id)
else
  redis.call('XADD', log, id .. '-0', 'd', data, 't', now)
end
trim(log, refs, size, now - ttl)
return {epoch, top, data, 0}
