local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end

-- The room's epoch and top; a room without them has lost its history.
local function open_room(meta, log, refs, fresh)
  local epoch = redis.call('HGET', meta, 'epoch')
  if epoch then return epoch, tonumber(redis.call('HGET', meta, 'top')) end
  redis.call('DEL', log, refs)
  redis.call('HSET', meta, 'epoch', fresh, 'top', 0)
  return fresh, 0
end

local function offset_of(id)
  return tonumber(string.match(id, '^%d+'))
end

-- Drop from the head while more than `size` remain or the head is older than
-- `horizon` (as MemoryStore does); forget the dropped dedupe keys.
local function trim(log, refs, size, horizon)
  local left = redis.call('XLEN', log)
  local start, last, keys = '-', nil, {}
  -- Read no more of the head than needed: the excess, or one entry to test
  -- its age; more once entries are found expired.
  local want = math.max(1, left - size)
  while true do
    local batch = redis.call('XRANGE', log, start, '+', 'COUNT', math.min(want, 100))
    local stop, expired = #batch == 0, false
    for _, e in ipairs(batch) do
      local f = e[2]
      local old = tonumber(f[4]) < horizon
      if left <= size and not old then stop = true; break end
      expired = expired or left <= size
      left = left - 1
      last = e[1]
      if f[6] then keys[#keys + 1] = f[6] end
    end
    if stop then break end
    start = '(' .. batch[#batch][1]
    want = expired and 100 or math.max(1, left - size)
  end
  if last then
    redis.call('XTRIM', log, 'MINID', string.format('%d', offset_of(last) + 1))
    for i = 1, #keys, 1000 do
      redis.call('HDEL', refs, unpack(keys, i, math.min(i + 999, #keys)))
    end
  end
end
