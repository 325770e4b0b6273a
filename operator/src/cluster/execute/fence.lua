#!lua flags=no-writes
-- One node's slot states, compared and set atomically (see migrate.rs).
-- ARGV: op, peer id, slot... -> one status per slot ("ok" when done).
local op, peer = ARGV[1], ARGV[2]
local mine
for line in string.gmatch(redis.call('CLUSTER', 'NODES'), '[^\n]+') do
  local flags = string.match(line, '^%S+%s+%S+%s+(%S+)')
  if flags and string.find(',' .. flags .. ',', ',myself,', 1, true) then
    mine = line
    break
  end
end
if not mine then
  return redis.error_reply('no myself line in CLUSTER NODES')
end
local myid = string.match(mine, '^(%S+)')
local ranges, migrating, importing = {}, {}, {}
local field = 0
for tok in string.gmatch(mine, '%S+') do
  field = field + 1
  if field > 8 then
    local s, id = string.match(tok, '^%[(%d+)%->%-(%w+)%]$')
    if s then
      migrating[tonumber(s)] = id
    else
      s, id = string.match(tok, '^%[(%d+)%-<%-(%w+)%]$')
      if s then
        importing[tonumber(s)] = id
      else
        local a, b = string.match(tok, '^(%d+)%-(%d+)$')
        a = a or string.match(tok, '^(%d+)$')
        if a then
          ranges[#ranges + 1] = { tonumber(a), tonumber(b or a) }
        end
      end
    end
  end
end

local function owns(s)
  for _, r in ipairs(ranges) do
    if r[1] <= s and s <= r[2] then
      return true
    end
  end
  return false
end

local function keys(s)
  return redis.call('CLUSTER', 'COUNTKEYSINSLOT', s)
end

local function set(s, state, id)
  local reply
  if id then
    reply = redis.pcall('CLUSTER', 'SETSLOT', s, state, id)
  else
    reply = redis.pcall('CLUSTER', 'SETSLOT', s, state)
  end
  if type(reply) == 'table' and reply.err then
    return 'refused: ' .. reply.err
  end
  return 'ok'
end

local step = {}

-- On the destination: accept the slot's keys from peer (the source), unless
-- it imports the slot from another node (whose migration may be under way).
function step.import(s)
  if owns(s) then
    return 'owner'
  end
  local from = importing[s]
  if from == peer then
    return 'ok'
  end
  if from then
    return 'importing from ' .. from
  end
  return set(s, 'IMPORTING', peer)
end

-- On the destination of a finish: import from peer, whatever it imported.
function step.retarget(s)
  if owns(s) then
    return 'owner'
  end
  if importing[s] == peer then
    return 'ok'
  end
  return set(s, 'IMPORTING', peer)
end

-- On the source: the claim. Only the owner, and only when no migration of
-- the slot to another node is open, may start migrating it to peer.
function step.migrate(s)
  if not owns(s) then
    return 'not the owner'
  end
  local to = migrating[s]
  if to == peer then
    return 'ok'
  end
  if to then
    return 'migrating to ' .. to
  end
  return set(s, 'MIGRATING', peer)
end

-- On the source, read-only: migrating to peer.
function step.towards(s)
  if migrating[s] == peer then
    return 'ok'
  end
  return 'not migrating to it'
end

-- On the source, read-only: still migrating to peer and holding no key.
function step.drained(s)
  if migrating[s] ~= peer then
    return 'not migrating to it'
  end
  if keys(s) > 0 then
    return 'holds keys'
  end
  return 'ok'
end

-- On the destination: take the slot (bumps its config epoch).
function step.take(s)
  if importing[s] then
    return set(s, 'NODE', myid)
  end
  if owns(s) then
    return 'owner'
  end
  return 'not importing'
end

-- On the source: hand the slot to peer, only if migrating to it and empty.
function step.give(s)
  if migrating[s] == peer then
    if keys(s) > 0 then
      return 'holds keys'
    end
    return set(s, 'NODE', peer)
  end
  if owns(s) then
    return 'not migrating to it'
  end
  return 'not the owner'
end

-- On any other primary: learn that peer owns the slot, unless this node
-- owns it or has it open itself.
function step.tell(s)
  if owns(s) then
    return 'owner'
  end
  if importing[s] or migrating[s] then
    return 'open here'
  end
  return set(s, 'NODE', peer)
end

-- On the destination of a claim that lost: forget the import, unless keys
-- arrived meanwhile.
function step.unimport(s)
  if importing[s] ~= peer then
    return 'not importing from it'
  end
  if owns(s) or keys(s) == 0 then
    return set(s, 'STABLE')
  end
  return 'holds keys'
end

-- Roll back a slot seen open towards peer. An importer that holds keys of a
-- slot it does not own takes it instead (nobody else serves those keys).
function step.abort(s)
  if migrating[s] == peer then
    return set(s, 'STABLE')
  end
  if importing[s] == peer then
    if owns(s) or keys(s) == 0 then
      return set(s, 'STABLE')
    end
    return set(s, 'NODE', myid)
  end
  return 'not open towards it'
end

-- On the destination of a finish from peer, which does not migrate the slot
-- to it: keep an import from peer (or none) or one that brought keys; drop
-- an import from another node that brought none ("dropped").
function step.leftover(s)
  local from = importing[s]
  if not from or from == peer or owns(s) or keys(s) > 0 then
    return 'ok'
  end
  set(s, 'STABLE')
  return 'dropped'
end

local run = step[op]
if not run then
  return redis.error_reply('unknown fence op ' .. tostring(op))
end
local out = {}
for i = 3, #ARGV do
  out[#out + 1] = run(tonumber(ARGV[i]))
end
return out
