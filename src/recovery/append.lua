-- Appends a batch of one room's released messages to its recovery stream in one call.
-- KEYS[1]: the room's stream. ARGV[1]: its approximate length cap. ARGV[2]: how long, in
-- milliseconds, the stream lives after its last append (by then everything in it is older than
-- the age limit, so a room that fell silent costs Redis nothing). Then offset, content, name,
-- time quadruples in offset order (fields c, n and t). Every node that follows the room appends
-- every message, so offsets at or below the stream's last entry are skipped (another node
-- appended them first). An XADD still refused as too small (every entry was trimmed by age, but
-- the stream's last id remains) is skipped the same way; any other failure is returned. Returns
-- how many entries were added.
local key = KEYS[1]
local last = -1
local top = redis.call('XREVRANGE', key, '+', '-', 'COUNT', 1)
if #top > 0 then last = tonumber(string.match(top[1][1], '^%d+')) end
local added = 0
for i = 3, #ARGV, 4 do
  if tonumber(ARGV[i]) > last then
    local r = redis.pcall('XADD', key, ARGV[i] .. '-0', 'c', ARGV[i + 1], 'n', ARGV[i + 2], 't', ARGV[i + 3])
    if type(r) == 'table' and r.err then
      if not string.find(r.err, 'equal or smaller', 1, true) then return r end
    else
      added = added + 1
    end
  end
end
if added > 0 then
  redis.call('XTRIM', key, 'MAXLEN', '~', ARGV[1])
  redis.call('PEXPIRE', key, ARGV[2])
end
return added
