"""The Lua scripts of the Redis backend, and the pure code that packs their arguments.

Layout (see ``_codec``): a user's document is a hash whose fields are encoded
paths and whose values are JSON text written by Python; the field ``#v`` holds
the version. Lua compares and copies these strings but never decodes a value,
so cjson cannot round a number, turn ``[]`` into ``{}`` or escape a ``/``.

Every script checks everything (key types, field shapes, the version, the
operation id, the size limit) before its first write, so a script that refuses
a write leaves the stored data exactly as it was.
"""

from __future__ import annotations

from typing import Final

from chatstate.state._backend import Delete, Edits, Replace, Reset, Write
from chatstate.state._codec import encode_path, encode_value, flatten
from chatstate.state._rules import SET

__all__ = ["APPLY_SCRIPT", "LOAD_SCRIPT", "MAX_REMEMBERED_OPS", "write_args"]

MAX_REMEMBERED_OPS: Final = 128

# Shared by both scripts: read and check the document hash.
_READ_DOCUMENT = r"""
local function read_document(doc)
  local kind = redis.call('TYPE', doc)['ok']
  if kind ~= 'hash' and kind ~= 'none' then
    return nil, {'corrupt', doc, 'the key holds a ' .. kind .. ', not a chatstate hash'}
  end
  local flat = redis.call('HGETALL', doc)
  local fields, version = {}, 0
  for i = 1, #flat, 2 do
    local f, v = flat[i], flat[i + 1]
    if f == '#v' then
      version = tonumber(v)
      if version == nil then
        return nil, {'corrupt', doc, 'the version field is not a number'}
      end
    elseif string.byte(f, 1) == 34 and string.byte(f, -1) == 34 and #f >= 2 then
      fields[f] = v
    else
      return nil, {'corrupt', doc, 'the hash has a field that is not a chatstate path'}
    end
  end
  if #flat > 0 and version == 0 then
    return nil, {'corrupt', doc, 'the hash has no version field'}
  end
  return {fields, version}
end

local function reply(status, echo, version, applied, fields)
  local out = {status, echo, version, applied}
  for f, v in pairs(fields) do
    out[#out + 1] = f
    out[#out + 1] = v
  end
  return out
end
"""

LOAD_SCRIPT: Final = (
    _READ_DOCUMENT
    + r"""
-- KEYS[1] document; ARGV[1] an echo the caller checks against its request
local got, err = read_document(KEYS[1])
if got == nil then return err end
return reply('ok', ARGV[1], got[2], 0, got[1])
"""
)

APPLY_SCRIPT: Final = (
    _READ_DOCUMENT
    + r"""
-- KEYS[1] document hash, KEYS[2] remembered operation ids (zset: id -> version it made)
-- ARGV[1] op id (echoed), ARGV[2] dedupe ms, ARGV[3] ttl ms or '', ARGV[4] max bytes,
-- ARGV[5] mode: 'e' edits, 'r' reset, 'x' replace, 'D' delete; ARGV[6..] its arguments
local doc, opskey, op_id = KEYS[1], KEYS[2], ARGV[1]
local got, err = read_document(doc)
if got == nil then return err end
local fields, version = got[1], got[2]

local okind = redis.call('TYPE', opskey)['ok']
if okind ~= 'zset' and okind ~= 'none' then
  return {'corrupt', opskey, 'the key holds a ' .. okind .. ', not a sorted set'}
end
local seen = redis.call('ZSCORE', opskey, op_id)
if seen then
  return reply('duplicate', op_id, version, tonumber(seen), fields)
end

local mode = ARGV[5]
local new = {}
if mode == 'e' then
  for f, v in pairs(fields) do new[f] = v end
  local function drop(p)
    local old = new[p]
    if old == '{}' then
      local n = #p
      for f in pairs(new) do
        if string.sub(f, 1, n) == p then new[f] = nil end
      end
    elseif old ~= nil then
      new[p] = nil
    end
  end
  local i = 6
  while i <= #ARGV do
    local a = ARGV[i]
    local kind, p = string.sub(a, 1, 1), string.sub(a, 2)
    if kind == 's' then
      drop(p)
      new[p] = ARGV[i + 1]
      i = i + 2
    elseif kind == 'd' then
      drop(p)
      i = i + 1
    else
      -- make an object: a leaf in the way has no children, so overwrite it
      if new[p] ~= '{}' then new[p] = '{}' end
      i = i + 1
    end
  end
elseif mode == 'r' then
  -- groups: path, number of ancestors, the ancestors' paths
  local i = 6
  while i <= #ARGV do
    local p, n = ARGV[i], tonumber(ARGV[i + 1])
    local old = fields[p]
    if old ~= nil then
      if old == '{}' then
        local len = #p
        for f, v in pairs(fields) do
          if string.sub(f, 1, len) == p then new[f] = v end
        end
      else
        new[p] = old
      end
      for j = 1, n do new[ARGV[i + 1 + j]] = '{}' end
    end
    i = i + 2 + n
  end
elseif mode == 'x' then
  if tonumber(ARGV[6]) ~= version then
    return reply('conflict', op_id, version, 0, fields)
  end
  for i = 7, #ARGV, 2 do new[ARGV[i]] = ARGV[i + 1] end
elseif mode ~= 'D' then
  return redis.error_reply('chatstate: unknown mode')
end

local size = 0
for f, v in pairs(new) do size = size + #f + #v end
if size > tonumber(ARGV[4]) then
  return {'too_large', op_id, size}
end

-- Everything is checked: from here on the script only writes.
local function call_chunked(cmd, key, items)
  for s = 1, #items, 1000 do
    redis.call(cmd, key, unpack(items, s, math.min(s + 999, #items)))
  end
end

if mode == 'D' then
  redis.call('DEL', doc)
  version = 0
else
  local dels, sets = {}, {}
  for f in pairs(fields) do
    if new[f] == nil then dels[#dels + 1] = f end
  end
  for f, v in pairs(new) do
    if fields[f] ~= v then
      sets[#sets + 1] = f
      sets[#sets + 1] = v
    end
  end
  version = version + 1
  sets[#sets + 1] = '#v'
  sets[#sets + 1] = tostring(version)
  call_chunked('HDEL', doc, dels)
  call_chunked('HSET', doc, sets)
  if ARGV[3] ~= '' then redis.call('PEXPIRE', doc, ARGV[3]) end
end

-- Remember the operation: the newest ids, for dedupe ms after the user's last write.
if mode == 'D' then redis.call('DEL', opskey) end
redis.call('ZADD', opskey, version, op_id)
local count = redis.call('ZCARD', opskey)
if count > """
    + str(MAX_REMEMBERED_OPS)
    + r""" then
  redis.call('ZREMRANGEBYRANK', opskey, 0, count - """
    + str(MAX_REMEMBERED_OPS + 1)
    + r""")
end
redis.call('PEXPIRE', opskey, ARGV[2])
if mode == 'D' then return {'applied', op_id, 0, 0} end
return reply('applied', op_id, version, version, new)
"""
)


def write_args(write: Write) -> list[str | int]:
    """Pack a write into the apply script's ARGV."""
    ttl = "" if write.ttl_ms is None else write.ttl_ms
    args: list[str | int] = [write.op_id, write.dedupe_ms, ttl, write.max_bytes]
    op = write.operation
    if isinstance(op, Edits):
        args.append("e")
        for kind, path, value in op.edits:
            args.append(kind + encode_path(path))
            if kind == SET:
                args.append(encode_value(value))
    elif isinstance(op, Reset):
        args.append("r")
        for path in op.preserved:
            args.append(encode_path(path))
            args.append(len(path) - 1)
            args.extend(encode_path(path[:i]) for i in range(1, len(path)))
    elif isinstance(op, Replace):
        args.append("x")
        args.append(op.expected_version)
        for item in flatten(op.data).items():
            args.extend(item)
    else:
        assert isinstance(op, Delete)
        args.append("D")
    return args
