-- KEYS leases; ARGV base: the workers whose lease is alive (the others are pruned).
local live = 0
for _, w in ipairs(redis.call('SMEMBERS', KEYS[1])) do
  if redis.call('EXISTS', ARGV[1] .. 'lease:' .. w) == 1 then
    live = live + 1
  else
    redis.call('SREM', KEYS[1], w)
  end
end
return live
