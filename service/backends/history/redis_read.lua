-- KEYS meta log refs; ARGV mode(since|last) n size ttl_ms fresh_epoch
-- -> {epoch, top, complete, data...}
local meta, log, refs = KEYS[1], KEYS[2], KEYS[3]
local n, size, ttl = tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
local since = ARGV[1] == 'since'
local epoch, top = open_room(meta, log, refs, ARGV[5])
if top == 0 then
  -- Keep an empty room's epoch while it is read, without keeping it forever.
  redis.call('PEXPIRE', meta, ttl)
  return {epoch, 0, (not since or n == 0) and 1 or 0}
end
trim(log, refs, size, now_ms() - ttl)
local head = redis.call('XRANGE', log, '-', '+', 'COUNT', 1)
local first = top + 1
if #head > 0 then first = offset_of(head[1][1]) end
local rows
local out = {epoch, top, 1}
if since then
  rows = redis.call('XRANGE', log, string.format('%d', n + 1), '+')
  if first > n + 1 then out[3] = 0 end
  for _, e in ipairs(rows) do out[#out + 1] = e[2][2] end
elseif n > 0 then
  rows = redis.call('XREVRANGE', log, '+', '-', 'COUNT', n)
  for i = #rows, 1, -1 do out[#out + 1] = rows[i][2][2] end
end
return out
